"""Training: DCG warm-up, then joint DCG + diffusion training (REFERENCE.md §6).

`train_and_evaluate(config, workdir)` runs the stages, validates on the validation split,
keeps the latest and the best checkpoints, resumes from the latest one when rerun, and
evaluates the test split once at the end, through `evaluate` (which also serves `--mode eval`).
"""

import json
import os
import warnings
from typing import NamedTuple

import jax
from absl import logging
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import losses
from diffmic_jax.evaluation import evaluate
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import distributed
from diffmic_jax.platform import errors
from diffmic_jax.platform import files
from diffmic_jax.platform import host
from diffmic_jax.platform import profiling
from diffmic_jax.platform import sharding
from diffmic_jax.run import checkpointing
from diffmic_jax.run import optim
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import tensorboard
from diffmic_jax.run import train_state
from diffmic_jax.run import workdir as workdir_lib


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


def after(x, token):
  """x, made to depend on the scalar `token`: x + 0·token, exactly x for a finite token.

  Orders work in a compiled step: whatever reads the result waits for `token`'s computation.
  XLA keeps the multiply (0·token is NaN for a non-finite token, so it cannot be folded to 0),
  whereas it removes `lax.optimization_barrier` before its CPU scheduler runs, so a barrier
  does not order anything there.

  Args:
    x: float array.
    token: a float scalar.
  """
  return x + jnp.zeros((), x.dtype) * token.astype(x.dtype)


def make_train_steps(models, config, guidance_tx, denoiser_tx, lr_schedule, joint_start: int):
  """Returns {'warmup' | 'classifier' | 'joint': step(state, batch) -> (state, metrics)} and
  'joint_draws': step(state, batch, draws) -> (state, metrics), the joint step's body with its
  random draws given (`losses.draws` structure); 'joint' draws them from
  fold_in(state.key, state.step), so a harness can feed another framework's draws to the same
  body."""
  loss_terms = config.guidance.loss
  joint_train = config.guidance.joint_train
  ema_decay = config.optim.ema_decay

  def guidance_step(state, batch):
    guidance, opt, metrics = _guidance_update(models, guidance_tx, loss_terms, state.guidance,
                                              state.guidance_opt, batch["image"], batch["label"])
    return state.replace(step=state.step + 1, guidance=guidance, guidance_opt=opt), metrics

  def joint_update(state, batch, draws):
    images, labels = batch["image"], batch["label"]
    logits, _ = models.guidance.apply(state.guidance, images, train=False)
    params = state.denoiser["params"]
    grad_fn = jax.value_and_grad(losses.diffusion_objective, argnums=1, has_aux=True)
    (loss, (stats, aux)), grads = grad_fn(models, params, state.denoiser["batch_stats"], images,
                                          labels, logits, draws)
    updates, denoiser_opt = denoiser_tx.update(grads, state.denoiser_opt, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(state.step - joint_start)}
    state = state.replace(step=state.step + 1, denoiser={"params": params, "batch_stats": stats},
                          denoiser_opt=denoiser_opt,
                          ema=optim.ema_update(state.ema, params, ema_decay))
    if joint_train:
      # The DCG's update reads the images only after the denoiser's gradient exists. The two
      # backward passes are independent, and XLA's CPU scheduler interleaved them, keeping
      # both sets of saved activations live at once (paper joint step: 4.99 GB of
      # temporaries; one after the other 3.65 GB). Values are unchanged.
      images = after(images, metrics["grad_norm"])
      guidance, opt, dcg_metrics = _guidance_update(models, guidance_tx, loss_terms, state.guidance,
                                                    state.guidance_opt, images, labels)
      state = state.replace(guidance=guidance, guidance_opt=opt)
      metrics.update(dcg_metrics)
    return state, metrics

  def joint_step(state, batch):
    key = jax.random.fold_in(state.key, state.step)
    return joint_update(state, batch, losses.draws(models, key, batch["label"].shape[0]))

  # The DCG warm-up and the basic ablation's classifier training are the same guidance step.
  return {"warmup": guidance_step, "classifier": guidance_step, "joint": joint_step,
          "joint_draws": joint_update}


def jit_step(step_fn, mesh):
  """Compiles a step: state replicated and donated, batch sharded over ('data',); on CPU with
  `fast_conv.compiler_options()`."""
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), donate_argnums=0,
                 compiler_options=fast_conv.compiler_options())


