"""Dual-granularity conditional guidance (DCG) model τ_D, REFERENCE.md §2.

Global stream: ResNet trunk -> bias-free 1×1 conv saliency map S (no sigmoid) -> top-t%
aggregation -> y_global logits. Local stream: K greedy ROIs from the min-max-normalised,
class-summed map -> crops -> a second ResNet trunk -> gated-attention MIL -> y_local logits.
Fusion: y_fused = w·y_global + (1−w)·y_local, in logit space.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffmic_jax.nn import layers
from diffmic_jax.nn import resnet


def normalize_saliency(saliency):
  """Min-max normalises each class map and sums over classes.

  Args:
    saliency: [B, h, w, C] saliency map S.

  Returns:
    [B, h, w] A = Σ_c (S_c − min S_c)/(max S_c − min S_c); a constant class map contributes
    0 instead of the official code's NaN.
  """
  lo = jnp.min(saliency, axis=(1, 2), keepdims=True)
  hi = jnp.max(saliency, axis=(1, 2), keepdims=True)
  span = hi - lo
  normalized = jnp.where(span > 0, (saliency - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  return jnp.sum(normalized, axis=-1)


def select_rois(attention_map, num_rois: int, window: Sequence[int] = (1, 1)):
  """Greedy ROI selection on one map (GMIC's RetrieveROIModule), jittable.

  At each of K steps the window with the largest mean is chosen (first index on ties, like
  torch.max) and its cells are suppressed. Suppression uses −inf rather than the official
  zero, so the K windows are distinct even when fewer than K cells are positive; when enough
  cells are positive both choose the same windows.

  Args:
    attention_map: [h, w] non-negative map A.
    num_rois: K.
    window: ROI size in cells.

  Returns:
    [K, 2] int32 (row, col) upper-left cells of the chosen windows.
  """
  h, w = attention_map.shape
  wh, ww = window
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]

  def step(a, _):
    pooled = jax.lax.reduce_window(a, 0.0, jax.lax.add, (wh, ww), (1, 1), "VALID") / (wh * ww)
    flat = jnp.argmax(pooled.reshape(-1))
    r, c = flat // pooled.shape[1], flat % pooled.shape[1]
    inside = (rows >= r) & (rows < r + wh) & (cols >= c) & (cols < c + ww)
    return jnp.where(inside, -jnp.inf, a), jnp.stack([r, c]).astype(jnp.int32)

  _, positions = jax.lax.scan(step, attention_map.astype(jnp.float32), None, length=num_rois)
  return positions


def extract_crops(image, positions, crop_size: int, cell_size: Sequence[float]):
  """Crops [K, s, s, ch] patches whose upper-left pixel is round(cell · cell_size).

  As in the official code the window is shifted to stay inside the image (dynamic_slice
  clamps), which never triggers when crops are grid cells.

  Args:
    image: [H, W, ch] one image.
    positions: [K, 2] cells (row, col).
    crop_size: s, in pixels.
    cell_size: (H/h, W/w) pixels per saliency cell.
  """
  def crop(position):
    start = jnp.round(position.astype(jnp.float32) * jnp.asarray(cell_size)).astype(jnp.int32)
    return jax.lax.dynamic_slice(image, (start[0], start[1], 0),
                                 (crop_size, crop_size, image.shape[-1]))

  return jax.vmap(crop)(positions)


class GatedAttentionMIL(nn.Module):
  """Gated attention MIL pooling (Ilse et al. 2018) and a bias-free classifier, §2.4."""

  num_classes: int
  attention_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    """h: [B, K, F] crop features -> (logits [B, C], attention α [B, K], sums to 1 over K)."""
    dense = lambda n, name: layers.TorchDense(n, use_bias=False, dtype=self.dtype, name=name)
    gate = nn.sigmoid(dense(self.attention_dim, "U")(h)) * jnp.tanh(dense(self.attention_dim, "V")(h))
    scores = dense(1, "w")(gate)[..., 0]
    alpha = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("bk,bkf->bf", alpha, h)
    return dense(self.num_classes, "classifier")(z), alpha


class DCG(nn.Module):
  """The DCG guidance model.

  Attributes:
    num_classes: C.
    global_backbone / local_backbone: `resnet.ResNet` constructor kwargs (dicts as tuples).
    num_rois: K crops.
    crop_size: crop side in pixels.
    crop_channels: 'first' (channel 0 repeated to 3, official) or 'all'.
    top_t_percent: fraction of saliency cells averaged into y_global (1.0 = mean).
    attention_dim: MIL hidden width.
    fusion_weight: w in y_fused = w·y_global + (1−w)·y_local.
  """

  num_classes: int
  global_backbone: Any
  local_backbone: Any
  num_rois: int = 6
  crop_size: int = 32
  crop_channels: str = "first"
  top_t_percent: float = 1.0
  attention_dim: int = 128
  fusion_weight: float = 0.5
  dtype: Any = jnp.float32

  def _check_grid(self, image_shape, grid_shape):
    h, w = grid_shape
    if h * w < self.num_rois:
      raise ValueError(
          f"DCG: images of {image_shape[0]}x{image_shape[1]} give a {h}x{w} saliency grid, "
          f"fewer cells than num_rois={self.num_rois}; use larger images, fewer ROIs or a "
          "shallower global backbone (guidance.stage_sizes)")
    if self.crop_size > min(image_shape[:2]):
      raise ValueError(f"DCG: crop_size={self.crop_size} exceeds the image size {image_shape[:2]}")
    if self.crop_channels not in ("first", "all"):
      raise ValueError(f"unknown crop_channels {self.crop_channels!r}; choose from ['all', 'first']")

  def _global(self, x, train):
    _, aux = resnet.ResNet(dtype=self.dtype, name="global_net", **dict(self.global_backbone))(x, train)
    saliency = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="saliency")(aux["feature_map"])
    saliency = saliency.astype(jnp.float32)
    b, h, w, c = saliency.shape
    top_t = max(1, int(round(h * w * self.top_t_percent)))
    per_class = jnp.swapaxes(saliency.reshape(b, h * w, c), 1, 2)  # [B, C, h·w]
    return jnp.mean(jax.lax.top_k(per_class, top_t)[0], axis=-1), saliency

  @nn.compact
  def __call__(self, x, train: bool):
    """Runs the DCG.

    Args:
      x: [B, H, W, 3] normalised images.
      train: BatchNorm mode.

    Returns:
      logits {'fused', 'global', 'local'}: [B, C] each, and aux {'cam': [B, h, w, C]
      saliency map, 'roi_positions': [B, K, 2] cells, 'attention': [B, K]}.
    """
    y_global, saliency = self._global(x, train)
    grid = saliency.shape[1:3]
    self._check_grid(x.shape[1:3], grid)
    cell_size = (x.shape[1] / grid[0], x.shape[2] / grid[1])
    window = tuple(max(1, int(round(self.crop_size / s))) for s in cell_size)
    attention_map = jax.lax.stop_gradient(normalize_saliency(saliency))
    positions = jax.vmap(lambda a: select_rois(a, self.num_rois, window))(attention_map)
    source = x[..., :1] if self.crop_channels == "first" else x
    crops = jax.vmap(lambda im, p: extract_crops(im, p, self.crop_size, cell_size))(source, positions)
    crops = jnp.broadcast_to(crops, crops.shape[:-1] + (3,))
    b, k = crops.shape[:2]
    h_local, _ = resnet.ResNet(dtype=self.dtype, name="local_net", **dict(self.local_backbone))(
        crops.reshape((b * k,) + crops.shape[2:]), train)
    y_local, alpha = GatedAttentionMIL(self.num_classes, self.attention_dim, self.dtype,
                                       name="mil")(h_local.reshape(b, k, -1))
    y_local, alpha = y_local.astype(jnp.float32), alpha.astype(jnp.float32)
    y_fused = self.fusion_weight * y_global + (1.0 - self.fusion_weight) * y_local
    logits = {"fused": y_fused, "global": y_global, "local": y_local}
    return logits, {"cam": saliency, "roi_positions": positions, "attention": alpha}
