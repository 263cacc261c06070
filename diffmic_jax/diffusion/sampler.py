"""The CARD reverse process as one pure, jittable function over explicit variables.

    sample_fn = jax.jit(functools.partial(sampler.sample, models, timesteps=ts, num_samples=1))
    out = sample_fn(variables, images, key)

The guidance model and ρ(x) run once per batch; the chain is one `lax.scan`; several samples
per image are vmapped over keys.
"""

import functools

import jax
import jax.numpy as jnp

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.nn import denoiser as denoiser_lib


def image_denoiser(models, variables, images, num_samples: int = 1):
  """ρ(x) of `images` [B, H, W, 3], computed once, and ε_θ(y_t, ŷ, t) on those features: the
  `denoise_fn(y [B, C], cond [B, C·k], t)` that the chains call at every step (`num_samples`
  chains per image, vmapped by the caller)."""
  dvars = variables["denoiser"]
  features = models.denoiser.apply(dvars, images, train=False,
                                   method=denoiser_lib.NoiseModel.encode)
  # Once per call, outside the chain's scan: BatchNorm folded, the weights (and ρ(x)) in the
  # layout fastest for B × S rows (`denoiser.sampling_layout`).
  layout = denoiser_lib.sampling_layout(images.shape[0], num_samples, models.sampler_weights)
  folded = denoiser_lib.fold_for_sampling(dvars, models.denoiser.dtype, layout,
                                          models.sampler_weights)
  features = features.T if layout == "feature_major" else features

  def denoise_fn(y, cond, t):
    return denoiser_lib.denoise_folded(folded, features, y, cond, t, layout)

  return denoise_fn


def run_chain(denoise_fn, schedule, prior_mean, conditioning, key, timesteps, clip: float = 0.0):
  """One reverse chain for a batch.

  Args:
    denoise_fn: (y_t [B, C], conditioning, t []) -> ε̂ [B, C].
    schedule: the noise schedule.
    prior_mean: [B, C] μ; the chain starts at y = μ + z.
    conditioning: [B, ·] ŷ fed to the denoiser.
    key: PRNG key.
    timesteps: descending schedule indices ending at 0 (`diffusion.timestep_sequence`).
    clip: ŷ₀ clip bound of every step and of the output (`diffusion.clip_y0`); 0 = off.

  Returns:
    [B, C] ŷ₀.
  """
  return run_chain_trajectory(denoise_fn, schedule, prior_mean, conditioning, key, timesteps,
                              clip)[1]


def guidance_outputs(models, variables, images):
  """Eval-mode guidance forward: (logits {'fused','global','local'} [B, C], aux)."""
  return models.guidance.apply(variables["guidance"], images, train=False)


def sample(models: models_lib.Models, variables, images, key, *, timesteps, num_samples: int = 1):
  """Classifies a batch with the DiffMIC reverse process.

  Args:
    models: the static model bundle (`models.create_models`).
    variables: {'guidance': ..., 'denoiser': ...} Flax variables.
    images: [B, H, W, 3] normalised images.
    key: PRNG key; the same key gives the same output.
    timesteps: descending indices (`diffusion.timestep_sequence`), a static tuple.
    num_samples: S reverse chains per image.

  Returns:
    {'y0': [B, S, C] ŷ₀ of every sample, 'probs': [B, C] mean over samples of softmax(ŷ₀),
     'prediction': [B] the samples' vote, ties broken by 'probs' (`vote_prediction`; = argmax
     ŷ₀ for S = 1), 'entropy': [B] entropy of 'probs' (close to ln C whenever ŷ₀ stays near
     the simplex's centre, so it says little; prefer 'vote_entropy'), 'guidance_logits':
     {'fused','global','local'} [B, C], the uncertainty scores of `sample_uncertainty`
     ('vote_probs', 'agreement', 'vote_entropy', 'y0_interval', 'interval_separated') and
     'guidance_aux'
     (`explanation_aux`: the DCG's CAM, ROI positions and attention weights)}. Without a
     denoiser (ablation 'basic') 'y0' holds the classifier logits.
  """
  logits, aux = guidance_outputs(models, variables, images)
  if models.denoiser is None:
    y0 = logits["fused"][:, None, :]
  else:
    prior_mean, conditioning = models_lib.stream_inputs(models, logits)["fused"]
    denoise_fn = image_denoiser(models, variables, images, num_samples)
    chain = functools.partial(run_chain, denoise_fn, models.schedule(), prior_mean, conditioning,
                              timesteps=timesteps, clip=models.clip_y0)
    y0 = jnp.moveaxis(jax.vmap(chain)(jax.random.split(key, num_samples)), 0, 1)
  probs = jnp.mean(jax.nn.softmax(y0, axis=-1), axis=1)
  prediction = vote_prediction(votes(y0), probs)
  return {"y0": y0, "probs": probs, "prediction": prediction,
          "entropy": entropy(probs), "guidance_logits": logits,
          **sample_uncertainty(y0, prediction), "guidance_aux": explanation_aux(aux)}