def _check_finite(rows, workdir):
  """Raises naming the first step whose loss is not finite."""
  for step, metrics in rows:
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise FloatingPointError(f"non-finite {name}={value} at step {step}; the last good "
                                 f"checkpoint is kept in {workdir}/checkpoints")


def _log_interval(pending, writer, bar):
  """Fetches the pending device metrics (one transfer), appends them to metrics.jsonl (and
  TensorBoard) and advances the progress bar: fetching waits for the steps, so the bar counts finished ones."""
  fetched = jax.device_get(pending)
  rows = [(step, {k: float(v) for k, v in m.items()}) for step, m in fetched]
  for step, m in rows:
    writer.write(json.dumps({"step": step, **m}) + "\n")
  writer.flush()
  bar.update(len(rows))
  step, last = rows[-1]
  bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "dcg_loss", "lr")})
  return rows


def _save(run, kind, state, meta):
  run.checkpointer.save(kind, int(state.step), state, meta)


def _stage_end(run: run_lib.Run, stage: Stage) -> int:
  return stage.start + stage.num_epochs * run.steps_per_epoch


def _validation_epoch(run: run_lib.Run, stage: Stage, done: int):
  """The epoch (0-based) validated when `done` steps have finished, or None if none is due."""
  if not stage.validate or not stage.start < done <= _stage_end(run, stage):
    return None
  if (done - stage.start) % run.steps_per_epoch:
    return None
  epoch = (done - stage.start) // run.steps_per_epoch - 1
  due = epoch % run.config.training.eval_every_epochs == 0 or done == _stage_end(run, stage)
  return epoch if due else None


def _compile(step_fn, state, batch):
  """Compiles a jitted step for this state and batch before its first call, then gives the
  compiler's freed working memory back to the kernel (`host.release_free_memory`), so the
  first call's block of temporaries is not stacked on top of it (paper joint step: about 1 GB
  less peak memory on CPU)."""
  compiled = step_fn.lower(state, batch).compile()
  host.release_free_memory()
  return compiled


