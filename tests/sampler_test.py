"""The jitted sampler over real (tiny) models: shapes, determinism, several samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax import diffusion
from diffmic_jax import models
from diffmic_jax import sampler


@pytest.fixture(scope="module")
def tiny(tiny_config):
  bundle = models.create_models(tiny_config())
  variables = jax.jit(models.init_variables, static_argnums=(0, 2))(bundle, jax.random.PRNGKey(0),
                                                                    32)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  return bundle, variables, images


def test_sample_is_a_jittable_pure_function(tiny):
  bundle, variables, images = tiny
  ts = diffusion.timestep_sequence("official_truncated", bundle.num_timesteps, 5)
  fn = jax.jit(functools.partial(sampler.sample, bundle, timesteps=ts, num_samples=1))
  out = fn(variables, images, jax.random.PRNGKey(0))
  assert out["y0"].shape == (3, 1, 4) and out["probs"].shape == (3, 4)
  np.testing.assert_array_equal(out["prediction"], jnp.argmax(out["y0"][:, 0], -1))
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
  again = fn(variables, images, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out["y0"], again["y0"])
  other = fn(variables, images, jax.random.PRNGKey(1))
  assert not np.allclose(out["y0"], other["y0"])


def test_several_samples_are_returned_and_averaged(tiny):
  bundle, variables, images = tiny
  fn = sampler.make_sample_fn(bundle, "respaced", 4, num_samples=3)
  out = fn(variables, images, jax.random.PRNGKey(0))
  assert out["y0"].shape == (3, 3, 4)
  assert not np.allclose(out["y0"][:, 0], out["y0"][:, 1])
  np.testing.assert_allclose(out["probs"], jax.nn.softmax(out["y0"], -1).mean(1), rtol=1e-5)
  np.testing.assert_array_equal(out["prediction"], jnp.argmax(out["probs"], -1))


def test_sampler_matches_official_per_step_encoder(tiny):
  """Caching ρ(x) changes nothing: a chain that recomputes it every step (official) agrees."""
  bundle, variables, images = tiny
  ts = diffusion.timestep_sequence("full", bundle.num_timesteps, bundle.num_timesteps)
  key = jax.random.PRNGKey(5)
  fast = sampler.sample(bundle, variables, images, key, timesteps=ts)["y0"][:, 0]
  logits, _ = sampler.guidance_outputs(bundle, variables, images)
  mu, cond = models.stream_inputs(bundle, logits)["fused"]
  official = lambda y, c, t: bundle.denoiser.apply(variables["denoiser"], images, y, c, t,
                                                   train=False)
  chain_key = jax.random.split(key, 1)[0]
  slow = sampler.run_chain(official, bundle.schedule(), mu, cond, chain_key, ts)
  np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_trajectory_ends_at_the_samplers_y0(tiny):
  """The trajectory variant runs the same chain: its ŷ₀ is `sample`'s (S = 1, same key)."""
  bundle, variables, images = tiny
  ts = diffusion.timestep_sequence("respaced", bundle.num_timesteps, 4)
  key = jax.random.PRNGKey(3)
  out = sampler.sample_trajectory(bundle, variables, images, key, timesteps=ts)
  assert out["trajectory"].shape == (len(ts), 3, 4)
  reference = sampler.sample(bundle, variables, images, key, timesteps=ts)
  np.testing.assert_allclose(out["y0"], reference["y0"][:, 0], rtol=1e-5, atol=1e-6)
  # Between steps the states move (a constant trajectory would be no chain at all).
  assert not np.allclose(out["trajectory"][0], out["trajectory"][-1])
