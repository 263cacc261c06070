"""MMD and the training losses against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.diffusion import losses


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


def test_mse_by_band_averages_each_quarter_of_the_timesteps():
  rng = np.random.default_rng(2)
  noise = rng.normal(size=(6, 3)).astype(np.float32)
  eps = rng.normal(size=(6, 3)).astype(np.float32)
  t = np.array([0, 24, 25, 60, 99, 30])  # T = 100: bands 0, 0, 1, 2, 3, 1
  out = losses.mse_by_band(jnp.asarray(noise), jnp.asarray(eps), jnp.asarray(t), 100)
  per = ((noise - eps) ** 2).mean(axis=1)
  for k, members in enumerate(([0, 1], [2, 5], [3], [4])):
    assert float(out[f"mse_band{k}"]) == pytest.approx(per[members].mean(), rel=1e-5)
  empty = losses.mse_by_band(jnp.asarray(noise), jnp.asarray(eps), jnp.zeros(6, jnp.int32), 100)
  assert float(empty["mse_band3"]) == 0.0


def test_dropped_conditioning_is_uniform_and_the_rest_untouched():
  cond = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
  out = np.asarray(losses.drop_conditioning(cond, jnp.array([True, False, True]), 3))
  np.testing.assert_allclose(out[[0, 2]], 1 / 3)
  np.testing.assert_array_equal(out[1], np.asarray(cond[1]))


def test_conditioning_dropout_reaches_the_objective(tiny_config):
  from diffmic_jax.diffusion import models  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  variables = None
  results = {}
  for p in (0.0, 0.9):
    config.model.cond_dropout = p
    bundle = models.create_models(config)
    if variables is None:
      variables = models.init_variables(bundle, jax.random.PRNGKey(0), 32, 8)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % 4
    logits = {k: jax.random.normal(jax.random.PRNGKey(i), (8, 4)) for i, k in
              enumerate(("fused", "global", "local"))}
    den = variables["denoiser"]
    results[p] = losses.diffusion_objective(bundle, den["params"], den["batch_stats"], images,
                                            labels, logits,
                                            losses.draws(bundle, jax.random.PRNGKey(2), 8))[0]
  assert float(results[0.0]) != pytest.approx(float(results[0.9]), rel=1e-4)
  config.model.cond_dropout = 1.0
  with pytest.raises(ValueError, match="model.cond_dropout"):
    models.create_models(config)
