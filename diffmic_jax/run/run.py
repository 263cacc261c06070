"""A run: the validated config and what is built from it for training and evaluation.

`validate_config` checks the whole config once, up front, against the modules' registries;
`prepare` builds the splits, models, mesh and checkpointer of a workdir (`Run`), shared by
`train` and `evaluate`; `eval_key` is the PRNG key of evaluation and prediction.
"""

from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging

from diffmic_jax.data import input_pipeline
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.diffusion import diffusion
from diffmic_jax.diffusion import losses
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.platform import distributed
from diffmic_jax.platform import errors
from diffmic_jax.platform import profiling
from diffmic_jax.platform import sharding
from diffmic_jax.run import checkpointing
from diffmic_jax.run import metrics
from diffmic_jax.run import optim


class Run(NamedTuple):
  """What training and evaluation build from a config and a workdir (besides the state)."""

  config: ml_collections.ConfigDict
  workdir: str
  models: models_lib.Models
  splits: Any
  mesh: Any
  checkpointer: checkpointing.Checkpointer
  steps_per_epoch: int
  eval_key: jax.Array


def prepare(config, workdir) -> Run:
  """Builds the data, models, mesh and checkpointer shared by training and evaluation."""
  distributed.initialize(config.training.distributed)  # main.py already did, when it runs us
  validate_config(config, shapes=False)  # training checked the shapes before any record
  mesh = sharding.make_mesh()
  # Checked against the run's split.json here, written only once training is accepted. With
  # several processes, process 0 prepares a dataset that is not built yet before the others
  # read it.
  with distributed.primary_first("dataset"):
    splits = input_pipeline.create_splits(config.data, workdir, write=False)
  models = models_lib.create_models(config)
  global_batch = config.training.batch_size
  sharding.check_batch_size(global_batch, mesh, "training.batch_size")
  steps_per_epoch = input_pipeline.steps_per_epoch(len(splits.train), global_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"config.training.batch_size={global_batch} exceeds the {len(splits.train)} "
                     "training examples")
  checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
  return Run(config, workdir, models, splits, mesh, checkpointer, steps_per_epoch,
             eval_key(config))


