"""Training and evaluation: DCG warm-up, then joint DCG + diffusion training (REFERENCE.md §6).

`train_and_evaluate(config, workdir)` runs the stages, validates on the validation split,
keeps the latest and the best checkpoints, resumes from the latest one when rerun, and
evaluates the test split once at the end. `evaluate_checkpoint` is `--mode eval`.
"""

import json
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from diffmic_jax import checkpointing
from diffmic_jax import dcg
from diffmic_jax import diffusion
from diffmic_jax import distributed
from diffmic_jax import evaluate
from diffmic_jax import input_pipeline
from diffmic_jax import losses
from diffmic_jax import models as models_lib
from diffmic_jax import optim
from diffmic_jax import pretrained
from diffmic_jax import profiling
from diffmic_jax import sharding
from diffmic_jax import tensorboard


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


def build_optimizers(config, steps_per_epoch: int):
  """(guidance optimiser, denoiser optimiser, denoiser LR schedule)."""
  g, o = config.guidance, config.optim
  schedule = optim.warmup_cosine_schedule(o.lr, o.warmup_epochs, config.training.num_epochs,
                                          steps_per_epoch, o.min_lr)
  guidance_tx = optim.guidance_optimizer(g.lr, g.b1, g.b2, g.eps, g.amsgrad)
  denoiser_tx = optim.denoiser_optimizer(schedule, o.b1, o.b2, o.eps, o.grad_clip)
  return guidance_tx, denoiser_tx, schedule


def create_train_state(models, config, guidance_tx, denoiser_tx, key,
                       load_pretrained: bool = True) -> TrainState:
  """Initialises variables (plus configured pretrained trunks) and optimiser states."""
  key_init, key_train = jax.random.split(key)
  variables = jax.jit(models_lib.init_variables, static_argnums=(0, 2))(
      models, key_init, config.data.image_size)
  if load_pretrained:
    variables = pretrained.load_configured(variables, config)
  den = variables.get("denoiser", {})
  return TrainState(
      step=jnp.zeros([], jnp.int32), key=key_train,
      guidance=variables["guidance"], guidance_opt=guidance_tx.init(variables["guidance"]["params"]),
      denoiser=den, denoiser_opt=denoiser_tx.init(den["params"]) if den else {},
      ema=jax.tree.map(jnp.copy, den["params"]) if den else {})


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
  """Fetches the pending device metrics (one transfer), appends them to metrics.jsonl."""
  fetched = jax.device_get(pending)
  rows = [(step, {k: float(v) for k, v in m.items()}) for step, m in fetched]
  for step, m in rows:
    writer.write(json.dumps({"step": step, **m}) + "\n")
  writer.flush()
  step, last = rows[-1]
  bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "dcg_loss", "lr")})
  return rows


def validate(run: _Run, state: TrainState, split: str) -> dict:
  """Scores the validation split (or the test split with select_best_on='test')."""
  d = run.config.diffusion
  variables = _inference_variables(state, run.config.optim.eval_with_ema)
  batches = _eval_batches(run, getattr(run.splits, split))
  predictions = evaluate.predict(run.models, variables, batches, run.eval_key, run.mesh,
                                 sampler_name=d.val_sampler, num_steps=d.val_timesteps,
                                 num_samples=d.num_samples)
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


def run_stage(run: _Run, stage: Stage, step_fn, state, train_iter, meta, writer):
  """Trains one stage from the state's step to its end; returns the new state."""
  cfg = run.config.training
  end = stage.start + stage.num_epochs * run.steps_per_epoch
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
  for step in range(first, end):
    batch, iter_state = next(batches)
    profiler.before(step)
    with profiler.annotate(step):
      state, metrics = step_fn(state, batch)
    profiler.after(step, state, last_of_stage=step + 1 == end)
    pending.append((step, metrics))
    bar.update(1)
    done = step + 1
    epoch_end = (done - stage.start) % run.steps_per_epoch == 0
    save = done % cfg.checkpoint_every_steps == 0 or done == end
    # Metrics are checked before every save, so a non-finite state is never checkpointed.
    if done % cfg.log_every_steps == 0 or epoch_end or save:
      _check_finite(_log_interval(pending, writer, bar), run.workdir)
      pending = []
    meta = {**meta, "data_iter": iter_state, "stage": stage.name}
    if epoch_end and stage.validate:
      epoch = (done - stage.start) // run.steps_per_epoch - 1
      if epoch % cfg.eval_every_epochs == 0 or done == end:
        meta = _validate_and_keep_best(run, state, meta, epoch, writer)
    if save:
      _save(run, "latest", state, meta)
  bar.close()
  return state, meta


