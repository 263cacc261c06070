"""`--mode summary`: parameter counts of a tiny model against a hand count."""

import json

from diffmic_jax import summary

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
