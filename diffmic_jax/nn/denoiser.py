"""The conditional noise model ε_θ(x, y_t, t, ŷ) and its image encoder ρ(x), REFERENCE.md §3–4.

ρ(x) = BN₀(Dense_{512→F}(GAP(ResNet-18(x)))) is computed by `encode` and can be reused by
several `denoise` calls (three noising streams per training step, every sampler step).
`denoise` is CARD's conditional MLP: three ConditionalLinear layers (Dense times a learned
per-timestep vector γ_t), each followed by BatchNorm and softplus, the Hadamard product with
ρ(x) after the first, then a Dense to C.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffmic_jax.nn import bf16_matvec
from diffmic_jax.nn import layers
from diffmic_jax.nn import resnet


def _uniform01(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype)


class ConditionalLinear(nn.Module):
  """out = γ_t ⊙ (W·in + b), γ a learned (num_steps × F) table initialised U[0, 1)."""

  features: int
  num_steps: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t):
    """x: [B, D_in]; t: [B] or [] int timesteps -> [B, F]."""
    out = layers.TorchDense(self.features, dtype=self.dtype, name="lin")(x)
    gamma = nn.Embed(self.num_steps, self.features, embedding_init=_uniform01,
                     name="embed")(t).astype(self.dtype)
    return (gamma if gamma.ndim == 2 else gamma[None, :]) * out


class NoiseModel(nn.Module):
  """ε_θ with its encoder ρ.

  Attributes:
    num_classes: C.
    num_timesteps: T; the γ tables have T + 1 rows as in the official code (row T unused).
    feature_dim: F (6144 in the paper).
    encoder: `resnet.ResNet` constructor kwargs as a tuple of (name, value) pairs.
    conditioning_width: number of C-wide vectors concatenated with y_t (1: [y_t, ŷ] as the
      official code; 2: the paper's [y_t, ŷ_g, ŷ_l]).
    encoder_bn_momentum: momentum of BN₀; a shared ρ(x) applied to three streams is
      equivalent to three official updates with 0.9**3.
    unbiased_running_var: PyTorch's BatchNorm running-variance convention.
  """

  num_classes: int
  num_timesteps: int
  feature_dim: int
  encoder: Any
  conditioning_width: int = 1
  encoder_bn_momentum: float = 0.9
  unbiased_running_var: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    bn = lambda **kw: layers.BatchNorm(unbiased_running_var=self.unbiased_running_var,
                                       dtype=self.dtype, **kw)
    self.encoder_net = resnet.ResNet(dtype=self.dtype, **dict(self.encoder))
    self.encoder_proj = layers.TorchDense(self.feature_dim, dtype=self.dtype)
    self.norm = bn(momentum=self.encoder_bn_momentum)
    steps = self.num_timesteps + 1
    self.lin1 = ConditionalLinear(self.feature_dim, steps, self.dtype)
    self.lin2 = ConditionalLinear(self.feature_dim, steps, self.dtype)
    self.lin3 = ConditionalLinear(self.feature_dim, steps, self.dtype)
    self.norm1, self.norm2, self.norm3 = bn(), bn(), bn()
    self.lin4 = layers.TorchDense(self.num_classes, dtype=self.dtype)

  def encode(self, x, train: bool):
    """ρ(x) after BN₀: x [B, H, W, 3] -> [B, F]."""
    pooled, _ = self.encoder_net(x, train)
    return self.norm(self.encoder_proj(pooled.astype(self.dtype)), train)

  def denoise(self, features, y_t, conditioning, t, train: bool):
    """ε̂ from cached image features.

    Args:
      features: [B, F] ρ(x) from `encode`.
      y_t: [B, C] noisy label vector.
      conditioning: [B, C·conditioning_width] the guidance prior(s) ŷ.
      t: [B] or [] integer timesteps in [0, T).
      train: BatchNorm mode.

    Returns:
      [B, C] float32 ε̂.
    """
    u = jnp.concatenate([y_t, conditioning], axis=-1).astype(self.dtype)
    h = nn.softplus(self.norm1(self.lin1(u, t), train))
    h = features.astype(self.dtype) * h
    h = nn.softplus(self.norm2(self.lin2(h, t), train))
    h = nn.softplus(self.norm3(self.lin3(h, t), train))
    return self.lin4(h).astype(jnp.float32)

  def __call__(self, x, y_t, conditioning, t, train: bool):
    """The official forward: ρ(x) recomputed, then `denoise`."""
    return self.denoise(self.encode(x, train), y_t, conditioning, t, train)


# ----------------------------------------------------------------------------- sampling layout
#
# The reverse chain calls ε_θ 100-1000 times on the same ρ(x) with the same weights, so its
# weights are rearranged once per sampling call (`fold_for_sampling`) and each step runs
# `denoise_folded`. Two changes, both exact up to float32 rounding:
# - BatchNorm with running statistics folded into the γ tables: BN(γ_t ⊙ (W·u + b)) =
#   (γ_t ⊙ s) ⊙ (W·u + b) + (β − μ·s), s = scale / √(var + ε);
# - the weights and activations in the layout that XLA's CPU dot runs fastest for the number of
#   rows each product sees (B images × S chains; `sampling_layout`):
#   - 'feature_major', batches of several images: weights [F_out, F_in] (PyTorch's layout) and
#     activations h [F, B], the contracted dimension minor on both sides and the wide one as
#     rows: at B=32, F=6144 a [F, F] × [F, B] product runs at the machine's matmul peak, 1.35×
#     faster than `u @ W` with W [in, out] (experiments/speed/README.md, "Speed on an AVX-512
#     CPU");
#   - 'vector', one image and one chain: weights [F_out, F_in], h [1, F], the product h·Wᵀ
#     streams each weight row once: on the 2-vCPU Zen 4, 4.6 against 5.8 ms per 6144 × 6144
#     product for u @ W [in, out] and 5.4-6.3 ms for W · h (median of 5 interleaved 100-step
#     rounds, both XLA dot libraries; experiments/speed/matvec_formats.py);
#   - 'batch_major', one image and several chains (vmapped: 8 rows at --mode predict's
#     default): Flax's stored weights [F_in, F_out], h [S, F] @ W, 1.5× faster than h·Wᵀ or
#     W · h at 8 rows on the same VM (another job running, 21 against 31 ms per product).
#   Every transpose happens outside the `lax.scan`: written inside, XLA folds it into the dot
#   and re-reads the kernel transposed at every step (4.8× slower).
# - Optionally (`weights='bfloat16'`, diffusion.sampler_weights) every dense kernel rounded to
#   bfloat16, activations and sums kept in float32. One image, with any number of chains, then
#   runs the 'vector' layout on the bfloat16 kernels themselves, as Flax stores them (one
#   conversion per call, no transpose), multiplied by `bf16_matvec.matvec`, which reads half
#   the bytes (Zen 4: 2.44 against 4.51 ms per product at one row; 8 chains of 250 steps
#   5.0 s against 5.5 s with the rounded kernels widened in 'batch_major', 5.2 s in float32);
#   batches of several images widen the rounded kernels back to float32, so an image gets the
#   same ε̂ in any batch up to float32 round-off.

_CONDITIONAL_LAYERS = (("lin1", "norm1"), ("lin2", "norm2"), ("lin3", "norm3"))


def _bn_scale_shift(params, stats, epsilon):
  """Eval BatchNorm as x·s + c: s, c [F] in float32."""
  s = params["scale"] * jax.lax.rsqrt(stats["var"] + epsilon)
  return s, params["bias"] - stats["mean"] * s


LAYOUTS = ("feature_major", "vector", "batch_major")
WEIGHT_FORMATS = ("float32", "bfloat16")


def sampling_layout(batch: int, num_samples: int, weights: str = "float32") -> str:
  """The `LAYOUTS` entry for chains of `num_samples` samples of `batch` images, the dense
  kernels in `weights` (a `WEIGHT_FORMATS` entry; see above)."""
  if batch > 1:
    return "feature_major"
  return "vector" if num_samples == 1 or weights == "bfloat16" else "batch_major"


def fold_for_sampling(variables, dtype=jnp.float32, layout: str = "feature_major",
                      weights: str = "float32") -> dict:
  """Eval-mode `NoiseModel.denoise` weights in the sampler's layout (see above).

  Args:
    variables: the denoiser's Flax variables {'params', 'batch_stats'}.
    dtype: the model's compute dtype (`NoiseModel.dtype`).
    layout: a `LAYOUTS` entry: kernels [F_in, F_out] for 'batch_major', else [F_out, F_in].
    weights: a `WEIGHT_FORMATS` entry: 'bfloat16' rounds every dense kernel to bfloat16, kept
      so, [F_in, F_out], in the 'vector' layout with a float32 `dtype` (`bf16_matvec`), else
      widened to `dtype`.

  Returns:
    {'lin1'|'lin2'|'lin3': {'w', 'b': [F], 'gamma': [T + 1, F] γ ⊙ s, 'shift': [F]},
    'lin4': {'w', 'b': [C]}}.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
  if weights not in WEIGHT_FORMATS:
    raise ValueError(f"weights={weights!r}; expected one of {WEIGHT_FORMATS}")
  params, stats = variables["params"], variables["batch_stats"]
  if weights == "bfloat16" and layout == "vector" and jnp.dtype(dtype) == jnp.float32:
    kernel = lambda k: k.astype(jnp.bfloat16)  # [F_in, F_out] for `bf16_matvec`: no transpose
  else:
    stored = ((lambda k: k.astype(dtype)) if weights == "float32"
              else (lambda k: k.astype(jnp.bfloat16).astype(dtype)))
    kernel = stored if layout == "batch_major" else (lambda k: stored(k.T))
  folded = {}
  for lin, norm in _CONDITIONAL_LAYERS:
    dense = params[lin]["lin"]["dense"]
    s, c = _bn_scale_shift(params[norm], stats[norm], layers.BatchNorm.epsilon)
    folded[lin] = {"w": kernel(dense["kernel"]), "b": dense["bias"].astype(dtype),
                   "gamma": (params[lin]["embed"]["embedding"] * s[None, :]).astype(dtype),
                   "shift": c.astype(dtype)}
  dense = params["lin4"]["dense"]
  folded["lin4"] = {"w": kernel(dense["kernel"]), "b": dense["bias"].astype(dtype)}
  return folded


def _linear(layer, h, layout):
  """W·h + b in `layout`: W [F_out, F_in] × h [F_in, B] -> [F_out, B] ('feature_major');
  h [B, F_in] -> [B, F_out] as h·Wᵀ ('vector'; h @ W by `bf16_matvec` for bfloat16 W
  [F_in, F_out]) or h @ W with W [F_in, F_out] ('batch_major')."""
  if layout == "feature_major":
    return jax.lax.dot_general(layer["w"], h, (((1,), (0,)), ((), ()))) + layer["b"][:, None]
  if layout == "vector" and layer["w"].dtype == jnp.bfloat16 and h.dtype == jnp.float32:
    return bf16_matvec.matvec(h, layer["w"]) + layer["b"][None, :]
  if layout == "vector":
    return jax.lax.dot_general(h, layer["w"], (((1,), (1,)), ((), ()))) + layer["b"][None, :]
  return h @ layer["w"] + layer["b"][None, :]


def _per_feature(v, feature_major):
  """A per-feature vector [F] (or per-example rows [B, F]) shaped to broadcast against h."""
  if v.ndim == 2:
    return v.T if feature_major else v
  return v[:, None] if feature_major else v[None, :]


def _conditional_folded(layer, h, t, layout):
  """softplus(g_t ⊙ (W·h + b) + c); t [] or [B]."""
  feature_major = layout == "feature_major"
  gamma = _per_feature(layer["gamma"][t], feature_major)
  pre = _linear(layer, h, layout)
  return nn.softplus(gamma * pre + _per_feature(layer["shift"], feature_major))


def denoise_folded(folded, features, y_t, conditioning, t, layout: str = "feature_major"):
  """`NoiseModel.denoise(..., train=False)` on `fold_for_sampling` weights.

  Args:
    folded: from `fold_for_sampling` with the same `layout`.
    features: ρ(x), [F, B] (transposed once per sampling call) for 'feature_major', else
      [B, F].
    y_t: [B, C] noisy label vector.
    conditioning: [B, C·conditioning_width] ŷ.
    t: [] or [B] integer timesteps.
    layout: a `LAYOUTS` entry (`sampling_layout`).

  Returns:
    [B, C] float32 ε̂.
  """
  feature_major = layout == "feature_major"
  dtype = folded["lin1"]["b"].dtype
  u = jnp.concatenate([y_t, conditioning], axis=-1).astype(dtype)
  if feature_major:
    u = u.T  # [D, B]: tiny
  h = _conditional_folded(folded["lin1"], u, t, layout) * features.astype(dtype)
  h = _conditional_folded(folded["lin2"], h, t, layout)
  h = _conditional_folded(folded["lin3"], h, t, layout)
  out = _linear(folded["lin4"], h, layout)
  return (out.T if feature_major else out).astype(jnp.float32)