def _validate_and_keep_best(run, state, meta, epoch, writer):
  split = "test" if run.config.training.select_best_on == "test" else "val"
  results = validate(run, state, split)
  head, main = next(iter(results.items()))  # the diffusion head, else the guidance model.
  metric = run.config.training.select_metric
  summary = {"step": int(state.step), "epoch": epoch, "split": split,
             **{f"{split}_{h}_accuracy": m["accuracy"] for h, m in results.items()},
             f"{split}_{head}_f1_macro": main["f1_macro"]}
  writer.write(json.dumps(summary) + "\n")
  writer.validation(int(state.step), split, results, run.splits.class_names)
  writer.flush()
  if distributed.is_primary():
    tqdm.tqdm.write(f"epoch {epoch} {split}: {head} accuracy {main['accuracy']:.4f}, "
                    f"macro F1 {main['f1_macro']:.4f}")
  if main[metric] > meta["best_accuracy"]:
    # 'best_accuracy' keeps its name in checkpoint metadata; it holds the selection metric.
    meta = {**meta, "best_accuracy": main[metric], "best_step": int(state.step)}
    _save(run, "best", state, meta)
  return meta


def _prepare(config, workdir):
  """Builds the data, models, mesh and checkpointer shared by training and evaluation."""
  distributed.initialize(config.training.distributed)  # main.py already did, when it runs us
  _validate_config(config)
  mesh = sharding.make_mesh()
  # split.json is written (and checked against the saved one) by process 0 only.
  splits = input_pipeline.create_splits(config.data, workdir if distributed.is_primary() else None)
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


