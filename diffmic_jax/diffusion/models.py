"""The one place where configuration becomes model constructor arguments.

`create_models(config)` returns a `Models` bundle of Flax modules and static diffusion
settings; `init_variables` initialises them. Modules never see the config.
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import losses
from diffmic_jax.nn import dcg
from diffmic_jax.nn import denoiser
from diffmic_jax.nn import resnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Paper Table 2: which guidance model, whether the diffusion head exists, whether MMD is on.
# 'dcg' (not in the paper) is the DCG trained alone with its cross-entropy, selected on its own
# validation score: the guidance model as a classifier in its own right.
ABLATIONS = {
    "basic": {"guidance": "classifier", "diffusion": False, "mmd": False},
    "dcg": {"guidance": "dcg", "diffusion": False, "mmd": False},
    "c1": {"guidance": "classifier", "diffusion": True, "mmd": False},
    "c2": {"guidance": "dcg", "diffusion": True, "mmd": False},
    "full": {"guidance": "dcg", "diffusion": True, "mmd": True},
}
PRIORS = diffusion.PRIORS
CONDITIONINGS = diffusion.CONDITIONINGS
# The guidance heads each guidance model reports, as {report name: logits key} pairs.
GUIDANCE_HEADS = {
    "dcg": (("dcg_fused", "fused"), ("dcg_global", "global"), ("dcg_local", "local")),
    "classifier": (("classifier", "fused"),),  # its three logits are one classifier's
}


class Classifier(nn.Module):
  """A plain ResNet classifier with the DCG's output interface (ablations 'basic', 'c1')."""

  num_classes: int
  backbone: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pooled, aux = resnet.ResNet(dtype=self.dtype, name="net", **dict(self.backbone))(x, train)
    logits = nn.Dense(self.num_classes, name="fc")(pooled)
    return {"fused": logits, "global": logits, "local": logits}, aux


class Models(NamedTuple):
  """Static model bundle: hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    guidance: the DCG (or the ablations' plain classifier): x -> (logits dict, aux).
    denoiser: ε_θ with ρ(x), or None for the 'basic' and 'dcg' ablations.
    num_timesteps, beta_start, beta_end: the linear schedule.
    prior: 'fused' (μ = softmax(y_fused), official) or 'zero' (μ = 0, --noise_prior).
    conditioning: 'prior' ([y_t, ŷ], official) or 'dual' ([y_t, ŷ_g, ŷ_l], the paper).
    mmd_weight: λ (0 when the ablation has no MMD).
    mmd_kernel: 'gaussian' or 'multi'.
    num_classes: C.
    schedule_dtype: 'float32' (the official tables, bit for bit) or 'float64'.
    guidance_heads: ((report name, logits key), ...) of the guidance model (`GUIDANCE_HEADS`).
    clip_y0: bound on ŷ₀ inside the reverse chain (0 = off, the official behaviour).
    cond_dropout: probability that training hides the conditioning ŷ (replaced by 1/C).
    sampler_weights: the sampler's copy of the denoiser's dense kernels, a
      `denoiser.WEIGHT_FORMATS` entry ('bfloat16': rounded, for one image's speed on CPU).
  """

  guidance: nn.Module
  denoiser: Optional[nn.Module]
  num_timesteps: int
  beta_start: float
  beta_end: float
  prior: str
  conditioning: str
  mmd_weight: float
  mmd_kernel: str
  num_classes: int
  schedule_dtype: str = "float32"
  guidance_heads: tuple = GUIDANCE_HEADS["dcg"]
  clip_y0: float = 0.0
  cond_dropout: float = 0.0
  sampler_weights: str = "float32"

  def schedule(self) -> diffusion.Schedule:
    return diffusion.linear_schedule(self.num_timesteps, self.beta_start, self.beta_end,
                                     self.schedule_dtype)


def _choice(value, options, field):
  if value not in options:
    raise ValueError(f"config.{field}={value!r} is not valid; choose from {sorted(options)}")
  return value


def backbone_kwargs(name, width, stage_sizes, conv_impl, bn_running_var):
  """resnet.ResNet kwargs as a hashable tuple of (name, value) pairs."""
  kwargs = resnet.resnet_kwargs(name, stage_sizes)
  kwargs.update(width=int(width), conv_impl=conv_impl,
                unbiased_running_var=(bn_running_var == "unbiased"))
  return tuple(sorted(kwargs.items()))


