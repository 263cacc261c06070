"""Explanations of single decisions: the DCG's class-activation map for the predicted class over
the image, the K ROI crops the local stream looked at with their attention weights, and the
prediction with its uncertainty in the title (one PNG per image).

The inputs are the DCG's own intermediates (`dcg.DCG` returns them in `aux`;
`sampler.explanation_aux` picks them), so the boxes are exactly the crops the model used.
"""

import functools

import jax
import numpy as np
from scipy import special

from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import sampler
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import files


def roi_boxes(positions, cam_shape, image_shape, crop_size: int) -> np.ndarray:
  """Pixel boxes of the ROI crops, as `dcg.extract_crops` cuts them.

  Args:
    positions: [K, 2] (row, col) saliency cells of the ROIs.
    cam_shape: (h, w) of the saliency grid.
    image_shape: (H, W) of the image.
    crop_size: crop side s in pixels.

  Returns:
    [K, 4] (x, y, width, height): upper-left pixel round(cell · H/h) (banker's rounding, as
    jnp.round), shifted to stay inside the image as lax.dynamic_slice does.
  """
  cell = np.array([image_shape[0] / cam_shape[0], image_shape[1] / cam_shape[1]])
  start = np.round(np.asarray(positions, np.float64) * cell).astype(int)
  start = np.clip(start, 0, np.array(image_shape[:2]) - crop_size)
  size = np.full(len(start), crop_size)
  return np.stack([start[:, 1], start[:, 0], size, size], axis=1)


def class_map(cam, class_index: int) -> np.ndarray:
  """[h, w] map of one class from the CAM [h, w, C], min-max scaled to [0, 1] (0 if flat)."""
  m = np.asarray(cam, np.float64)[..., class_index]
  span = m.max() - m.min()
  return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def overlay_figure(image, cam, roi_positions, attention, *, class_index: int, crop_size: int,
                   title: str):
  """The explanation figure of one image (matplotlib Figure; the caller saves and closes it):
  the input on the left; on the right the CAM overlaid and the ROI boxes (axes index 1).

  Args:
    image: uint8 [H, W, 3] preprocessed image (what the model saw, before normalisation).
    cam: [h, w, C] saliency map S of the DCG's global stream.
    roi_positions: [K, 2] ROI cells; attention: [K] MIL attention weights α.
    class_index: the class whose map is shown (the predicted one).
    crop_size: crop side in pixels (config guidance.crop_size).
    title: the figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  fig, (plain, ax) = plt.subplots(1, 2, figsize=(8, 4.4))
  plain.imshow(image)
  plain.set(xticks=[], yticks=[])
  plain.set_title("input", fontsize=8)
  ax.imshow(image)
  ax.imshow(class_map(cam, class_index), cmap="jet", alpha=0.4, extent=(0, width, height, 0),
            interpolation="bilinear", vmin=0, vmax=1)
  attention = np.asarray(attention, np.float64)
  boxes = roi_boxes(roi_positions, np.shape(cam)[:2], (height, width), crop_size)
  strongest = attention.max() if attention.size else 1.0
  for rank, ((x, y, w, h), a) in enumerate(zip(boxes, attention)):
    ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor="white",
                                   linewidth=0.8 + 2.5 * a / max(strongest, 1e-12)))
    ax.text(x + 0.5, y + 0.5, f"{rank + 1}: {a:.2f}", color="black", fontsize=7, va="top",
            bbox=dict(facecolor="white", alpha=0.7, pad=0.5, linewidth=0))
  ax.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
  ax.set_title("CAM of the predicted class; ROIs with attention", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def save_overlay(path: str, image, aux: dict, *, class_index: int, crop_size: int,
                 title: str) -> None:
  """Writes the explanation PNG of one image; aux: one image's `sampler.explanation_aux`."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = overlay_figure(image, aux["cam"], aux["roi_positions"], aux["attention"],
                       class_index=class_index, crop_size=crop_size, title=title)
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def title(names, predictions: dict, i: int, label: int | None = None) -> str:
  """'<class> (votes 0.88, vote entropy 0.41; DCG <class> 0.97)' [+ 'true <class>'] of
  example i: the predicted class (`sampler.vote_prediction`) beside its own vote share."""
  k = int(predictions["prediction"][i])
  dcg = special.softmax(np.asarray(predictions["fused"][i], np.float64))
  shown = (f"{names[k]} (votes {predictions['vote_probs'][i][k]:.2f}, vote entropy "
           f"{predictions['vote_entropy'][i]:.2f}" if k >= 0 else "diverged (no finite sample")
  text = f"{shown}; DCG {names[int(dcg.argmax())]} {dcg.max():.2f})"
  return text if label is None else f"{text}\ntrue: {names[int(label)]}"


@functools.lru_cache(maxsize=4)
def _aux_fn(models):
  return jax.jit(lambda variables, images: sampler.explanation_aux(
      sampler.guidance_outputs(models, variables, images)[1]),
      compiler_options=fast_conv.compiler_options())


def explanation_aux(models, variables, images: np.ndarray, batch_size: int) -> list[dict]:
  """Per image {'cam', 'roi_positions', 'attention'} (numpy) of uint8 images [N, H, W, 3],
  computed in padded batches of batch_size (one compiled program); [] without a DCG."""
  fn = _aux_fn(models)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    batch = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
    batch[:len(chunk)] = input_pipeline.normalise(chunk)
    aux = jax.device_get(fn(variables, batch))
    if not aux:
      return []
    out += [{k: v[j] for k, v in aux.items()} for j in range(len(chunk))]
  return out


def select_examples(predictions: dict, labels, num: int) -> list[int]:
  """Indices of the examples to explain in an evaluation: the most confidently wrong first
  (by the vote share of the wrong class), up to half of `num`, then the first examples in
  split order, `num` in all (fewer if the split is smaller)."""
  preds = np.asarray(predictions["prediction"])
  confidence = np.where(preds >= 0, predictions["vote_probs"][np.arange(len(preds)), preds], 0.0)
  wrong = np.flatnonzero(preds != np.asarray(labels))
  wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:num // 2]
  chosen = set(wrong.tolist())
  rest = [i for i in range(len(preds)) if i not in chosen]
  return wrong.tolist() + rest[:num - len(wrong)]
