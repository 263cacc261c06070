"""Training and evaluation: DCG warm-up, then joint DCG + diffusion training (REFERENCE.md §6).

`train_and_evaluate(config, workdir)` runs the stages, validates on the validation split,
keeps the latest and the best checkpoints, resumes from the latest one when rerun, and
evaluates the test split once at the end. `evaluate_checkpoint` is `--mode eval`.
"""

import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from diffmic_jax import checkpointing
from diffmic_jax import errors
from diffmic_jax import diffusion
from diffmic_jax import evaluate
from diffmic_jax import input_pipeline
from diffmic_jax import losses
from diffmic_jax import models as models_lib
from diffmic_jax import optim
from diffmic_jax import sharding
from diffmic_jax import train_state
from diffmic_jax import workdir as workdir_lib


# The train state's names before it had its own module (train_state owns them), kept for callers.
TrainState = train_state.TrainState
build_optimizers = train_state.build_optimizers
create_train_state = train_state.create_train_state
abstract_train_state = train_state.abstract_train_state


# Validation metrics that may choose the best checkpoint (official: accuracy).
SELECT_METRICS = ("accuracy", "f1_macro", "balanced_accuracy")


class Stage(NamedTuple):
  name: str  # 'warmup' | 'joint' | 'classifier'
  start: int  # first global step of the stage
  num_epochs: int
  validate: bool


def stage_plan(models, config, steps_per_epoch: int) -> list[Stage]:
  """The official order: DCG warm-up epochs, then joint epochs ('basic': classifier only)."""
  if models.denoiser is None:
    return [Stage("classifier", 0, config.training.num_epochs, True)]
  warm = config.guidance.pretrain_epochs
  return [Stage("warmup", 0, warm, False),
          Stage("joint", warm * steps_per_epoch, config.training.num_epochs, True)]


def _guidance_update(models, tx, loss_terms, variables, opt_state, images, labels):
  """One DCG cross-entropy step in train mode. Returns (variables, opt_state, metrics)."""
  def loss_fn(params):
    (logits, _), updated = models.guidance.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
        mutable=["batch_stats"])
    return losses.dcg_loss(logits, labels, loss_terms), (updated["batch_stats"], logits)

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  params = optax.apply_updates(variables["params"], updates)
  accuracy = jnp.mean(jnp.argmax(logits["fused"], -1) == labels)
  return ({"params": params, "batch_stats": stats}, opt_state,
          {"dcg_loss": loss, "dcg_accuracy": accuracy})


def make_train_steps(models, config, guidance_tx, denoiser_tx, lr_schedule, joint_start: int):
  """Returns {'warmup' | 'classifier' | 'joint': step(state, batch) -> (state, metrics)}."""
  loss_terms = config.guidance.loss
  joint_train = config.guidance.joint_train
  ema_decay = config.optim.ema_decay

  def warmup_step(state, batch):
    guidance, opt, metrics = _guidance_update(models, guidance_tx, loss_terms, state.guidance,
                                              state.guidance_opt, batch["image"], batch["label"])
    return state.replace(step=state.step + 1, guidance=guidance, guidance_opt=opt), metrics

  def joint_step(state, batch):
    images, labels = batch["image"], batch["label"]
    key = jax.random.fold_in(state.key, state.step)
    logits, _ = models.guidance.apply(state.guidance, images, train=False)
    params = state.denoiser["params"]
    grad_fn = jax.value_and_grad(losses.diffusion_objective, argnums=1, has_aux=True)
    (loss, (stats, aux)), grads = grad_fn(models, params, state.denoiser["batch_stats"], images,
                                          labels, logits, key)
    updates, denoiser_opt = denoiser_tx.update(grads, state.denoiser_opt, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step - joint_start)}
    state = state.replace(step=state.step + 1, denoiser={"params": params, "batch_stats": stats},
                          denoiser_opt=denoiser_opt,
                          ema=optim.ema_update(state.ema, params, ema_decay))
    if joint_train:
      guidance, opt, dcg_metrics = _guidance_update(models, guidance_tx, loss_terms, state.guidance,
                                                    state.guidance_opt, images, labels)
      state = state.replace(guidance=guidance, guidance_opt=opt)
      metrics.update(dcg_metrics)
    return state, metrics

  return {"warmup": warmup_step, "classifier": warmup_step, "joint": joint_step}