def votes(y0):
  """[B, C] fraction of the S samples of ŷ₀ [B, S, C] whose argmax is each class."""
  return jnp.mean(jax.nn.one_hot(jnp.argmax(y0, axis=-1), y0.shape[-1]), axis=1)


def vote_prediction(vote_probs, probs):
  """The prediction rule: the class most samples vote for, a tie going to the class with the
  larger mean softmax. For S = 1 it is the official argmax ŷ₀.

  Args:
    vote_probs: [B, C] vote shares (`votes`); probs: [B, C] mean softmax. jax or numpy arrays.

  Returns:
    [B] class indices; the predicted class always holds the largest vote share.
  """
  top = vote_probs == vote_probs.max(axis=-1, keepdims=True)
  return ((probs + 2.0) * top).argmax(axis=-1)  # probs <= 1 < 2: only the top votes compete


def entropy(p):
  """[B] entropy (nats) of the rows of [B, C] distributions, with 0 · log 0 = 0."""
  # Σ p log p <= 0: its absolute value, not its negation, so that a certain row (a unanimous
  # vote) has entropy +0.0 rather than -0.0, which every report printed as '-0.000000'.
  return jnp.abs(jnp.sum(p * jnp.log(jnp.clip(p, 1e-12, 1.0)), axis=-1))


# The guidance model's intermediates that explain a decision (`dcg.DCG` returns all three;
# the ablations' plain classifier none).
EXPLANATION_KEYS = ("cam", "roi_positions", "attention")


def explanation_aux(aux: dict) -> dict:
  """{'cam': [B, h, w, C], 'roi_positions': [B, K, 2], 'attention': [B, K]} where present."""
  return {k: aux[k] for k in EXPLANATION_KEYS if k in aux}


def sample_uncertainty(y0, prediction, interval=(2.5, 97.5)) -> dict:
  """Uncertainty of a prediction from S reverse samples (CARD's sample statistics).

  Args:
    y0: [B, S, C] ŷ₀ of every sample.
    prediction: [B] predicted class k.
    interval: percentiles of the per-class interval of ŷ₀ over the samples.

  Returns:
    'vote_probs': [B, C] fraction of the S samples whose argmax ŷ₀ is each class (`votes`);
    'agreement': [B] the largest vote fraction (1 = every sample agrees): the vote share of
    the prediction of `vote_prediction`;
    'vote_entropy': [B] entropy of 'vote_probs' (0 = unanimous, ln min(S, C) = evenly split);
    'y0_interval': [B, 2, C] lower and upper percentile of ŷ₀_c over the samples;
    'interval_separated': [B] bool, the predicted class's interval lies entirely above every
    other class's (CARD's PICP-style check; never for S = 1, whose interval is a point, unless
    the point values differ).
  """
  num_classes = y0.shape[-1]
  vote_probs = votes(y0)
  bounds = jnp.moveaxis(jnp.percentile(y0, jnp.asarray(interval), axis=1), 0, 1)  # [B, 2, C]
  chosen = jax.nn.one_hot(prediction, num_classes, dtype=bool)
  lower_chosen = jnp.sum(jnp.where(chosen, bounds[:, 0], 0.0), axis=-1)
  upper_others = jnp.max(jnp.where(chosen, -jnp.inf, bounds[:, 1]), axis=-1)
  return {"vote_probs": vote_probs, "agreement": jnp.max(vote_probs, axis=-1),
          "vote_entropy": entropy(vote_probs),
          "y0_interval": bounds, "interval_separated": lower_chosen > upper_others}


