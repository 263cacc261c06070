"""The train state and its run-metadata record: one owner for training, evaluation, summary
and convert.

`TrainState` is the pytree checkpointed whole; `create_train_state` builds a fresh one,
`from_variables` wraps given variables (the official-checkpoint importer uses it), and
`abstract_train_state` is the structure every checkpoint must match. `run_meta` is the JSON
record saved beside each checkpoint.
"""

from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp

from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.nn import pretrained
from diffmic_jax.run import checkpointing
from diffmic_jax.run import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed whole)."""

  step: jax.Array  # optimiser iterations so far, all stages together.
  key: jax.Array  # raw uint32 PRNG key; step i uses fold_in(key, i).
  guidance: Any  # {'params', 'batch_stats'} of the DCG (or classifier).
  guidance_opt: Any
  denoiser: Any  # {'params', 'batch_stats'} of ε_θ; {} without diffusion.
  denoiser_opt: Any
  ema: Any  # EMA of the denoiser params; {} without diffusion.


def build_optimizers(config, steps_per_epoch: int):
  """(guidance optimiser, denoiser optimiser, denoiser LR schedule)."""
  g, o = config.guidance, config.optim
  schedule = optim.warmup_cosine_schedule(o.lr, o.warmup_epochs, config.training.num_epochs,
                                          steps_per_epoch, o.min_lr)
  guidance_tx = optim.guidance_optimizer(g.lr, g.b1, g.b2, g.eps, g.amsgrad)
  denoiser_tx = optim.denoiser_optimizer(schedule, o.b1, o.b2, o.eps, o.grad_clip)
  return guidance_tx, denoiser_tx, schedule


def from_variables(variables: dict, guidance_tx, denoiser_tx, key, step: int = 0,
                   ema=None) -> TrainState:
  """A TrainState holding `variables` ({'guidance', 'denoiser'?}) with fresh optimiser states.

  Args:
    variables: {'guidance': {...}, 'denoiser': {...}} ('denoiser' absent without diffusion).
    guidance_tx, denoiser_tx: the optimisers (`build_optimizers`).
    key: the training PRNG key.
    step: the step counter.
    ema: the denoiser's EMA parameters, or None to start them at its parameters.
  """
  den = variables.get("denoiser", {})
  if den and ema is None:
    ema = jax.tree.map(jnp.copy, den["params"])
  return TrainState(
      step=jnp.asarray(step, jnp.int32), key=key,
      guidance=variables["guidance"], guidance_opt=guidance_tx.init(variables["guidance"]["params"]),
      denoiser=den, denoiser_opt=denoiser_tx.init(den["params"]) if den else {},
      ema=ema if den else {})


def create_train_state(models, config, guidance_tx, denoiser_tx, key,
                       load_pretrained: bool = True) -> TrainState:
  """Initialises variables (plus configured pretrained trunks) and optimiser states."""
  key_init, key_train = jax.random.split(key)
  variables = jax.jit(models_lib.init_variables, static_argnums=(0, 2))(
      models, key_init, config.data.image_size)
  if load_pretrained:
    variables = pretrained.load_configured(variables, config)
    variables = init_from_runs(variables, config.guidance.init_from,
                               config.model.encoder_init_from)
  return from_variables(variables, guidance_tx, denoiser_tx, key_train)


def init_from_runs(variables, guidance_source: str, encoder_source: str) -> dict:
  """Initialises trunks from trained runs of ours (config.guidance.init_from and
  config.model.encoder_init_from; '' = off): see `pretrained.guidance_from_run` and
  `pretrained.encoder_from_run`. Logs what was loaded from where and what was not.

  Raises:
    errors.UserError: no checkpoint at a path; pretrained.WeightMismatchError: a trunk differs.
  """
  for source, load in ((guidance_source, pretrained.guidance_from_run),
                       (encoder_source, pretrained.encoder_from_run)):
    if source:
      state, folder = checkpointing.read_state(source)
      variables, notes = load(variables, state, folder)
      for note in notes:
        logging.info("init_from: %s", note)
  return variables


def abstract_train_state(models, config) -> TrainState:
  """The TrainState structure (jax.ShapeDtypeStruct leaves) that checkpoints must match."""
  # The optimiser-state structure does not depend on the schedule's steps per epoch.
  guidance_tx, denoiser_tx, _ = build_optimizers(config, steps_per_epoch=1)
  return jax.eval_shape(lambda k: create_train_state(models, config, guidance_tx, denoiser_tx, k,
                                                     load_pretrained=False),
                        jax.random.PRNGKey(0))


# `best_accuracy` of a run that has not validated yet (every metric is >= 0).
NO_BEST = -1.0


def run_meta(data_iter, stage: str, best_accuracy: float = NO_BEST, best_step=None,
             **extra) -> dict:
  """The JSON record saved beside each checkpoint.

  Args:
    data_iter: the training iterator's state (grain), or None (imported official weights: the
      data order restarts).
    stage: the stage that trains the next step ('warmup' | 'joint' | 'classifier').
    best_accuracy: the best validation value of config.training.select_metric so far (the name
      is kept for old checkpoints; it holds the selection metric), NO_BEST before any.
    best_step: the step of the best checkpoint, or None.
    **extra: further JSON fields (e.g. 'source': 'official').
  """
  return {"data_iter": data_iter, "stage": stage, "best_accuracy": best_accuracy,
          "best_step": best_step, **extra}


def with_best(meta: dict, best_accuracy: float, best_step) -> dict:
  """`meta` with a new best validation value and step."""
  return {**meta, "best_accuracy": best_accuracy, "best_step": best_step}