def eval_key(config) -> jax.Array:
  """The PRNG key of evaluation and prediction (batch i uses fold_in(key, i)), from the seed."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x0E7A1)


def _check_range(value, low, high, field, low_open=False, high_open=True):
  """Raises naming config.<field> unless low <(=) value <(=) high."""
  above = value > low if low_open else value >= low
  below = value < high if high_open else value <= high
  if not (above and below):
    bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise errors.UserError(f"config.{field}={value!r}; expected a value in {bounds}")


def _check_choice(value, registry, field):
  if value not in registry:
    raise errors.UserError(f"config.{field}={value!r}; choose from {sorted(registry)}")


# Renamed config fields: {old name: new name} within config.diffusion.
DEPRECATED_NAMES = {"test_timesteps": "test_steps", "val_timesteps": "val_steps"}


def apply_deprecated_names(config) -> None:
  """Moves a value set under a deprecated field name onto its new name, with a warning.

  Runs on the config in place (main.py calls it on the flags' config, `validate_config` on
  any other); the old field is reset to None, so a second call changes nothing.
  """
  d = config.diffusion
  for old, new in DEPRECATED_NAMES.items():
    if d.get(old) is not None:
      logging.warning("config.diffusion.%s is deprecated; use config.diffusion.%s (set to %s)",
                      old, new, d[old])
      d[new], d[old] = d[old], None


def validate_config(config, shapes: bool = True) -> None:
  """Checks every config value once, up front, before any dataset is built or file written.

  String choices are checked against the modules' own registries; numbers against the ranges
  in which the run can work.

  Args:
    shapes: also trace the models' initialisation abstractly (starts JAX's backend: False
      before `distributed.initialize`).

  Raises:
    errors.UserError (or ValueError from a module's registry) naming the field.
  """
  apply_deprecated_names(config)
  t, o, g, d = config.training, config.optim, config.guidance, config.diffusion
  for field in ("batch_size", "eval_batch_size", "num_epochs", "eval_every_epochs",
                "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    if int(t[field]) < 1:
      raise errors.UserError(f"config.training.{field} must be >= 1, got {t[field]}")
  # Any split but the one trained on may select the best checkpoint.
  _check_choice(t.select_best_on, [n for n in splits_lib.SPLIT_NAMES if n != "train"],
                "training.select_best_on")
  _check_choice(t.select_metric, metrics.SELECT_METRICS, "training.select_metric")
  profiling.parse_steps(t.profile_steps)
  _check_choice(g.loss, losses.DCG_LOSS_TERMS, "guidance.loss")
  _check_choice(g.amsgrad, optim.AMSGRAD_VARIANTS, "guidance.amsgrad")
  _check_choice(d.mmd_kernel, losses.KERNELS, "diffusion.mmd_kernel")
  for field in ("sampler", "val_sampler"):
    _check_choice(d[field], diffusion.SAMPLERS, f"diffusion.{field}")
  if g.pretrain_epochs < 0:
    raise errors.UserError("config.guidance.pretrain_epochs must be >= 0")
  for field, value in (("optim.lr", o.lr), ("guidance.lr", g.lr)):
    if not value > 0:
      raise errors.UserError(f"config.{field}={value!r}; expected a learning rate > 0")
  _check_range(o.min_lr, 0, float("inf"), "optim.min_lr")
  _check_range(o.ema_decay, 0, 1, "optim.ema_decay", high_open=False)
  _check_range(o.warmup_epochs, 0, float("inf"), "optim.warmup_epochs")
  _check_range(config.data.val_fraction, 0, 1, "data.val_fraction", low_open=True)
  _check_range(config.data.test_fraction, 0, 1, "data.test_fraction", low_open=True)
  _check_range(d.beta_start, 0, 1, "diffusion.beta_start", low_open=True)
  _check_range(d.beta_end, d.beta_start, 1, "diffusion.beta_end", low_open=True)
  for field in ("timesteps", "test_steps", "val_steps", "num_samples",
                "predict_num_samples"):
    if int(d[field]) < 1:
      raise errors.UserError(f"config.diffusion.{field} must be >= 1, got {d[field]}")
  if int(config.data.image_size) < 1:
    raise errors.UserError(f"config.data.image_size must be >= 1, got {config.data.image_size}")
  if (models_lib.ABLATIONS.get(config.ablation, {}).get("diffusion")
      and o.warmup_epochs >= t.num_epochs):
    raise errors.UserError(f"config.optim.warmup_epochs={o.warmup_epochs} must be smaller than "
                           f"config.training.num_epochs={t.num_epochs} (the LR would never leave "
                           "its linear warm-up)")
  # numpy's and JAX's seeds are unsigned 32-bit integers.
  for field, value in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
    _check_range(int(value), 0, 2**32, field)
  if d.sampler != "full":
    _check_range(d.test_steps, 1, d.timesteps, "diffusion.test_steps", high_open=False)
  diffusion.timestep_sequence(d.sampler, d.timesteps, d.test_steps)
  diffusion.timestep_sequence(d.val_sampler, d.timesteps, min(d.val_steps, d.timesteps))
  models = models_lib.create_models(config)  # the model choices (ablation, backbone, dtype, ...)
  input_pipeline.validate_data_config(config.data)
  if not shapes:
    return
  # The shapes: what the models refuse only when built on an image (crop_size larger than the
  # image, more ROIs than saliency cells), traced abstractly, with no computation.
  try:
    jax.eval_shape(lambda key: models_lib.init_variables(models, key, config.data.image_size),
                   jax.ShapeDtypeStruct((2,), jax.numpy.uint32))  # no backend started
  except ValueError as e:
    raise errors.UserError(f"config.guidance / config.data.image_size="
                           f"{config.data.image_size}: {e}") from e