def make_sample_fn(models, sampler: str, num_steps: int, num_samples: int = 1,
                   compiler_options: dict | None = None):
  """A jitted `(variables, images, key) -> sample(...)` for a named sampler and N steps.

  compiler_options: passed to `jax.jit`; `fast_conv.compiler_options()` gives the CPU
  convolutions that `evaluate` and the benchmark use. JAX accepts options only on a top-level
  jit, so leave it None for a sampler called inside your own `jax.jit`.
  """
  timesteps = diffusion.timestep_sequence(sampler, models.num_timesteps, num_steps)
  return jax.jit(functools.partial(sample, models, timesteps=timesteps, num_samples=num_samples),
                 compiler_options=compiler_options)


def run_chain_trajectory(denoise_fn, schedule, prior_mean, conditioning, key, timesteps,
                         clip: float = 0.0):
  """`run_chain` that also returns every intermediate y_t (for plots of the reverse process).

  Same arguments and the same noise as `run_chain`, which is this function without the
  trajectory ([N, B, C]: small next to the denoiser's activations).

  Returns:
    ([N, B, C] y at each of the N timesteps, the first being the initial μ + z, [B, C] ŷ₀).
  """
  ts = jnp.asarray(timesteps, jnp.int32)
  key_init, key_steps = jax.random.split(key)
  y = prior_mean + jax.random.normal(key_init, prior_mean.shape, prior_mean.dtype)

  def step(y, t_pair):
    t, t_prev = t_pair
    noise = jax.random.normal(jax.random.fold_in(key_steps, t), y.shape, y.dtype)
    eps = denoise_fn(y, conditioning, t)
    y_prev, _ = diffusion.posterior_step(schedule, y, prior_mean, eps, t, t_prev, noise, clip=clip)
    return y_prev, y

  y, earlier = jax.lax.scan(step, y, (ts[:-1], ts[1:]))
  eps = denoise_fn(y, conditioning, ts[-1])
  trajectory = jnp.concatenate([earlier, y[None]], axis=0)
  return trajectory, diffusion.clip_y0(diffusion.predict_y0(schedule, y, prior_mean, eps, ts[-1]),
                                      clip)


def sample_trajectory(models: models_lib.Models, variables, images, key, *, timesteps):
  """One reverse chain per image with its intermediate states (the paper's Fig. 2).

  Uses the key of the first chain of `sample(..., num_samples=1)`, so 'y0' equals that
  call's ŷ₀.

  Returns:
    {'trajectory': [N, B, C] y_t at `timesteps` (from noise towards ŷ₀), 'y0': [B, C],
     'prior_mean': [B, C] μ}.
  """
  if models.denoiser is None:
    raise ValueError("sample_trajectory needs a diffusion model (ablation 'basic' has none)")
  logits, _ = guidance_outputs(models, variables, images)
  prior_mean, conditioning = models_lib.stream_inputs(models, logits)["fused"]
  denoise_fn = image_denoiser(models, variables, images)
  trajectory, y0 = run_chain_trajectory(denoise_fn, models.schedule(), prior_mean, conditioning,
                                        jax.random.split(key, 1)[0], timesteps,
                                        models.clip_y0)
  return {"trajectory": trajectory, "y0": y0, "prior_mean": prior_mean}
