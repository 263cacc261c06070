"""Optimisers of the official code (REFERENCE.md §6): Adam with warm-up + cosine for ε_θ,
PyTorch's AMSGrad for the DCG, and the EMA of the denoiser's parameters."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def warmup_cosine_schedule(lr: float, warmup_epochs: float, num_epochs: float,
                           steps_per_epoch: int, min_lr: float = 0.0):
  """Official `adjust_learning_rate`, per iteration, with e = step / steps_per_epoch.

  lr·e/warmup for e < warmup (so the first step has lr 0), then
  min_lr + (lr − min_lr)·½(1 + cos(π(e − warmup)/(num_epochs − warmup))).
  """
  def schedule(count):
    epoch = count / steps_per_epoch
    warm = lr * epoch / max(warmup_epochs, 1e-12)
    progress = (epoch - warmup_epochs) / max(num_epochs - warmup_epochs, 1e-12)
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
    return jnp.where(epoch < warmup_epochs, warm, cosine)

  return schedule


class TorchAmsgradState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


def scale_by_torch_amsgrad(b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
  """PyTorch's AMSGrad: keeps max(ν_max, ν) of the *raw* second moment and divides by
  √(ν_max / (1 − b2^t)) + eps (optax.amsgrad takes the max of the bias-corrected ν̂ instead)."""

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    bc1 = 1 - b1**count.astype(jnp.float32)
    bc2 = 1 - b2**count.astype(jnp.float32)
    new = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu_max)
    return new, TorchAmsgradState(count, mu, nu, nu_max)

  return optax.GradientTransformation(init, update)


AMSGRAD_VARIANTS = {
    "torch": scale_by_torch_amsgrad,
    "optax": lambda b1, b2, eps: optax.scale_by_amsgrad(b1=b1, b2=b2, eps=eps),
}


def guidance_optimizer(lr, b1=0.9, b2=0.999, eps=1e-8, variant="torch"):
  """DCG optimiser: AMSGrad, lr 2e-4, no clipping and no schedule (official)."""
  if variant not in AMSGRAD_VARIANTS:
    raise ValueError(f"unknown AMSGrad variant {variant!r}; choose from {sorted(AMSGRAD_VARIANTS)}")
  return optax.chain(AMSGRAD_VARIANTS[variant](b1, b2, eps), optax.scale_by_learning_rate(lr))


def denoiser_optimizer(schedule, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0):
  """ε_θ optimiser: global-norm clipping then Adam with the per-iteration schedule."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adam(schedule, b1=b1, b2=b2, eps=eps))


def ema_update(ema_params, params, decay: float):
  """shadow ← (1 − μ)·θ + μ·shadow (the official/CARD EMA, no warm-up)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
