"""Learning-rate schedule, PyTorch-parity AMSGrad and EMA against direct computations."""


import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffmic_jax.run import optim


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


def _adam_reference(grads, lr, clip=None, b1=0.9, b2=0.999, eps=1e-8):
  """Adam (optax/PyTorch semantics) in float64 numpy on one flat vector, after optional
  global-norm clipping g ← g·min(1, clip/‖g‖). Returns the list of per-step updates."""
  m = v = np.zeros_like(grads[0])
  updates = []
  for step, g in enumerate(grads, start=1):
    if clip is not None:
      g = g * min(1.0, clip / np.linalg.norm(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + eps))
  return updates


def test_denoiser_optimizer_clips_the_global_norm_of_a_huge_gradient():
  # Adam is scale-invariant in one step, so the clipping shows in the step after a huge gradient:
  # clipped, the huge gradient weighs as much as a norm-1 one in Adam's moments.
  tx = optim.denoiser_optimizer(lambda count: 0.01, grad_clip=1.0)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  state = tx.init(params)
  flat = [np.array([3e4, 0.0, 4e4]), np.array([0.1, -0.2, 0.05])]  # global norms 5e4 and 0.23
  ours = []
  for g in flat:
    grads = {"a": jnp.asarray(g[:2], jnp.float32), "b": jnp.asarray(g[2:], jnp.float32)}
    updates, state = tx.update(grads, state, params)
    ours.append(np.concatenate([updates["a"], updates["b"]]))
  clipped = _adam_reference(flat, 0.01, clip=1.0)
  np.testing.assert_allclose(ours, clipped, rtol=1e-5, atol=1e-9)
  unclipped = _adam_reference(flat, 0.01)
  assert not np.allclose(clipped[1], unclipped[1], rtol=1e-2)
