"""Synthetic 4-class demo dataset that needs both a global and a local cue.

label = 2 * global_factor + local_factor:
  * global factor: the orientation of a smooth low-frequency stripe texture over the whole image
    (0: horizontal stripes, 1: vertical stripes), with random period, phase, contrast and tint;
  * local factor: one small shape of side about S/8 at a random place, bright in channel 0 (the
    channel the DCG's local branch sees): 0 a filled square, 1 a hollow square (ring).
Pixel noise and distractor discs (bright in channels 1-2, faint in channel 0) keep it from being
trivial. Everything is drawn from `numpy.random.default_rng(seed)`, so the data are a pure function
of (num_examples, image_size, seed).
"""

import numpy as np

NUM_CLASSES = 4
CLASS_NAMES = ("horizontal_square", "horizontal_ring", "vertical_square", "vertical_ring")


def _background(rng: np.random.Generator, size: int, vertical: bool) -> np.ndarray:
  """float [S, S, 3] stripe texture, oriented by `vertical`."""
  coords = np.arange(size, dtype=np.float32)
  period = rng.uniform(size / 4, size / 2)
  wave = np.sin(2 * np.pi * coords / period + rng.uniform(0, 2 * np.pi))
  wave = np.broadcast_to(wave[None, :] if vertical else wave[:, None], (size, size))
  base = rng.uniform(70, 130)
  tint = rng.uniform(0.6, 1.0, size=3)
  return (base + rng.uniform(25, 45) * wave)[..., None] * tint


def _disc(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
  yy, xx = np.mgrid[:size, :size]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _shape_mask(size: int, ring: bool, rng: np.random.Generator) -> np.ndarray:
  """bool [S, S]: a filled or hollow square of side ~S/8 at a random position."""
  side = max(4, size // 8)
  top, left = rng.integers(1, size - side - 1, size=2)
  mask = np.zeros((size, size), bool)
  mask[top:top + side, left:left + side] = True
  if ring:
    width = max(1, side // 4)
    mask[top + width:top + side - width, left + width:left + side - width] = False
  return mask


def _draw(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
  """uint8 [S, S, 3] image of class `label`."""
  image = _background(rng, size, vertical=label >= 2)
  for _ in range(rng.integers(2, 5)):  # distractors
    disc = _disc(size, *rng.uniform(0, size, 2), rng.uniform(size / 24, size / 12))
    image[disc, 1:] = rng.uniform(180, 255)
    image[disc, 0] += rng.uniform(10, 40)
  mask = _shape_mask(size, ring=label % 2 == 1, rng=rng)
  image[mask, 0] = rng.uniform(225, 255)
  image[mask, 1:] *= 0.5
  image += rng.normal(0, 10, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_demo(num_examples: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Generates the demo dataset.

  Args:
    num_examples: N.
    image_size: side S (>= 16).
    seed: generator seed.

  Returns:
    (images uint8 [N, S, S, 3], labels int64 [N]), classes balanced up to one example.
  """
  if image_size < 16:
    raise ValueError(f"data.image_size={image_size}; the demo needs at least 16")
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int64)
  images = np.stack([_draw(rng, image_size, int(l)) for l in labels]) if num_examples else (
      np.zeros((0, image_size, image_size, 3), np.uint8))
  return images, labels
