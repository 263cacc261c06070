"""The CARD diffusion math against REFERENCE.md §5 and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import sampler

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


def test_diffusion_draws_are_the_steps_documented_draws():
  """One key gives t (antithetic, from the key's second half) and one ε (its first half), the
  draws the joint step used before they became injectable: same key, same run."""
  key = jax.random.PRNGKey(3)
  draws = diffusion.diffusion_draws(key, 5, 7, 1000)
  assert set(draws) == {"t", "e"} and draws["e"].shape == (5, 7) and draws["t"].shape == (5,)
  t = np.asarray(draws["t"])
  np.testing.assert_array_equal(t[3:], 999 - t[:2])
  first, second = jax.random.split(key)
  np.testing.assert_array_equal(t, diffusion.antithetic_timesteps(second, 5, 1000))
  np.testing.assert_array_equal(draws["e"], jax.random.normal(first, (5, 7)))
  dropped = diffusion.diffusion_draws(key, 5, 7, 1000, cond_dropout=0.5)
  assert dropped["drop"].shape == (5,) and dropped["drop"].dtype == bool
  np.testing.assert_array_equal(dropped["e"], draws["e"])


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


def _posterior_reference(ab, t, t_prev, y_t, y0, mu):
  """q(y_{t_prev} | y_t, y₀) with prior mean μ, float64, from the joint Gaussian of the forward
  process (not from the γ coefficients): per class, y_s ~ N(√ᾱ_s·y₀ + (1 − √ᾱ_s)·μ, 1 − ᾱ_s)
  and y_t = √(ᾱ_t/ᾱ_s)·y_s + (1 − √(ᾱ_t/ᾱ_s))·μ + √(1 − ᾱ_t/ᾱ_s)·ε', so
  Cov(y_s, y_t) = √(ᾱ_t/ᾱ_s)·(1 − ᾱ_s), Var(y_t) = 1 − ᾱ_t, and conditioning gives
  mean = m_s + Cov/Var(y_t)·(y_t − m_t), var = Var(y_s) − Cov²/Var(y_t). Returns (mean, var)."""
  a_s, a_t = ab[t_prev], ab[t]
  m_s = np.sqrt(a_s) * y0 + (1 - np.sqrt(a_s)) * mu
  m_t = np.sqrt(a_t) * y0 + (1 - np.sqrt(a_t)) * mu
  cov = np.sqrt(a_t / a_s) * (1 - a_s)
  return m_s + cov / (1 - a_t) * (y_t - m_t), (1 - a_s) - cov**2 / (1 - a_t)


def _y0_from_eps(ab, t, y_t, mu, eps):
  """The y₀ that `q_sample` maps to y_t with noise eps (its definition inverted), float64."""
  return (y_t - (1 - np.sqrt(ab[t])) * mu - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])


@pytest.mark.parametrize("t,t_prev", [(1, 0), (57, 56), (500, 499), (999, 998),
                                      (999, 888), (100, 0), (57, 3)])
def test_posterior_step_is_the_gaussian_posterior(t, t_prev):
  s = diffusion.linear_schedule(1000)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  rng = np.random.default_rng(t + t_prev)
  y0 = np.eye(3)[[0, 2, 1, 1]] + 0.1 * rng.normal(size=(4, 3))  # near the one-hot simplex
  mu = rng.dirichlet(np.ones(3), size=4)
  noise, eps_error, z = (rng.normal(size=(4, 3)) for _ in range(3))
  y_t = np.sqrt(ab[t]) * y0 + (1 - np.sqrt(ab[t])) * mu + np.sqrt(1 - ab[t]) * noise
  eps = noise + 0.3 * eps_error  # an imperfect ε̂, so ŷ₀ ≠ y₀
  y0_hat = _y0_from_eps(ab, t, y_t, mu, eps)
  mean, var = _posterior_reference(ab, t, t_prev, y_t, y0_hat, mu)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  step = lambda noise: diffusion.posterior_step(s, f32(y_t), f32(mu), f32(eps), t, t_prev,
                                                f32(noise))
  out_mean, got_y0_hat = step(np.zeros_like(z))
  out = step(z)[0]
  # Float32 conditioning of the official formulas sets the tolerances: ŷ₀ divides by √ᾱ_t,
  # recomputed from √(1 − ᾱ_t) in float32 (at t = 999, √ᾱ = 0.006, 2e-3 relative, and |ŷ₀|
  # reaches 100 with this ε̂); at t = 1 the table's α_1 and ᾱ_1/ᾱ_0 differ by 3e-4 relative in β.
  np.testing.assert_allclose(got_y0_hat, y0_hat, rtol=3e-3, atol=1e-5)
  np.testing.assert_allclose(out_mean, mean, rtol=0, atol=2e-3 if t == 999 else 1e-4)
  # The step's standard deviation, read off the noise response, is the posterior's.
  np.testing.assert_allclose((np.asarray(out, np.float64) - out_mean) / z,
                             np.broadcast_to(np.sqrt(var), z.shape), rtol=1e-3)


def _numpy_chain(denoise_np, ab, mu, cond, ts, noises):
  """The reverse chain in float64 from the independent posterior: y = μ + z₀, then for each
  (t, t_prev) y ← mean + √var·z_t of q(y_{t_prev} | y, ŷ₀(ε̂)), and ŷ₀ at the last index."""
  y = mu + noises[0]
  for (t, t_prev), z in zip(zip(ts[:-1], ts[1:]), noises[1:]):
    y0 = _y0_from_eps(ab, t, y, mu, denoise_np(y, cond, t))
    mean, var = _posterior_reference(ab, t, t_prev, y, y0, mu)
    y = mean + np.sqrt(var) * z
  return _y0_from_eps(ab, ts[-1], y, mu, denoise_np(y, cond, ts[-1]))


# Respaced steps (t_prev < t − 1) then consecutive ones down to 0; and the official truncation.
@pytest.mark.parametrize("ts", [(300, 240, 180, 120, 60, 30, 10, 3, 2, 1, 0),
                                diffusion.timestep_sequence("official_truncated", 1000, 12)])
def test_chain_equals_float64_posterior_chain(ts):
  s = diffusion.linear_schedule(1000)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  rng = np.random.default_rng(1)
  mu = rng.dirichlet(np.ones(4), size=3)
  cond = rng.dirichlet(np.ones(4), size=3)
  # A non-oracle ε_θ of y_t and t: every step's output moves the final ŷ₀.
  denoise_np = lambda y, c, t: np.tanh(0.7 * y - c) * (1 + t / 1000)
  denoise = lambda y, c, t: jnp.tanh(0.7 * y - c) * (1 + t / 1000)
  key = jax.random.PRNGKey(7)
  # run_chain's noise: z₀ from the first split key, z_t from fold_in(second key, t).
  key_init, key_steps = jax.random.split(key)
  noises = [jax.random.normal(key_init, mu.shape)] + [
      jax.random.normal(jax.random.fold_in(key_steps, t), mu.shape) for t in ts[:-1]]
  noises = [np.asarray(n, np.float64) for n in noises]
  expected = _numpy_chain(denoise_np, ab, mu, cond, ts, noises)
  got = sampler.run_chain(denoise, s, jnp.asarray(mu, jnp.float32), jnp.asarray(cond, jnp.float32),
                          key, ts)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
