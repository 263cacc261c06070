"""`--mode summary`: parameter counts of a tiny model against a hand count."""

import json

import jax
import jax.numpy as jnp

from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.training import summary

# configs/test.py's trunk: ResNet-18 blocks, stage_sizes (1, 1), width 8, on RGB.
_STEM = 7 * 7 * 3 * 8 + 2 * 8  # 7x7 conv (bias-free) + BatchNorm scale and bias
_LAYER1 = 2 * (3 * 3 * 8 * 8) + 2 * (2 * 8)  # basic block 8 -> 8: two 3x3 convs, two BNs
_LAYER2 = 3 * 3 * 8 * 16 + 3 * 3 * 16 * 16 + 1 * 1 * 8 * 16 + 3 * (2 * 16)  # 8 -> 16, stride 2
TRUNK = _STEM + _LAYER1 + _LAYER2  # 6,056; pooled features: 16
C, F, STEPS = 4, 32, 10 + 1  # classes, feature_dim, T + 1 rows of each γ table
RHO_X = TRUNK + (16 * F + F) + 2 * F  # trunk, projection to F, BN₀
EMBED = STEPS * F
MLP = ((2 * C) * F + F + EMBED) + 2 * (F * F + F + EMBED) + 3 * (2 * F) + (F * C + C)


def test_parameter_counts_of_a_tiny_model_match_a_hand_count(tiny_config):
  config = tiny_config()
  config.ablation = "c1"  # plain ResNet classifier guidance + the denoiser
  out = summary.model_summary(config)
  assert out["parameters"] == {
      "guidance_total": TRUNK + 16 * C + C, "guidance/net": TRUNK, "guidance/fc": 16 * C + C,
      "denoiser_total": RHO_X + MLP, "denoiser/rho_x": RHO_X, "denoiser/mlp": MLP,
      "denoiser/time_embeddings": 3 * EMBED}
  flops = out["flops_per_image"]
  assert min(flops["guidance_forward"], flops["rho_x"], flops["denoiser_step"]) > 0
  assert flops["inference_sampler_steps"] == config.diffusion.test_steps
  assert flops["inference"] == (flops["guidance_forward"] + flops["rho_x"]
                                + flops["inference_sampler_steps"] * flops["denoiser_step"])
  json.dumps(out)  # what --mode summary prints


def test_flops_count_every_convolution_as_a_direct_one(tiny_config):
  """The FLOPs are the model's, not the convolution algorithm's: Winograd computes the same
  3x3 layers with fewer multiplications, and a count taken through it would lower the FLOP
  floor that `experiments/speed/benchmark.py` compares against (and change with the CPU kind,
  since `auto` picks per CPU)."""
  direct, winograd = tiny_config(), tiny_config()
  direct.model.conv_impl, winograd.model.conv_impl = "xla", "winograd"
  counted = summary.model_summary(winograd)["flops_per_image"]
  assert counted == summary.model_summary(direct)["flops_per_image"]

  # The check can fail: through Winograd itself XLA counts fewer FLOPs for the same forward.
  models = models_lib.create_models(winograd)
  size = winograd.data.image_size
  variables = jax.eval_shape(lambda k: models_lib.init_variables(models, k, size),
                             jax.random.PRNGKey(0))
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  through_winograd = jax.jit(lambda v, x: models.guidance.apply(v, x, train=False)).lower(
      variables["guidance"], images).cost_analysis()["flops"] / 2
  assert through_winograd < counted["guidance_forward"]


def test_training_flops_do_not_depend_on_the_convolution_algorithm(tiny_config):
  direct, winograd = tiny_config(), tiny_config()
  direct.model.conv_impl, winograd.model.conv_impl = "xla", "winograd"
  for stage in ("warmup", "joint"):
    assert (summary.training_flops_per_image(winograd, stage, 4)
            == summary.training_flops_per_image(direct, stage, 4) > 0)