def jit_step(step_fn, mesh):
  """Compiles a step: state replicated and donated, batch sharded over ('data',)."""
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), donate_argnums=0)


class _Run(NamedTuple):
  """What the training loop needs besides the state."""

  config: ml_collections.ConfigDict
  workdir: str
  models: models_lib.Models
  splits: Any
  mesh: Any
  checkpointer: checkpointing.Checkpointer
  steps_per_epoch: int
  eval_key: jax.Array


def _check_finite(rows, workdir):
  """Raises naming the first step whose loss is not finite."""
  for step, metrics in rows:
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise FloatingPointError(f"non-finite {name}={value} at step {step}; the last good "
                                 f"checkpoint is kept in {workdir}/checkpoints")


def _log_interval(pending, writer, bar):
  """Fetches the pending device metrics (one transfer), appends them to metrics.jsonl and
  advances the progress bar: fetching waits for the steps, so the bar counts finished ones."""
  fetched = jax.device_get(pending)
  rows = [(step, {k: float(v) for k, v in m.items()}) for step, m in fetched]
  for step, m in rows:
    writer.write(json.dumps({"step": step, **m}) + "\n")
  writer.flush()
  bar.update(len(rows))
  step, last = rows[-1]
  bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "dcg_loss", "lr")})
  return rows


def validate(run: _Run, state: train_state.TrainState, split: str) -> dict:
  """Scores the validation split (or the test split with select_best_on='test')."""
  d = run.config.diffusion
  variables = _inference_variables(state, run.config.optim.eval_with_ema)
  batches = _eval_batches(run, getattr(run.splits, split))
  predictions = evaluate.predict(run.models, variables, batches, run.eval_key, run.mesh,
                                 sampler_name=d.val_sampler, num_steps=d.val_timesteps,
                                 num_samples=d.num_samples, progress=f"validation ({split})")
  return _score(run.models, predictions)


def _eval_batches(run: _Run, source):
  """Padded evaluation batches of this process's share of a split."""
  batch = sharding.check_batch_size(run.config.training.eval_batch_size, run.mesh,
                                    "training.eval_batch_size")
  return input_pipeline.eval_batches(source, run.config.data, batch_size=batch,
                                     shard_index=jax.process_index(),
                                     num_shards=jax.process_count())


def _score(models, predictions):
  return evaluate.score(predictions, models.num_classes, models.denoiser is not None,
                        dcg=models.guidance_heads == models_lib.GUIDANCE_HEADS["dcg"])


def _save(run, kind, state, meta):
  run.checkpointer.save(kind, int(state.step), state, meta)


def _stage_end(run: _Run, stage: Stage) -> int:
  return stage.start + stage.num_epochs * run.steps_per_epoch


def _validation_epoch(run: _Run, stage: Stage, done: int):
  """The epoch (0-based) validated when `done` steps have finished, or None if none is due."""
  if not stage.validate or not stage.start < done <= _stage_end(run, stage):
    return None
  if (done - stage.start) % run.steps_per_epoch:
    return None
  epoch = (done - stage.start) // run.steps_per_epoch - 1
  due = epoch % run.config.training.eval_every_epochs == 0 or done == _stage_end(run, stage)
  return epoch if due else None