def run_stage(run: run_lib.Run, stage: Stage, step_fn, state, train_iter, meta, writer,
              stops=None):
  """Trains one stage from the state's step to its end; returns the new state.

  At a validation step the latest checkpoint is saved first, so validation can never lose the
  epoch's training; a resumed run validates a step whose validation has no row yet.

  Args:
    stops: a `distributed.StopSignals` (entered), asked at every step boundary.

  Raises:
    errors.Preempted: a stop was requested; the checkpoint of the step reached is finished.
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
  profiler = profiling.StepProfiler(profiling.parse_steps(cfg.profile_steps),
                                    os.path.join(run.workdir, profiling.SUBDIR),
                                    enabled=distributed.is_primary())
  try:  # the bar is closed before an error is printed, so the error is the last line
    for step in range(first, end):
      batch, iter_state = next(batches)
      if step == first:
        step_fn = _compile(step_fn, state, batch)
      profiler.before(step)
      with profiler.annotate(step):
        state, metrics = step_fn(state, batch)
      profiler.after(step, state, last_of_stage=step + 1 == end)
      pending.append((step, metrics))
      done = step + 1
      epoch_end = (done - stage.start) % run.steps_per_epoch == 0
      epoch = _validation_epoch(run, stage, done)
      stop = stops is not None and stops.reached(done)
      save = (done % cfg.checkpoint_every_steps == 0 or done == end or epoch is not None
              or stop)
      # Metrics are checked before every save, so a non-finite state is never checkpointed.
      if done % cfg.log_every_steps == 0 or epoch_end or save:
        _check_finite(_log_interval(pending, writer, bar), run.workdir)
        pending = []
      meta = {**meta, "data_iter": iter_state, "stage": stage.name}
      if save:
        _save(run, "latest", state, meta)
      if stop:  # the rerun validates this step, if due: its row is not written
        run.checkpointer.wait()
        raise errors.Preempted(stops.signum, done, run.checkpointer.directory("latest"))
      if epoch is not None:
        meta = _validate_and_keep_best(run, state, meta, epoch, writer)
  finally:
    bar.close()
  return state, meta


def _validate_and_keep_best(run, state, meta, epoch, writer):
  """Validates, saves a new best checkpoint, then writes the validation row to metrics.jsonl
  and the split's metrics to TensorBoard.

  The row is written only once the best checkpoint is finished, so a row in metrics.jsonl means
  that this step's validation is complete (a resumed run redoes it otherwise).
  """
  split = "test" if run.config.training.select_best_on == "test" else "val"
  results = evaluate.validate(run, state, split)
  head, main = next(iter(results.items()))  # the diffusion head, else the guidance model.
  metric = run.config.training.select_metric
  step = int(state.step)
  summary = {"step": step, "epoch": epoch, "split": split,
             **{f"{split}_{h}_accuracy": m["accuracy"] for h, m in results.items()},
             f"{split}_{head}_f1_macro": main["f1_macro"],
             **{f"{split}_{h}_diverged": m["num_diverged"] for h, m in results.items()
                if m.get("num_diverged")}}
  if distributed.is_primary():
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
  writer.validation(step, split, results, run.splits.class_names)
  writer.flush()
  return meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates the test split.

  The workdir is locked for the whole run; config.json and split.json are written only once the
  config, the data and the resume checks have passed. In a multi-process run process 0 holds
  the lock and writes the records; every process refuses when process 0 cannot take the lock.

  Returns:
    the test metrics {head: metrics}.
  """
  run_lib.validate_config(config)
  distributed.initialize(config.training.distributed)  # main.py already did, when it runs us
  lock = _lock(workdir)
  try:
    changes = workdir_lib.check_resume_config(config, workdir)
    if not workdir_lib.has_checkpoint(workdir):  # a resumed run never reads its sources again
      for source in (config.guidance.init_from, config.model.encoder_init_from):
        if source:
          checkpointing.find_checkpoint(source)  # refused before any record is written
    run = run_lib.prepare(config, workdir)
    try:
      _refused_by_primary(lambda: [workdir_lib.check_writable(run.checkpointer.directory(k),
                                                              "the run's checkpoints")
                                   for k in checkpointing.KINDS])
      if distributed.is_primary():
        # Temporaries of records whose writer was killed (a live writer's are kept).
        for path in files.remove_stale_temporaries(workdir):
          logging.info("Removed %s, left by a killed run.", path)
        input_pipeline.write_split(workdir, run.splits)
        workdir_lib.write_records(config, workdir, changes)
      return _train(run)
    finally:
      run.checkpointer.close()  # waits for saves in flight: nothing half-written at exit
  finally:
    if lock is not None:
      lock.close()


def _lock(workdir: str):
  """Process 0 takes the workdir lock (`workdir.lock`); with several processes, all of them
  learn whether it did and raise the same error if not. Returns the lock file or None."""
  return _refused_by_primary(lambda: workdir_lib.lock(workdir))


def _refused_by_primary(check):
  """Runs `check()` in process 0; with several processes, every process raises the
  errors.UserError it raised there. Returns check()'s result in process 0, else None."""
  result, refusal = None, None
  if distributed.is_primary():
    try:
      result = check()
    except errors.UserError as e:
      if jax.process_count() == 1:
        raise
      refusal = str(e)
  refusal = distributed.from_primary(refusal)
  if refusal is not None:
    raise errors.UserError(refusal)
  return result


def _stage_at(plan, step: int, run: run_lib.Run) -> str:
  """Name of the stage that trains `step` ('done' once every stage has finished)."""
  for stage in plan:
    if step < _stage_end(run, stage):
      return stage.name
  return "done"