def create_models(config: ml_collections.ConfigDict) -> Models:
  """Maps the config to a `Models` bundle, validating every choice field."""
  ablation = ABLATIONS[_choice(config.ablation, ABLATIONS, "ablation")]
  dtype = DTYPES[_choice(config.model.dtype, DTYPES, "model.dtype")]
  _choice(config.model.bn_running_var, ("unbiased", "biased"), "model.bn_running_var")
  _choice(config.model.conv_impl, ("auto", "xla", "im2col", "patches", "winograd"),
          "model.conv_impl")
  num_classes = int(config.data.num_classes)
  if num_classes < 2:
    raise ValueError(f"config.data.num_classes must be >= 2, got {num_classes}")
  g, m = config.guidance, config.model
  common = dict(conv_impl=m.conv_impl, bn_running_var=m.bn_running_var)
  def guidance_trunk():
    return backbone_kwargs(_choice(g.backbone, ("resnet18", "resnet50"), "guidance.backbone"),
                           g.width, g.stage_sizes, **common)

  if ablation["guidance"] == "dcg":
    trunk = guidance_trunk()
    guidance = dcg.DCG(num_classes, trunk, trunk, num_rois=g.num_rois, crop_size=g.crop_size,
                       crop_channels=_choice(g.crop_channels, ("first", "all"), "guidance.crop_channels"),
                       top_t_percent=g.top_t_percent, attention_dim=g.attention_dim,
                       fusion_weight=g.fusion_weight, dtype=dtype)
  elif _choice(m.classifier_trunk, ("encoder", "guidance"), "model.classifier_trunk") == "encoder":
    # The paper's ablation baseline is a ResNet-18 classifier, built like rho(x)'s trunk.
    guidance = Classifier(num_classes, backbone_kwargs(m.encoder, m.encoder_width,
                                                       m.encoder_stage_sizes, **common), dtype)
  else:  # built like the DCG's trunks, so that it can start from the same pretrained trunk.
    guidance = Classifier(num_classes, guidance_trunk(), dtype)
  mmd_weight = float(config.diffusion.mmd_weight) if ablation["mmd"] else 0.0
  noise_model = None
  if ablation["diffusion"]:
    # The official code runs rho(x) once per noising stream, so its BatchNorm running
    # statistics take one momentum update per stream; ours runs it once per step, and the
    # equivalent momentum is 0.9 ** num_streams.
    encoder_momentum = 0.9 ** (3 if mmd_weight > 0 else 1)
    encoder = dict(backbone_kwargs(m.encoder, m.encoder_width, m.encoder_stage_sizes, **common))
    encoder["bn_momentum"] = encoder_momentum
    noise_model = denoiser.NoiseModel(
        num_classes, config.diffusion.timesteps, m.feature_dim, tuple(sorted(encoder.items())),
        encoder_bn_momentum=encoder_momentum,
        conditioning_width=CONDITIONINGS[_choice(m.conditioning, CONDITIONINGS, "model.conditioning")],
        unbiased_running_var=(m.bn_running_var == "unbiased"), dtype=dtype)
  d = config.diffusion
  return Models(guidance, noise_model, int(d.timesteps), float(d.beta_start), float(d.beta_end),
                _choice(d.prior, PRIORS, "diffusion.prior"), m.conditioning,
                mmd_weight,
                _choice(d.mmd_kernel, losses.KERNELS, "diffusion.mmd_kernel"), num_classes,
                _choice(d.schedule_dtype, diffusion.SCHEDULE_DTYPES, "diffusion.schedule_dtype"),
                GUIDANCE_HEADS[ablation["guidance"]], _clip_bound(d.clip_y0),
                _probability(m.cond_dropout, "model.cond_dropout"),
                _choice(d.sampler_weights, denoiser.WEIGHT_FORMATS, "diffusion.sampler_weights"))


def _probability(value, field) -> float:
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(f"config.{field}={value!r} must be in [0, 1)")
  return float(value)


def _clip_bound(value) -> float:
  if float(value) < 0:
    raise ValueError(f"config.diffusion.clip_y0={value!r} must be >= 0 (0 = no clipping)")
  return float(value)


def init_variables(models: Models, key, image_size: int, batch_size: int = 2):
  """Initialises {'guidance': {...}, 'denoiser': {...}} variables (denoiser absent for 'basic')."""
  k_guidance, k_denoiser = jax.random.split(key)
  x = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
  variables = {"guidance": models.guidance.init(k_guidance, x, train=False)}
  if models.denoiser is not None:
    c = models.num_classes
    y = jnp.zeros((batch_size, c), jnp.float32)
    cond = jnp.zeros((batch_size, c * models.denoiser.conditioning_width), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    variables["denoiser"] = models.denoiser.init(k_denoiser, x, y, cond, t, train=False)
  return variables


def count_parameters(params) -> int:
  """Number of scalars in a params pytree (BatchNorm scale/bias included, statistics not)."""
  return int(sum(p.size for p in jax.tree.leaves(params)))


def stream_inputs(models: Models, logits: dict) -> dict:
  """`diffusion.stream_inputs` with the bundle's prior and conditioning switches."""
  return diffusion.stream_inputs(models.prior, models.conditioning, logits)
