"""The CARD diffusion math against REFERENCE.md §5 and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax import diffusion
from diffmic_jax import sampler

# REFERENCE.md §5.1: (i, √ᾱ_i, √(1−ᾱ_i)).
TABLE = [(0, 0.99995, 0.0100), (9, 0.9990, 0.0435), (59, 0.9796, 0.2011), (99, 0.9471, 0.3209),
         (249, 0.7239, 0.6899), (499, 0.2803, 0.9599), (999, 0.00635, 0.99998)]


@pytest.mark.parametrize("i,sqrt_ab,sqrt_1m_ab", TABLE)
def test_schedule_matches_reference_table(i, sqrt_ab, sqrt_1m_ab):
  s = diffusion.linear_schedule(1000, 1e-4, 0.02)
  assert np.sqrt(float(s.alphas_cumprod[i])) == pytest.approx(sqrt_ab, rel=2e-3)
  assert np.sqrt(1 - float(s.alphas_cumprod[i])) == pytest.approx(sqrt_1m_ab, rel=2e-3)
  assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)


# The official float32 tables' bit patterns, produced once with torch 2.13.0+cpu (AVX-512 kernels;
# AVX2 gives the same bits) by
#   b = torch.linspace(1e-4, 0.02, T); a = 1.0 - b; ab = a.cumprod(dim=0)
#   x.numpy().view(np.uint32)[i]
# for (T, table, i) below. tests/diffusion_test.py::test_float32_schedule_equals_live_torch
# compares every entry again when torch is installed.
TORCH_BITS = {
    1000: {
        "betas": {0: 0x38d1b717, 1: 0x38fb7d84, 2: 0x3912a1f8, 57: 0x3aa1ee56, 499: 0x3c247efb,
                  500: 0x3c24d287, 998: 0x3ca3ad44, 999: 0x3ca3d70a},
        "alphas": {0: 0x3f7ff972, 1: 0x3f7ff824, 2: 0x3f7ff6d6, 57: 0x3f7faf09, 499: 0x3f7d6e04,
                   500: 0x3f7d6cb6, 998: 0x3f7ae296, 999: 0x3f7ae148},
        "alphas_cumprod": {0: 0x3f7ff972, 1: 0x3f7ff196, 2: 0x3f7fe86d, 57: 0x3f76456f,
                           499: 0x3da0f258, 500: 0x3d9f53da, 998: 0x382cbac6, 999: 0x38294666},
    },
    10: {
        "betas": {0: 0x38d1b717, 4: 0x3c128bb8, 5: 0x3c36c5ca, 9: 0x3ca3d70a},
        "alphas": {0: 0x3f7ff972, 4: 0x3f7db5d1, 5: 0x3f7d24e9, 9: 0x3f7ae148},
        "alphas_cumprod": {0: 0x3f7ff972, 4: 0x3f7a41eb, 5: 0x3f77773a, 9: 0x3f675b78},
    },
}


def _bits(schedule, num_timesteps):
  """{table: {i: uint32 bit pattern}} of the entries pinned in TORCH_BITS."""
  return {name: {i: int(np.asarray(getattr(schedule, name)).view(np.uint32)[i]) for i in pins}
          for name, pins in TORCH_BITS[num_timesteps].items()}


@pytest.mark.parametrize("num_timesteps", sorted(TORCH_BITS))
def test_float32_schedule_is_torchs_bit_for_bit(num_timesteps):
  s = diffusion.linear_schedule(num_timesteps, 1e-4, 0.02)  # the default is float32
  assert _bits(s, num_timesteps) == TORCH_BITS[num_timesteps]


def test_float64_schedule_is_a_switch():
  s64 = diffusion.linear_schedule(1000, dtype="float64")
  assert _bits(s64, 1000) != TORCH_BITS[1000]
  ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_array_equal(s64.alphas_cumprod, ab.astype(np.float32))
  with pytest.raises(ValueError, match="float64"):
    diffusion.linear_schedule(10, dtype="float16")


@pytest.mark.parametrize("num_timesteps,beta_start,beta_end", [
    (1000, 1e-4, 0.02), (10, 1e-4, 0.02), (37, 1e-4, 0.02), (250, 8.5e-4, 0.012), (1, 1e-4, 0.02)])
def test_float32_schedule_equals_live_torch(num_timesteps, beta_start, beta_end):
  torch = pytest.importorskip("torch")
  b = torch.linspace(beta_start, beta_end, num_timesteps)
  a = 1.0 - b
  expected = (b, a, a.cumprod(dim=0))
  s = diffusion.linear_schedule(num_timesteps, beta_start, beta_end)
  for ours, theirs in zip(s, expected):
    np.testing.assert_array_equal(np.asarray(ours).view(np.uint32), theirs.numpy().view(np.uint32))


def test_q_sample_first_and_last_index():
  s = diffusion.linear_schedule()
  y0 = jnp.array([[1.0, 0.0, 0.0]])
  mu = jnp.array([[0.2, 0.5, 0.3]])
  eps = jnp.array([[0.3, -1.0, 2.0]])
  first = diffusion.q_sample(s, y0, mu, jnp.array([0]), eps)
  ab = 1 - 1e-4
  expected = np.sqrt(ab) * y0 + (1 - np.sqrt(ab)) * mu + np.sqrt(1 - ab) * eps
  np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
  last = diffusion.q_sample(s, y0, mu, jnp.array([999]), eps)
  # At t = T−1, y_t ≈ μ + ε (the prior N(μ, I)).
  np.testing.assert_allclose(last, mu + eps, atol=1e-2)


def test_antithetic_timesteps_pair_up():
  t = np.asarray(diffusion.antithetic_timesteps(jax.random.PRNGKey(0), 7, 1000))
  assert t.shape == (7,) and t.min() >= 0 and t.max() <= 999
  np.testing.assert_array_equal(t[4:7], 999 - t[0:3])


def test_posterior_step_matches_closed_form():
  s = diffusion.linear_schedule(1000)
  b, ab, al = (np.asarray(x, np.float64) for x in (s.betas, s.alphas_cumprod, s.alphas))
  rng = np.random.default_rng(0)
  y, mu, eps, z = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4))
  t = 57
  out, y0_hat = diffusion.posterior_step(s, y, mu, eps, t, t - 1, z)
  sab = np.sqrt(ab[t])
  y0_ref = (y - (1 - sab) * mu - np.sqrt(1 - ab[t]) * eps) / sab
  g0 = b[t] * np.sqrt(ab[t - 1]) / (1 - ab[t])
  g1 = (1 - ab[t - 1]) * np.sqrt(al[t]) / (1 - ab[t])
  g2 = 1 + (sab - 1) * (np.sqrt(al[t]) + np.sqrt(ab[t - 1])) / (1 - ab[t])
  var = (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
  ref = g0 * y0_ref + g1 * y + g2 * mu + np.sqrt(var) * z
  np.testing.assert_allclose(y0_hat, y0_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,steps,expected", [
    ("official_truncated", 4, (3, 2, 1, 0)),
    ("full", 4, tuple(range(9, -1, -1))),
    ("respaced", 4, (9, 6, 3, 0)),
])
def test_timestep_sequences(name, steps, expected):
  assert diffusion.timestep_sequence(name, 10, steps) == expected


def test_unknown_sampler_lists_choices():
  with pytest.raises(ValueError, match="official_truncated"):
    diffusion.timestep_sequence("ddpm", 10, 5)


def _oracle(schedule, y0, mu):
  """ε_θ that returns the true noise of y_t given the clean y0."""
  def denoise(y_t, cond, t):
    del cond
    ab = schedule.alphas_cumprod[t]
    return (y_t - jnp.sqrt(ab) * y0 - (1 - jnp.sqrt(ab)) * mu) / jnp.sqrt(1 - ab)
  return denoise


@pytest.mark.parametrize("name,steps", [("full", 1000), ("official_truncated", 100),
                                        ("respaced", 10)])
def test_oracle_noise_recovers_y0(name, steps):
  s = diffusion.linear_schedule(1000)
  y0 = jax.nn.one_hot(jnp.array([0, 2, 1]), 3)
  mu = jnp.full((3, 3), 1 / 3)
  ts = diffusion.timestep_sequence(name, 1000, steps)
  out = sampler.run_chain(_oracle(s, y0, mu), s, mu, mu, jax.random.PRNGKey(0), ts)
  np.testing.assert_allclose(out, y0, atol=1e-3)


def _slow_chain(denoise_fn, schedule, mu, cond, key, ts):
  key_init, key_steps = jax.random.split(key)
  y = mu + jax.random.normal(key_init, mu.shape)
  for t, t_prev in zip(ts[:-1], ts[1:]):
    noise = jax.random.normal(jax.random.fold_in(key_steps, t), y.shape)
    y, _ = diffusion.posterior_step(schedule, y, mu, denoise_fn(y, cond, t), t, t_prev, noise)
  return diffusion.predict_y0(schedule, y, mu, denoise_fn(y, cond, ts[-1]), ts[-1])


def test_scan_equals_python_loop_and_keys_matter():
  s = diffusion.linear_schedule(5)
  mu = jax.nn.softmax(jnp.arange(8.0).reshape(2, 4))
  denoise = lambda y, cond, t: jnp.tanh(y * 0.7 + cond) * (t + 1) / 5.0
  ts = diffusion.timestep_sequence("full", 5, 5)
  key = jax.random.PRNGKey(3)
  fast = jax.jit(lambda k: sampler.run_chain(denoise, s, mu, mu, k, ts))
  np.testing.assert_allclose(fast(key), _slow_chain(denoise, s, mu, mu, key, ts), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(fast(key), fast(key))
  assert not np.allclose(fast(key), fast(jax.random.PRNGKey(4)))
