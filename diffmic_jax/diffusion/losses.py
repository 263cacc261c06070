"""Training objectives, REFERENCE.md §2.7, §5.4, §5.5.

Shapes: B batch, C classes. Losses are means over the batch.
"""

import jax
import jax.numpy as jnp
import optax

from diffmic_jax.diffusion import diffusion
from diffmic_jax.nn import denoiser as denoiser_lib


def gaussian_kernel(a, b):
  """Official kernel k(a, b) = exp(−‖a − b‖²/C²). a: [N, C], b: [M, C] -> [N, M]."""
  sq = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)
  return jnp.exp(-sq / a.shape[-1] ** 2)


def multi_bandwidth_kernel(a, b, scales=(0.25, 0.5, 1.0, 2.0, 4.0)):
  """Mean of Gaussian kernels with bandwidths C²·s for s in `scales`. [N, C], [M, C] -> [N, M]."""
  sq = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)
  c2 = a.shape[-1] ** 2
  return jnp.mean(jnp.stack([jnp.exp(-sq / (c2 * s)) for s in scales]), axis=0)


KERNELS = {"gaussian": gaussian_kernel, "multi": multi_bandwidth_kernel}


def mmd(x, y, kernel: str = "gaussian"):
  """Biased (V-statistic) squared MMD: mean k(x,x) + mean k(y,y) − 2 mean k(x,y).

  Args:
    x: [N, C] samples (ε); y: [M, C] samples (ε̂).
    kernel: 'gaussian' (official, single bandwidth) or 'multi'.

  Returns:
    [] MMD², diagonals included and no square root, as the official code.
  """
  if kernel not in KERNELS:
    raise ValueError(f"unknown MMD kernel {kernel!r}; choose from {sorted(KERNELS)}")
  k = KERNELS[kernel]
  return jnp.mean(k(x, x)) + jnp.mean(k(y, y)) - 2.0 * jnp.mean(k(x, y))


def diffusion_loss(noise, eps_fused, eps_global, eps_local, *, mmd_weight: float = 0.5,
                   kernel: str = "gaussian"):
  """L = ‖ε − ε̂‖² (dual stream) + λ·(MMD(ε, ε̂_g) + MMD(ε, ε̂_l)), paper Eq. 3–4.

  Args:
    noise: [B, C] ε shared by the three streams.
    eps_fused, eps_global, eps_local: [B, C] predictions of the three streams.
    mmd_weight: λ (0 turns the MMD terms off; eps_global/eps_local may then be None).

  Returns:
    (loss [], {'mse', 'mmd_global', 'mmd_local'}).
  """
  mse = jnp.mean(jnp.square(noise - eps_fused))
  if mmd_weight == 0.0:
    zero = jnp.zeros((), jnp.float32)
    return mse, {"mse": mse, "mmd_global": zero, "mmd_local": zero}
  mmd_g = mmd(noise, eps_global, kernel)
  mmd_l = mmd(noise, eps_local, kernel)
  return mse + mmd_weight * (mmd_g + mmd_l), {"mse": mse, "mmd_global": mmd_g, "mmd_local": mmd_l}


def draws(models, key, batch_size: int) -> dict:
  """The joint step's random draws for the bundle (`diffusion.diffusion_draws`)."""
  return diffusion.diffusion_draws(key, batch_size, models.num_classes, models.num_timesteps,
                                   models.cond_dropout)


