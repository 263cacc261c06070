"""The jitted sampler over real (tiny) models: shapes, determinism, several samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import models
from diffmic_jax.diffusion import sampler


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
  # The prediction is the samples' vote: its vote share is the largest (hand count in numpy).
  votes = np.eye(4)[np.asarray(out["y0"]).argmax(-1)].mean(1)
  pred = np.asarray(out["prediction"])
  np.testing.assert_allclose(votes[np.arange(3), pred], votes.max(1))
  np.testing.assert_allclose(out["vote_probs"], votes, atol=1e-7)


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


def test_clip_bounds_y0_inside_the_posterior_step():
  """A clipped ŷ₀ enters the mean exactly as an unclipped step whose ŷ₀ equals the bound."""
  s = diffusion.linear_schedule(100)
  t, t_prev = 60, 59
  ab = float(s.alphas_cumprod[t])
  y_t = jnp.array([[0.3, -0.2, 0.9]])
  mu = jnp.array([[0.5, 0.3, 0.2]])
  z = jnp.array([[0.1, -0.4, 0.2]])

  def eps_for(y0):  # the ε̂ for which predict_y0 returns y0 (inverse of q_sample).
    return (y_t - np.sqrt(ab) * y0 - (1 - np.sqrt(ab)) * mu) / np.sqrt(1 - ab)

  wild = jnp.array([[7.0, -5.0, 0.5]])
  bounded = jnp.array([[2.0, -2.0, 0.5]])
  y_clip, y0_clip = diffusion.posterior_step(s, y_t, mu, eps_for(wild), t, t_prev, z, clip=2.0)
  y_ref, y0_ref = diffusion.posterior_step(s, y_t, mu, eps_for(bounded), t, t_prev, z)
  np.testing.assert_allclose(y0_clip, bounded, atol=1e-4)
  np.testing.assert_allclose(y_clip, y_ref, atol=1e-5)
  _, y0_off = diffusion.posterior_step(s, y_t, mu, eps_for(wild), t, t_prev, z)
  np.testing.assert_allclose(y0_off, wild, atol=1e-3)  # clip=0: unchanged (official)


def test_clip_stops_a_diverging_chain():
  """ε̂ = −3·y_t (an untrained, self-reinforcing denoiser) blows the full T=1000 chain up to
  |ŷ₀| ≫ 1; with clip_y0 = 2 every ŷ₀ and the output stay within [−2, 2]."""
  s = diffusion.linear_schedule(1000)
  mu = jnp.full((4, 3), 1 / 3)
  ts = diffusion.timestep_sequence("full", 1000, 0)
  denoise = lambda y, cond, t: -3.0 * y
  key = jax.random.PRNGKey(0)
  wild = sampler.run_chain(denoise, s, mu, mu, key, ts)
  tame = sampler.run_chain(denoise, s, mu, mu, key, ts, clip=2.0)
  assert float(jnp.max(jnp.abs(wild))) > 100.0
  assert float(jnp.max(jnp.abs(tame))) <= 2.0
  assert np.all(np.isfinite(np.asarray(tame)))

  # Every step, not only the output, is clipped: the same chain driven by the ε̂ whose ŷ₀ is
  # the clipped one (inverse of q_sample) gives the same result without the switch.
  def clipped_denoise(y, cond, t):
    ab = s.alphas_cumprod[t]
    y0 = jnp.clip(diffusion.predict_y0(s, y, mu, denoise(y, cond, t), t), -2.0, 2.0)
    return (y - jnp.sqrt(ab) * y0 - (1 - jnp.sqrt(ab)) * mu) / jnp.sqrt(1 - ab)

  reference = jnp.clip(sampler.run_chain(clipped_denoise, s, mu, mu, key, ts), -2.0, 2.0)
  np.testing.assert_allclose(tame, reference, atol=1e-3)


def test_negative_clip_is_refused(tiny_config):
  config = tiny_config()
  config.diffusion.clip_y0 = -1.0
  with pytest.raises(ValueError, match="diffusion.clip_y0"):
    models.create_models(config)


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


def test_bfloat16_sampler_weights_give_an_image_the_same_chain_alone_or_in_a_batch(tiny_config):
  """diffusion.sampler_weights='bfloat16': one image (one chain or several) runs `bf16_matvec`
  on the bfloat16 kernels, a batch the same rounded kernels in float32; row 0 draws the same
  noise in both (partitionable threefry)."""
  config = tiny_config()
  config.diffusion.sampler_weights = "bfloat16"
  rounded = models.create_models(config)
  assert rounded.sampler_weights == "bfloat16"
  exact = rounded._replace(sampler_weights="float32")
  variables = jax.jit(models.init_variables, static_argnums=(0, 2))(rounded, jax.random.PRNGKey(0),
                                                                    32)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  key = jax.random.PRNGKey(5)
  for num_samples in (1, 3):  # one chain, and vmapped chains (predict's)
    def run(bundle, x, num_samples=num_samples):
      return sampler.make_sample_fn(bundle, "official_truncated", 6, num_samples)(variables, x,
                                                                                  key)
    alone, batch, float32 = run(rounded, images[:1]), run(rounded, images), run(exact, images[:1])
    np.testing.assert_allclose(alone["y0"][0], batch["y0"][0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(alone["y0"], float32["y0"], rtol=1e-5, atol=1e-5)
  config.diffusion.sampler_weights = "int8"
  with pytest.raises(ValueError, match="diffusion.sampler_weights"):
    models.create_models(config)