def _restore_latest(run: run_lib.Run, guidance_tx, denoiser_tx, train_iter, plan):
  """(state, meta, step) from the latest checkpoint or a fresh state; reconciles the records.

  Best checkpoints after the resumed step belong to the steps about to be replayed and are
  removed (the replay writes them again, identically); the best accuracy so far is read from
  the best checkpoint at or before it, and metrics.jsonl loses the rows of replayed steps.
  """
  config = run.config
  meta = train_state.run_meta(train_iter.get_state(), plan[0].name)
  # The newest intact checkpoint; damaged newer ones are moved to DIR/checkpoints_damaged, so
  # that the replay can save those steps again.
  latest, restored, restored_meta, damaged = run.checkpointer.restore_newest_intact(
      "latest", train_state.abstract_train_state(run.models, config))
  if damaged:
    if distributed.is_primary():
      for step in damaged:
        logging.warning("moved the damaged checkpoint to %s",
                        run.checkpointer.set_aside("latest", step))
    distributed.from_primary(None)  # every process waits until process 0 moved them
    run.checkpointer.reload()
  if latest is None:
    state = train_state.create_train_state(run.models, config, guidance_tx, denoiser_tx,
                               jax.random.PRNGKey(config.seed))
  else:
    state, meta = restored, restored_meta
    if meta.get("data_iter") is not None:  # None: imported from the official code.
      train_iter.set_state(meta["data_iter"])
    meta = {**meta, "data_iter": train_iter.get_state()}
    stage = _stage_at(plan, latest, run)
    where = "training finished; evaluating" if stage == "done" else f"stage {stage}"
    if distributed.is_primary():
      logging.info("Resuming from checkpoint at step %d (%s).", latest, where)
  step = latest or 0
  best = [s for s in run.checkpointer.all_steps("best") if s <= step]
  for stale in run.checkpointer.all_steps("best"):
    if stale > step:
      if distributed.is_primary():
        logging.info("Removing best checkpoint at step %d, after the resumed step %d (the rerun "
                     "validates that step again).", stale, step)
      run.checkpointer.delete("best", stale)  # every process: Orbax synchronises them
  if best:
    best_meta = run.checkpointer.read_meta("best", max(best))
    meta = train_state.with_best(meta, best_meta.get("best_accuracy", train_state.NO_BEST),
                                 best_meta.get("best_step", max(best)))
  else:
    meta = train_state.with_best(meta, train_state.NO_BEST, None)
  return state, meta, step


def _train(run: run_lib.Run) -> dict:
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
  # Process 0 rewrites metrics.jsonl; every process must agree on the validations to redo.
  validated = (sorted(workdir_lib.truncate_metrics(workdir, step)) if distributed.is_primary()
               else None)
  validated = set(distributed.from_primary(validated))
  state = sharding.replicate(state, run.mesh)
  # metrics.jsonl and TensorBoard events, process 0 only. TensorBoard hides the events of the
  # steps after the resumed one (replayed now); the resumed step's validation stays.
  with tensorboard.MetricsLog(workdir, enabled=distributed.is_primary(),
                              purge_step=step + 1 if step else None) as writer:
    for stage in plan:
      epoch = _validation_epoch(run, stage, step)
      if epoch is not None and step not in validated:  # killed before it finished
        meta = _validate_and_keep_best(run, state, meta, epoch, writer)
    # SIGTERM or SIGINT (a preemption): save and stop at a step boundary, see StopSignals.
    with distributed.StopSignals() as stops:
      for stage in plan:
        if int(state.step) < _stage_end(run, stage):
          step_fn = jit_step(steps[stage.name], run.mesh)
          state, meta = run_stage(run, stage, step_fn, state, train_iter, meta, writer, stops)
  run.checkpointer.wait()
  kind = "best" if run.checkpointer.latest_step("best") is not None else "latest"
  return evaluate.evaluate_checkpoint(config, workdir, split="test", checkpoint=kind, run=run)


# Names from before evaluation, the run and the train state had their own modules, kept for
# callers (the owners are evaluate, run and train_state).
TrainState = train_state.TrainState
build_optimizers = train_state.build_optimizers
create_train_state = train_state.create_train_state
abstract_train_state = train_state.abstract_train_state
validate_config = run_lib.validate_config


def load_variables(config, workdir: str, checkpoint: str = "best"):
  """Deprecated: use `evaluate.load_variables`."""
  warnings.warn("train.load_variables is deprecated; use evaluate.load_variables",
                DeprecationWarning, stacklevel=2)
  return evaluate.load_variables(config, workdir, checkpoint)


def evaluate_checkpoint(config, workdir: str, split: str = "test", checkpoint: str = "best"):
  """Deprecated: use `evaluate.evaluate_checkpoint`."""
  warnings.warn("train.evaluate_checkpoint is deprecated; use evaluate.evaluate_checkpoint",
                DeprecationWarning, stacklevel=2)
  return evaluate.evaluate_checkpoint(config, workdir, split=split, checkpoint=checkpoint)