def diffusion_objective(models, params, batch_stats, images, labels, logits, step_draws):
  """The official objective (§5.4): three noising streams sharing ε and t, ρ(x) computed once.

  Args:
    models: the `models.Models` bundle (denoiser, schedule, prior/conditioning, MMD settings).
    params, batch_stats: the denoiser's variables (differentiated with respect to params).
    images: [B, H, W, 3]; labels: [B] int.
    logits: {'fused', 'global', 'local'}: [B, C] eval-mode guidance logits (not differentiated).
    step_draws: the step's random draws, `draws(models, key, B)`: {'t', 'e'} (and 'drop' when
      models.cond_dropout > 0); the objective draws nothing itself.

  Returns:
    (loss [], (updated batch_stats, {'mse', 'mmd_global', 'mmd_local', 'mse_band0'..'mse_band3'}));
    'mse_band<k>' is the fused stream's ε-MSE over the examples with t in the k-th quarter of
    [0, T) (0 when the batch has none).
  """
  schedule = models.schedule()
  noise, t = step_draws["e"], step_draws["t"]
  y0 = jax.nn.one_hot(labels, models.num_classes, dtype=jnp.float32)
  inputs = diffusion.stream_inputs(models.prior, models.conditioning,
                                   jax.lax.stop_gradient(logits))
  if models.cond_dropout > 0:
    inputs = {name: (mean, drop_conditioning(cond, step_draws["drop"], models.num_classes))
              for name, (mean, cond) in inputs.items()}
  streams = ("fused", "global", "local") if models.mmd_weight > 0 else ("fused",)
  apply = lambda stats, *args, method: models.denoiser.apply(
      {"params": params, "batch_stats": stats}, *args, train=True, method=method,
      mutable=["batch_stats"])
  features, updated = apply(batch_stats, images, method=denoiser_lib.NoiseModel.encode)
  stats, eps = updated["batch_stats"], {}
  for stream in streams:  # three distinct streams; each updates BN running stats in turn.
    prior_mean, conditioning = inputs[stream]
    y_t = diffusion.q_sample(schedule, y0, prior_mean, t, noise)
    eps[stream], updated = apply(stats, features, y_t, conditioning, t,
                                 method=denoiser_lib.NoiseModel.denoise)
    stats = updated["batch_stats"]
  loss, aux = diffusion_loss(noise, eps["fused"], eps.get("global"), eps.get("local"),
                             mmd_weight=models.mmd_weight, kernel=models.mmd_kernel)
  aux.update(mse_by_band(noise, eps["fused"], t, models.num_timesteps))
  return loss, (stats, aux)


def drop_conditioning(conditioning, drop, num_classes: int):
  """Replaces the conditioning ŷ of the dropped examples by the uninformative 1/C.

  Args:
    conditioning: [B, C·k] guidance probabilities fed to the denoiser.
    drop: [B] bool, True where the guidance is hidden (prob. `model.cond_dropout`), so that the
      denoiser must learn to read the image through ρ(x) instead of copying the guidance.
    num_classes: C.
  """
  return jnp.where(drop[:, None], jnp.full_like(conditioning, 1.0 / num_classes), conditioning)


def mse_by_band(noise, eps_pred, t, num_timesteps: int, num_bands: int = 4) -> dict:
  """ε-MSE per timestep band: {'mse_band<k>': mean over examples with t·bands//T = k}.

  noise, eps_pred: [B, C]; t: [B] int. A band without examples reports 0.
  """
  per_example = jnp.mean(jnp.square(noise - eps_pred), axis=-1)
  band = t * num_bands // num_timesteps
  out = {}
  for k in range(num_bands):
    in_band = (band == k).astype(per_example.dtype)
    out[f"mse_band{k}"] = jnp.sum(per_example * in_band) / jnp.maximum(jnp.sum(in_band), 1.0)
  return out


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy. logits: [B, C]; labels: [B] int -> []."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


DCG_LOSS_TERMS = {"fused": ("fused",), "all": ("fused", "global", "local")}


def dcg_loss(logits: dict, labels, terms: str = "fused"):
  """DCG cross-entropy on the fused logits (official) or on fused + global + local.

  Args:
    logits: {'fused', 'global', 'local'}: [B, C] each.
    labels: [B] int.
    terms: 'fused' or 'all'.
  """
  if terms not in DCG_LOSS_TERMS:
    raise ValueError(f"unknown DCG loss {terms!r}; choose from {sorted(DCG_LOSS_TERMS)}")
  return sum(cross_entropy(logits[name], labels) for name in DCG_LOSS_TERMS[terms])

