"""Training objectives, REFERENCE.md §2.7, §5.4, §5.5.

Shapes: B batch, C classes. Losses are means over the batch.
"""

import jax.numpy as jnp
import optax


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

