"""`--mode summary`: parameter counts per component and FLOPs per image.

Counts come from `jax.eval_shape` (nothing is allocated). FLOPs come from XLA's cost analysis
of the lowered computations; loops are counted once by XLA, so the sampler's cost is composed
as guidance + ρ(x) + N × one denoiser step. They are the model's FLOPs with every convolution
counted as a direct one, whatever `model.conv_impl` computes it with (`direct_conv_config`).
"""

import copy

import jax
import jax.numpy as jnp
import ml_collections

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.nn import denoiser as denoiser_lib
from diffmic_jax.run import train_state
from diffmic_jax.training import train


def _count(tree) -> int:
  return models_lib.count_parameters(tree)


def parameter_counts(models, variables) -> dict:
  """{component: number of parameters} (BatchNorm scale/bias counted, statistics not)."""
  g = variables["guidance"]["params"]
  counts = {"guidance_total": _count(g)}
  for name, sub in g.items():
    counts[f"guidance/{name}"] = _count(sub)
  if "denoiser" in variables:
    d = variables["denoiser"]["params"]
    counts["denoiser_total"] = _count(d)
    encoder = ("encoder_net", "encoder_proj", "norm")
    counts["denoiser/rho_x"] = sum(_count(d[k]) for k in encoder)
    counts["denoiser/mlp"] = counts["denoiser_total"] - counts["denoiser/rho_x"]
    counts["denoiser/time_embeddings"] = sum(_count(d[f"lin{i}"]["embed"]) for i in (1, 2, 3))
  return counts


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def direct_conv_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose convolutions are all XLA's direct ones (`model.conv_impl=xla`).

  FLOPs are counted through it: Winograd (`fast_conv`) does fewer multiplications for the same
  layer and `auto` picks it per CPU kind, so a count taken through the configured
  implementation would change with the machine and fall below the model's work (paper
  configuration, inference at 100 steps: 24.5 against 27.3 GFLOP per image on an AMD CPU),
  and a FLOP floor computed from it would be too low. im2col and patch matmuls count as direct
  ones already; the parameters are the same under every implementation.
  """
  config = copy.deepcopy(config)
  config.model.conv_impl = "xla"
  return config


def flops_per_image(config, variables) -> dict:
  """XLA-counted FLOPs per image, convolutions as direct ones (`direct_conv_config`), of the
  guidance forward, ρ(x), one denoiser step, inference with the configured test sampler, and
  one joint training iteration (at `training.batch_size`)."""
  config = direct_conv_config(config)
  models = models_lib.create_models(config)
  b, size, c = 2, config.data.image_size, models.num_classes
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  vec = jax.ShapeDtypeStruct((b, c), jnp.float32)
  guidance = _flops(lambda v, x: models.guidance.apply(v, x, train=False),
                    variables["guidance"], images) / b
  out = {"guidance_forward": guidance}
  if models.denoiser is None:
    out["inference"] = guidance
    return out
  dvars = variables["denoiser"]
  width = c * models.denoiser.conditioning_width
  out["rho_x"] = _flops(lambda v, x: models.denoiser.apply(
      v, x, train=False, method=denoiser_lib.NoiseModel.encode), dvars, images) / b
  out["denoiser_step"] = _flops(lambda v, f, y, cond: models.denoiser.apply(
      v, f, y, cond, jnp.zeros([], jnp.int32), train=False,
      method=denoiser_lib.NoiseModel.denoise),
      dvars, jax.ShapeDtypeStruct((b, models.denoiser.feature_dim), jnp.float32), vec,
      jax.ShapeDtypeStruct((b, width), jnp.float32)) / b
  d = config.diffusion
  steps = len(diffusion.timestep_sequence(d.sampler, d.timesteps, d.test_steps))
  out["inference_sampler_steps"] = steps
  out["inference"] = guidance + out["rho_x"] + steps * out["denoiser_step"]
  out["training_joint_iteration"] = training_flops_per_image(config, "joint",
                                                             config.training.batch_size)
  return out


def training_flops_per_image(config, stage: str, batch: int) -> float:
  """XLA-counted FLOPs per image of one training step (`stage`: 'warmup' or 'joint', as
  `train.make_train_steps` names them) at `batch`, convolutions as direct ones."""
  config = direct_conv_config(config)
  models = models_lib.create_models(config)
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(config, steps_per_epoch=1)
  state = train_state.abstract_train_state(models, config)
  step = train.make_train_steps(models, config, guidance_tx, denoiser_tx, schedule, 0)[stage]
  size = config.data.image_size
  batch_spec = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return _flops(step, state, batch_spec) / batch


def model_summary(config: ml_collections.ConfigDict) -> dict:
  """The JSON object printed by `--mode summary`."""
  models = models_lib.create_models(config)
  variables = jax.eval_shape(lambda k: models_lib.init_variables(models, k, config.data.image_size),
                             jax.random.PRNGKey(0))
  return {"ablation": config.ablation, "num_classes": models.num_classes,
          "image_size": config.data.image_size,
          "parameters": parameter_counts(models, variables),
          "flops_per_image": flops_per_image(config, variables)}