def _validate_config(config):
  t = config.training
  for field in ("batch_size", "eval_batch_size", "num_epochs", "eval_every_epochs",
                "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    if int(t[field]) < 1:
      raise ValueError(f"config.training.{field} must be >= 1, got {t[field]}")
  if t.select_metric not in SELECT_METRICS:
    raise ValueError(f"config.training.select_metric={t.select_metric!r}; choose from "
                     f"{list(SELECT_METRICS)}")
  profiling.parse_steps(t.profile_steps)
  if t.select_best_on not in ("val", "test"):
    raise ValueError(f"config.training.select_best_on={t.select_best_on!r}; choose from "
                     "['test', 'val']")
  if config.guidance.pretrain_epochs < 0:
    raise ValueError("config.guidance.pretrain_epochs must be >= 0")
  d = config.diffusion
  for field in ("num_samples", "predict_num_samples"):
    if int(d[field]) < 1:
      raise ValueError(f"config.diffusion.{field} must be >= 1, got {d[field]}")
  diffusion.timestep_sequence(d.sampler, d.timesteps, d.test_timesteps)
  diffusion.timestep_sequence(d.val_sampler, d.timesteps, min(d.val_timesteps, d.timesteps))


def abstract_train_state(models, config) -> TrainState:
  """The TrainState structure (jax.ShapeDtypeStruct leaves) that checkpoints must match."""
  # The optimiser-state structure does not depend on the schedule's steps per epoch.
  guidance_tx, denoiser_tx, _ = build_optimizers(config, steps_per_epoch=1)
  return jax.eval_shape(lambda k: create_train_state(models, config, guidance_tx, denoiser_tx, k,
                                                     load_pretrained=False),
                        jax.random.PRNGKey(0))


def _inference_variables(state: TrainState, use_ema: bool) -> dict:
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
    state, _ = checkpointer.restore(kind, step, abstract_train_state(models, config))
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

  Returns:
    the test metrics {head: metrics}.
  """
  if (models_lib.ABLATIONS.get(config.ablation, {}).get("diffusion")
      and config.optim.warmup_epochs >= config.training.num_epochs):
    raise ValueError(f"config.optim.warmup_epochs={config.optim.warmup_epochs} must be smaller "
                     f"than config.training.num_epochs={config.training.num_epochs} (the LR "
                     "would never leave its linear warm-up)")
  run = _prepare(config, workdir)
  guidance_tx, denoiser_tx, schedule = build_optimizers(config, run.steps_per_epoch)
  plan = stage_plan(run.models, config, run.steps_per_epoch)
  steps = make_train_steps(run.models, config, guidance_tx, denoiser_tx, schedule,
                           plan[-1].start)
  local_batch = config.training.batch_size // jax.process_count()
  train_iter = input_pipeline.train_iterator(
      run.splits.train, config.data, batch_size=local_batch, seed=config.seed,
      shard_index=jax.process_index(), num_shards=jax.process_count())
  meta = {"data_iter": train_iter.get_state(), "stage": plan[0].name, "best_accuracy": -1.0,
          "best_step": None}
  latest = run.checkpointer.latest_step()
  if latest is None:
    state = create_train_state(run.models, config, guidance_tx, denoiser_tx,
                               jax.random.PRNGKey(config.seed))
  else:
    state, meta = run.checkpointer.restore("latest", latest,
                                           abstract_train_state(run.models, config))
    if meta.get("data_iter") is not None:  # None: imported from the official code.
      train_iter.set_state(meta["data_iter"])
    meta = {"best_accuracy": -1.0, "best_step": None, **meta, "data_iter": train_iter.get_state()}
    if distributed.is_primary():
      print(f"Resuming from checkpoint at step {latest} (stage {meta['stage']}).", flush=True)
  state = sharding.replicate(state, run.mesh)
  # metrics.jsonl and TensorBoard events, written by process 0 only.
  with tensorboard.MetricsLog(workdir, enabled=distributed.is_primary()) as writer:
    for stage in plan:
      if int(state.step) < stage.start + stage.num_epochs * run.steps_per_epoch:
        step_fn = jit_step(steps[stage.name], run.mesh)
        state, meta = run_stage(run, stage, step_fn, state, train_iter, meta, writer)
  run.checkpointer.wait()
  kind = "best" if run.checkpointer.latest_step("best") is not None else "latest"
  results = evaluate_checkpoint(config, workdir, split="test", checkpoint=kind, run=run)
  run.checkpointer.close()
  return results


def evaluate_checkpoint(config, workdir: str, split: str = "test", checkpoint: str = "best",
                        run: _Run | None = None) -> dict:
  """`--mode eval`: restores 'best', 'latest' or a step number and scores one split."""
  run = run or _prepare(config, workdir)
  kind, step = _checkpoint_kind(checkpoint)
  state, _ = run.checkpointer.restore(kind, step, abstract_train_state(run.models, config))
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
                                 num_samples=d.predict_num_samples)
  results = _score(run.models, predictions)
  extra = {"split": split, "checkpoint": kind, "step": int(state.step),
           "sampler": d.sampler, "steps": d.test_timesteps,
           "num_samples": d.predict_num_samples,
           "eval_with_ema": bool(config.optim.eval_with_ema), "seconds": time.time() - start}
  table = evaluate.write_report(results, run.splits.class_names, workdir, split, extra)
  evaluate.write_predictions(predictions, getattr(source, "ids", None), run.splits.class_names,
                             workdir, split)
  if run.models.denoiser is not None:
    report = evaluate.uncertainty_report(predictions, run.models.num_classes,
                                         dcg=isinstance(run.models.guidance, dcg.DCG))
    evaluate.write_uncertainty_report(report, workdir, split)
  overlays = evaluate.write_overlays(run.models, variables, source, predictions,
                                     getattr(source, "ids", None), run.splits.class_names,
                                     workdir, split, num=config.training.eval_overlays,
                                     batch_size=config.training.eval_batch_size)
  if distributed.is_primary():
    confusion = os.path.join(workdir, "eval", f"{split}_confusion.png")
    tensorboard.add_evaluation_images(workdir, int(state.step), split, [confusion, *overlays])
  if distributed.is_primary():
    print(f"\n{split} metrics (checkpoint {kind} at step {int(state.step)}, sampler {d.sampler}, "
          f"{d.test_timesteps} steps):\n{table}\n", flush=True)
  return results