def run_stage(run: _Run, stage: Stage, step_fn, state, train_iter, meta, writer):
  """Trains one stage from the state's step to its end; returns the new state.

  At a validation step the latest checkpoint is saved first, so validation can never lose the
  epoch's training; a resumed run validates a step whose validation has no row yet.
  """
  cfg = run.config.training
  end = _stage_end(run, stage)
  first = int(state.step)
  pending, iter_state = [], meta["data_iter"]
  bar = tqdm.tqdm(total=end - stage.start, initial=first - stage.start, desc=stage.name,
                  unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
  # The previous stage's prefetcher read ahead; rewind to the last batch actually consumed.
  train_iter.set_state(iter_state)
  batches = sharding.prefetch(train_iter, run.mesh, with_state=True)
  try:  # the bar is closed before an error is printed, so the error is the last line
    for step in range(first, end):
      batch, iter_state = next(batches)
      state, metrics = step_fn(state, batch)
      pending.append((step, metrics))
      done = step + 1
      epoch_end = (done - stage.start) % run.steps_per_epoch == 0
      epoch = _validation_epoch(run, stage, done)
      save = done % cfg.checkpoint_every_steps == 0 or done == end or epoch is not None
      # Metrics are checked before every save, so a non-finite state is never checkpointed.
      if done % cfg.log_every_steps == 0 or epoch_end or save:
        _check_finite(_log_interval(pending, writer, bar), run.workdir)
        pending = []
      meta = {**meta, "data_iter": iter_state, "stage": stage.name}
      if save:
        _save(run, "latest", state, meta)
      if epoch is not None:
        meta = _validate_and_keep_best(run, state, meta, epoch, writer)
  finally:
    bar.close()
  return state, meta


def _validate_and_keep_best(run, state, meta, epoch, writer):
  """Validates, saves a new best checkpoint, then writes the validation row to metrics.jsonl.

  The row is written only once the best checkpoint is finished, so a row in metrics.jsonl means
  that this step's validation is complete (a resumed run redoes it otherwise).
  """
  split = "test" if run.config.training.select_best_on == "test" else "val"
  results = validate(run, state, split)
  head, main = next(iter(results.items()))  # the diffusion head, else the guidance model.
  metric = run.config.training.select_metric
  step = int(state.step)
  summary = {"step": step, "epoch": epoch, "split": split,
             **{f"{split}_{h}_accuracy": m["accuracy"] for h, m in results.items()},
             f"{split}_{head}_f1_macro": main["f1_macro"],
             **{f"{split}_{h}_diverged": m["num_diverged"] for h, m in results.items()
                if m.get("num_diverged")}}
  tqdm.tqdm.write(f"epoch {epoch} {split}: {head} accuracy {main['accuracy']:.4f}, "
                  f"macro F1 {main['f1_macro']:.4f}")
  for line in evaluate.divergence_lines(results, split):
    tqdm.tqdm.write(f"warning: step {step}: {line}")
  if main[metric] > meta["best_accuracy"]:
    # 'best_accuracy' keeps its name in checkpoint metadata; it holds the selection metric.
    meta = train_state.with_best(meta, main[metric], step)
    if step in run.checkpointer.all_steps("best"):  # same state, from an interrupted run
      run.checkpointer.delete("best", step)
    _save(run, "best", state, meta)
    run.checkpointer.wait()
  writer.write(json.dumps(summary) + "\n")
  writer.flush()
  return meta


def _prepare(config, workdir):
  """Builds the data, models, mesh and checkpointer shared by training and evaluation."""
  if config.training.distributed:
    jax.distributed.initialize()
  validate_config(config)
  mesh = sharding.make_mesh()
  # Checked against the run's split.json here, written only once training is accepted.
  splits = input_pipeline.create_splits(config.data, workdir, write=False)
  models = models_lib.create_models(config)
  global_batch = config.training.batch_size
  sharding.check_batch_size(global_batch, mesh, "training.batch_size")
  steps_per_epoch = input_pipeline.steps_per_epoch(len(splits.train), global_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"config.training.batch_size={global_batch} exceeds the {len(splits.train)} "
                     "training examples")
  checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
  return _Run(config, workdir, models, splits, mesh, checkpointer, steps_per_epoch,
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


def validate_config(config) -> None:
  """Checks every config value once, up front, before any dataset is built or file written.

  String choices are checked against the modules' own registries; numbers against the ranges
  in which the run can work.

  Raises:
    errors.UserError (or ValueError from a module's registry) naming the field.
  """
  t, o, g, d = config.training, config.optim, config.guidance, config.diffusion
  for field in ("batch_size", "eval_batch_size", "num_epochs", "eval_every_epochs",
                "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    if int(t[field]) < 1:
      raise errors.UserError(f"config.training.{field} must be >= 1, got {t[field]}")
  _check_choice(t.select_best_on, ("val", "test"), "training.select_best_on")
  _check_choice(t.select_metric, SELECT_METRICS, "training.select_metric")
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
  for field in ("timesteps", "test_timesteps", "val_timesteps", "num_samples",
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
  diffusion.timestep_sequence(d.sampler, d.timesteps, d.test_timesteps)
  diffusion.timestep_sequence(d.val_sampler, d.timesteps, min(d.val_timesteps, d.timesteps))
  models_lib.create_models(config)  # the model choices (ablation, backbone, dtype, ...)
  input_pipeline.validate_data_config(config.data)


def _inference_variables(state: train_state.TrainState, use_ema: bool) -> dict:
  variables = {"guidance": state.guidance}
  if state.denoiser:
    variables = evaluate.eval_variables({**variables, "denoiser": state.denoiser}, state.ema,
                                        use_ema)
  return variables


def load_variables(config, workdir: str, checkpoint: str = "best"):
  """Restores a checkpoint for use outside the training loop (no dataset needed).

  Args:
    config: the config the checkpoint was trained with.
    workdir: the training workdir.
    checkpoint: 'best', 'latest' or a step number.

  Returns:
    (models bundle, variables {'guidance', 'denoiser'}) ready for `sampler.sample`; the
    denoiser's parameters are its EMA when config.optim.eval_with_ema is set.
  """
  models = models_lib.create_models(config)
  kind, step = _checkpoint_kind(checkpoint)
  checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
  try:
    state, _ = checkpointer.restore(kind, step, train_state.abstract_train_state(models, config))
  finally:
    checkpointer.close()
  return models, _inference_variables(state, config.optim.eval_with_ema)


def _checkpoint_kind(checkpoint):
  if checkpoint in checkpointing.KINDS:
    return checkpoint, None
  if str(checkpoint).isdigit():
    return "latest", int(checkpoint)
  raise ValueError(f"--checkpoint={checkpoint!r}; use 'best', 'latest' or a step number")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates the test split.

  The workdir is locked for the whole run; config.json and split.json are written only once the
  config, the data and the resume checks have passed.

  Returns:
    the test metrics {head: metrics}.
  """
  validate_config(config)
  lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else None
  try:
    changes = workdir_lib.check_resume_config(config, workdir)
    run = _prepare(config, workdir)
    try:
      if jax.process_index() == 0:
        input_pipeline.write_split(workdir, run.splits)
        workdir_lib.write_records(config, workdir, changes)
      return _train(run)
    finally:
      run.checkpointer.close()  # waits for saves in flight: nothing half-written at exit
  finally:
    if lock is not None:
      lock.close()


def _stage_at(plan, step: int, run: _Run) -> str:
  """Name of the stage that trains `step` ('done' once every stage has finished)."""
  for stage in plan:
    if step < _stage_end(run, stage):
      return stage.name
  return "done"


def _restore_latest(run: _Run, guidance_tx, denoiser_tx, train_iter, plan):
  """(state, meta, step) from the latest checkpoint or a fresh state; reconciles the records.

  Best checkpoints after the resumed step belong to the steps about to be replayed and are
  removed (the replay writes them again, identically); the best accuracy so far is read from
  the best checkpoint at or before it, and metrics.jsonl loses the rows of replayed steps.
  """
  config = run.config
  meta = train_state.run_meta(train_iter.get_state(), plan[0].name)
  latest = run.checkpointer.latest_step()
  if latest is None:
    state = train_state.create_train_state(run.models, config, guidance_tx, denoiser_tx,
                               jax.random.PRNGKey(config.seed))
  else:
    state, meta = run.checkpointer.restore("latest", latest,
                                           train_state.abstract_train_state(run.models, config))
    if meta.get("data_iter") is not None:  # None: imported from the official code.
      train_iter.set_state(meta["data_iter"])
    meta = {**meta, "data_iter": train_iter.get_state()}
    stage = _stage_at(plan, latest, run)
    where = "training finished; evaluating" if stage == "done" else f"stage {stage}"
    print(f"Resuming from checkpoint at step {latest} ({where}).", flush=True)
  step = latest or 0
  best = [s for s in run.checkpointer.all_steps("best") if s <= step]
  for stale in run.checkpointer.all_steps("best"):
    if stale > step and jax.process_index() == 0:
      print(f"Removing best checkpoint at step {stale}, after the resumed step {step} (the "
            "rerun validates that step again).", flush=True)
      run.checkpointer.delete("best", stale)
  if best:
    best_meta = run.checkpointer.read_meta("best", max(best))
    meta = train_state.with_best(meta, best_meta.get("best_accuracy", train_state.NO_BEST),
                                 best_meta.get("best_step", max(best)))
  else:
    meta = train_state.with_best(meta, train_state.NO_BEST, None)
  return state, meta, step


def _train(run: _Run) -> dict:
  config, workdir = run.config, run.workdir
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(config, run.steps_per_epoch)
  plan = stage_plan(run.models, config, run.steps_per_epoch)
  steps = make_train_steps(run.models, config, guidance_tx, denoiser_tx, schedule,
                           plan[-1].start)
  local_batch = config.training.batch_size // jax.process_count()
  train_iter = input_pipeline.train_iterator(
      run.splits.train, config.data, batch_size=local_batch, seed=config.seed,
      shard_index=jax.process_index(), num_shards=jax.process_count())
  state, meta, step = _restore_latest(run, guidance_tx, denoiser_tx, train_iter, plan)
  validated = (workdir_lib.truncate_metrics(workdir, step) if jax.process_index() == 0
               else set())
  state = sharding.replicate(state, run.mesh)
  with open(os.path.join(workdir, workdir_lib.METRICS_FILE), "a") as writer:
    for stage in plan:
      epoch = _validation_epoch(run, stage, step)
      if epoch is not None and step not in validated:  # killed before it finished
        meta = _validate_and_keep_best(run, state, meta, epoch, writer)
    for stage in plan:
      if int(state.step) < _stage_end(run, stage):
        step_fn = jit_step(steps[stage.name], run.mesh)
        state, meta = run_stage(run, stage, step_fn, state, train_iter, meta, writer)
  run.checkpointer.wait()
  kind = "best" if run.checkpointer.latest_step("best") is not None else "latest"
  return evaluate_checkpoint(config, workdir, split="test", checkpoint=kind, run=run)


def evaluate_checkpoint(config, workdir: str, split: str = "test", checkpoint: str = "best",
                        run: _Run | None = None) -> dict:
  """`--mode eval`: restores 'best', 'latest' or a step number and scores one split."""
  run = run or _prepare(config, workdir)
  kind, step = _checkpoint_kind(checkpoint)
  state, _ = run.checkpointer.restore(kind, step,
                                     train_state.abstract_train_state(run.models, config))
  state = sharding.replicate(state, run.mesh)
  d = run.config.diffusion
  if split not in ("train", "val", "test"):
    raise ValueError(f"--split={split!r}; choose from ['test', 'train', 'val']")
  source = getattr(run.splits, split)
  batches = _eval_batches(run, source)
  variables = _inference_variables(state, config.optim.eval_with_ema)
  start = time.time()
  predictions = evaluate.predict(run.models, variables, batches, run.eval_key, run.mesh,
                                 sampler_name=d.sampler, num_steps=d.test_timesteps,
                                 num_samples=d.predict_num_samples,
                                 progress=f"evaluation ({split})")
  results = _score(run.models, predictions)
  diffusion_head = run.models.denoiser is not None
  extra = {"split": split, "checkpoint": kind, "step": int(state.step),
           **({"sampler": d.sampler, "steps": d.test_timesteps,
               "num_samples": d.predict_num_samples,
               "eval_with_ema": bool(config.optim.eval_with_ema)} if diffusion_head else {}),
           "seconds": time.time() - start}
  table = evaluate.write_report(results, run.splits.class_names, workdir, split, extra)
  evaluate.write_predictions(predictions, getattr(source, "ids", None), run.splits.class_names,
                             workdir, split)
  if diffusion_head:
    report = evaluate.uncertainty_report(
        predictions, run.models.num_classes,
        dcg=run.models.guidance_heads == models_lib.GUIDANCE_HEADS["dcg"])
    evaluate.write_uncertainty_report(report, workdir, split)
  evaluate.write_overlays(run.models, variables, source, predictions, getattr(source, "ids", None),
                          run.splits.class_names, workdir, split,
                          num=config.training.eval_overlays,
                          batch_size=config.training.eval_batch_size)
  # The 'basic' ablation has no diffusion head, hence no sampler to name.
  sampler_note = f", sampler {d.sampler}, {d.test_timesteps} steps" if diffusion_head else ""
  print(f"\n{split} metrics (checkpoint {kind} at step {int(state.step)}{sampler_note}):\n"
        f"{table}\n", flush=True)
  for line in evaluate.divergence_lines(results, split):
    print(f"warning: {line}", flush=True)
  return results
