"""MMD and the training losses against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax import losses


def _double_loop_mmd(x, y):
  c = x.shape[1]
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / c**2)
  kxx = np.mean([[k(a, b) for b in x] for a in x])
  kyy = np.mean([[k(a, b) for b in y] for a in y])
  kxy = np.mean([[k(a, b) for b in y] for a in x])
  return kxx + kyy - 2 * kxy


def test_mmd_zero_symmetric_and_matches_double_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  y = rng.normal(size=(6, 5)).astype(np.float32) + 0.5
  assert float(losses.mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.mmd(x, y)) == pytest.approx(float(losses.mmd(y, x)), rel=1e-6)
  assert float(losses.mmd(x, y)) == pytest.approx(_double_loop_mmd(x, y), rel=1e-5)
  assert float(losses.mmd(x, y, "multi")) > 0


def test_diffusion_loss_composition():
  rng = np.random.default_rng(1)
  e, f, g, l = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(4))
  loss, aux = losses.diffusion_loss(e, f, g, l, mmd_weight=0.5)
  expected = float(np.mean((e - f) ** 2)) + 0.5 * (_double_loop_mmd(np.asarray(e), np.asarray(g))
                                            + _double_loop_mmd(np.asarray(e), np.asarray(l)))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  loss0, _ = losses.diffusion_loss(e, f, None, None, mmd_weight=0.0)
  assert float(loss0) == pytest.approx(float(aux["mse"]))


def test_dcg_loss_terms():
  logits = {"fused": jnp.array([[2.0, 0.0]]), "global": jnp.array([[0.0, 1.0]]),
            "local": jnp.array([[1.0, 1.0]])}
  labels = jnp.array([0])
  ce = lambda z: float(-jax.nn.log_softmax(z)[0, 0])
  assert float(losses.dcg_loss(logits, labels)) == pytest.approx(ce(logits["fused"]), rel=1e-6)
  assert float(losses.dcg_loss(logits, labels, "all")) == pytest.approx(
      sum(ce(v) for v in logits.values()), rel=1e-6)
  with pytest.raises(ValueError, match="fused"):
    losses.dcg_loss(logits, labels, "sum")
