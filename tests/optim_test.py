"""Learning-rate schedule, PyTorch-parity AMSGrad and EMA against direct computations."""


import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffmic_jax import optim


@pytest.mark.parametrize("epoch,expected", [
    (0, 0.0), (20, 5e-4), (40, 1e-3), (520, 5e-4), (1000, 0.0)])
def test_official_lr_schedule(epoch, expected):
  steps_per_epoch = 110
  schedule = optim.warmup_cosine_schedule(1e-3, 40, 1000, steps_per_epoch)
  assert float(schedule(epoch * steps_per_epoch)) == pytest.approx(expected, abs=1e-9)


def _torch_amsgrad_reference(grads, lr=2e-4, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(amsgrad=True) written out in numpy (PyTorch 1.10+ semantics)."""
  p = np.zeros_like(grads[0])
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  v_max = np.zeros_like(p)
  for step, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_max = np.maximum(v_max, v)
    denom = np.sqrt(v_max) / np.sqrt(1 - b2**step) + eps
    p = p - lr / (1 - b1**step) * m / denom
  return p


def test_torch_amsgrad_matches_reference_and_differs_from_optax():
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(5,)).astype(np.float32) * s for s in (1.0, 3.0, 0.1, 0.5, 2.0)]
  results = {}
  for variant in ("torch", "optax"):
    tx = optim.guidance_optimizer(2e-4, variant=variant)
    params = jnp.zeros(5)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jnp.asarray(g), state, params)
      params = optax.apply_updates(params, updates)
    results[variant] = np.asarray(params)
  np.testing.assert_allclose(results["torch"], _torch_amsgrad_reference(grads), rtol=1e-5,
                             atol=1e-9)
  assert not np.allclose(results["torch"], results["optax"], rtol=1e-4, atol=0)


def test_ema_update():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, 0.0])}
  out = optim.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["w"], [1.2, 1.8], rtol=1e-6)


def test_denoiser_optimizer_clips_global_norm():
  tx = optim.denoiser_optimizer(lambda count: 1.0, grad_clip=1.0)
  params = {"a": jnp.zeros(2)}
  state = tx.init(params)
  big = {"a": jnp.array([30.0, 40.0])}
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.EmptyState())
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
  updates, _ = tx.update(big, state, params)
  assert jnp.all(jnp.isfinite(updates["a"]))
