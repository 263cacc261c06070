"""One evaluation function over a whole split, used for validation and for the test.

`evaluate(run, state, split, final=...)` is the entry point behind both validation during
training (`validate`) and the test after training and `--mode eval` (`evaluate_checkpoint`);
`load_run` restores a run from its workdir alone (config, models, variables) for other
programs, `load_variables` the same with a config of the caller's.

Padded batches are masked, predictions from every batch are gathered, and metrics come from the
whole split. The DCG heads (fused, global, local) are scored beside the diffusion head, so users
see what the diffusion adds.
"""

import csv
import functools
import os
import re
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from diffmic_jax.data import input_pipeline
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import explain
from diffmic_jax.nn import fast_conv
from diffmic_jax.platform import distributed
from diffmic_jax.platform import files
from diffmic_jax.platform import sharding
from diffmic_jax.run import checkpointing
from diffmic_jax.run import metrics
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import tensorboard
from diffmic_jax.run import train_state
from diffmic_jax.run import workdir as workdir_lib


# Per-example outputs of `sampler.sample` that `predict` gathers besides the guidance logits.
SAMPLE_KEYS = ("probs", "entropy", "vote_probs", "agreement", "vote_entropy",
               "interval_separated")

# How --mode eval, predict and validation name a class (recorded in DIR/eval/<split>_metrics.json).
PREDICTION_RULE = ("vote of the samples, ties broken by the mean softmax (argmax y0 for one "
                   "sample, the official rule)")


@functools.lru_cache(maxsize=8)
def _sample_fn(models, sampler_name: str, num_steps: int, num_samples: int):
  # Cached so that every validation reuses one compiled sampler.
  return sampler.make_sample_fn(models, sampler_name, num_steps, num_samples,
                                compiler_options=fast_conv.compiler_options())


def eval_variables(variables: dict, ema_params, use_ema: bool) -> dict:
  """Variables for evaluation: the denoiser's EMA parameters replace its raw ones if asked."""
  if not use_ema or "denoiser" not in variables:
    return variables
  return {**variables, "denoiser": {**variables["denoiser"], "params": ema_params}}


# |ŷ₀| beyond this is a diverged chain: ŷ₀ lives near the one-hot simplex (|ŷ₀| ~ 1).
DIVERGED_ABS = 1e3


def stable_probs(y0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """softmax(ŷ₀) averaged over chains, computed so that huge or non-finite ŷ₀ cannot crash.

  Args:
    y0: [N, S, C] final ŷ₀ of S chains per example (or classifier logits, S = 1).

  Returns:
    (probs [N, C] float64: the mean over the finite chains, NaN where no chain is finite (such
     examples count as wrong, see `metrics.classification_metrics`); diverged [N] chains that
     are non-finite or beyond DIVERGED_ABS; non_finite [N] chains with a NaN or inf).
  """
  y0 = np.asarray(y0, np.float64)
  finite = np.isfinite(y0).all(axis=-1)  # [N, S]
  safe = np.where(finite[..., None], y0, 0.0)
  z = np.exp(safe - safe.max(axis=-1, keepdims=True))  # max-shifted: no overflow for any size
  chain_probs = z / z.sum(axis=-1, keepdims=True)
  count = finite.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    probs = (chain_probs * finite[..., None]).sum(axis=1) / count[:, None]
  exploded = finite & (np.abs(safe).max(axis=-1) > DIVERGED_ABS)
  return probs, (~finite | exploded).sum(axis=1), (~finite).sum(axis=1)


def predict(models, variables, batches, key, mesh, *, sampler_name: str, num_steps: int,
            num_samples: int = 1, progress: str | None = None, first_batch: int = 0) -> dict:
  """Runs the sampler over every batch and gathers the unpadded outputs on the host.

  Args:
    models: the model bundle.
    variables: {'guidance', 'denoiser'} variables.
    batches: iterable of {'image': [B, H, W, 3], 'label': [B], 'mask': [B]} host batches.
    key: PRNG key; batch i uses fold_in(key, first_batch + i).
    mesh: the ('data',) mesh.
    sampler_name, num_steps, num_samples: see `sampler.make_sample_fn`.
    progress: a progress-bar label (process 0), or None for no bar.
    first_batch: the index of the first batch in a longer sequence cut into parts (predict
      writes its results part by part): the parts together get the keys of one call.

  Returns:
    {'labels': [N], 'probs': [N, C] (`stable_probs`), 'prediction': [N] (`predicted_class`),
     'diverged', 'non_finite': [N] chains per example, 'fused'/'global'/'local': [N, C]
     guidance logits, and the other SAMPLE_KEYS of `sampler.sample`: 'entropy' [N],
     'vote_probs' [N, C], 'agreement' [N], 'vote_entropy' [N], 'interval_separated' [N]}.
  """
  sample_fn = _sample_fn(models, sampler_name, num_steps, num_samples)
  bar = tqdm.tqdm(total=len(batches) if hasattr(batches, "__len__") else None, desc=progress,
                  unit="batch", leave=False, dynamic_ncols=True,
                  disable=progress is None or jax.process_index() != 0)
  outputs, in_flight = [], None
  for i, batch in enumerate(sharding.prefetch(batches, mesh)):
    out = sample_fn(variables, batch["image"], jax.random.fold_in(key, first_batch + i))
    outputs.append({"labels": batch["label"], "mask": batch["mask"], "y0": out["y0"],
                    **{k: out[k] for k in SAMPLE_KEYS if k != "probs"},
                    **out["guidance_logits"]})
    if in_flight is not None:  # one batch stays queued; the bar counts finished ones
      jax.block_until_ready(in_flight)
      bar.update(1)
    in_flight = out["y0"]
  if in_flight is not None:
    jax.block_until_ready(in_flight)
    bar.update(1)
  bar.close()
  if not outputs:
    raise ValueError("evaluation split is empty")
  gathered = multihost_utils.process_allgather(outputs, tiled=True)
  merged = {k: np.concatenate([np.asarray(o[k]) for o in gathered]) for k in gathered[0]}
  mask = merged.pop("mask").astype(bool)
  merged = {k: v[mask] for k, v in merged.items()}
  merged["probs"], merged["diverged"], merged["non_finite"] = stable_probs(merged.pop("y0"))
  merged["prediction"] = predicted_class(merged["vote_probs"], merged["probs"])
  return merged


def predicted_class(vote_probs, probs) -> np.ndarray:
  """[N] the diffusion head's class by `sampler.vote_prediction` (the samples' vote, ties broken
  by the mean softmax), or -1 where no chain gave a finite ŷ₀ (counted as wrong)."""
  finite = np.isfinite(probs).all(axis=1)
  safe = np.where(finite[:, None], probs, 0.0)
  return np.where(finite, sampler.vote_prediction(np.asarray(vote_probs), safe), -1)


def _softmax(logits):
  """Row softmax in float64; rows with a non-finite logit give NaN (counted as wrong)."""
  probs, _, _ = stable_probs(np.asarray(logits)[:, None, :])
  return probs


def score(predictions: dict, num_classes: int, with_diffusion: bool = True,
          dcg: bool = True) -> dict:
  """Metrics per head: 'diffusion' (when there is a denoiser), then 'dcg_fused',
  'dcg_global', 'dcg_local' for the DCG, or 'classifier' for the ablations' plain classifier."""
  labels = predictions["labels"]
  results = {}
  if with_diffusion:
    results["diffusion"] = metrics.classification_metrics(
        predictions["probs"], labels, num_classes, predictions=predictions.get("prediction"))
    if "diverged" in predictions:
      results["diffusion"]["num_diverged"] = int(np.sum(predictions["diverged"]))
  heads = {f"dcg_{h}": h for h in ("fused", "global", "local")} if dcg else {"classifier": "fused"}
  for name, head in heads.items():
    results[name] = metrics.classification_metrics(
        _softmax(predictions[head].astype(np.float64)), labels, num_classes)
  return results


def divergence_lines(results: dict, split: str) -> list[str]:
  """One line per head that had diverged chains or non-finite outputs on `split`."""
  lines = []
  for head, m in results.items():
    diverged, non_finite = m.get("num_diverged", 0), m.get("num_nonfinite", 0)
    if diverged or non_finite:
      chains = f"{diverged} chains diverged (|ŷ₀| > {DIVERGED_ABS:g} or non-finite), " \
          if "num_diverged" in m else ""
      lines.append(f"{head} head on {split}: {chains}{non_finite} of {m['num_examples']} "
                   "examples without a finite prediction (counted as wrong)")
  return lines


def write_report(results: dict, class_names, workdir: str, split: str, extra: dict) -> str:
  """Writes DIR/eval/<split>_metrics.json and the confusion-matrix PNG; returns the table."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  head, main = next(iter(results.items()))
  if jax.process_index() == 0:
    metrics.write_json(os.path.join(out_dir, f"{split}_metrics.json"),
                       {**extra, "class_names": list(class_names), "heads": results})
    metrics.save_confusion_png(main["confusion_matrix"], class_names,
                               os.path.join(out_dir, f"{split}_confusion.png"),
                               f"{split}: {head} (accuracy {main['accuracy']:.3f})")
  return metrics.format_table(results, class_names)


def write_predictions(predictions: dict, ids, class_names, workdir: str, split: str) -> None:
  """Writes DIR/eval/<split>_predictions.csv: one row per example, in split order."""
  if jax.process_index() != 0:
    return
  labels = predictions["labels"]
  ids = list(ids) if ids is not None else [str(i) for i in range(len(labels))]
  probs, votes = predictions["probs"], predictions["vote_probs"]
  fused = predictions["fused"].argmax(axis=1)
  path = os.path.join(workdir, "eval", f"{split}_predictions.csv")
  with files.atomic_open(path, "w", newline="", encoding="utf-8",
                         errors="surrogateescape") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "label", "prediction", "vote_share", "vote_entropy",
                     "dcg_fused_prediction"] + [f"p_{name}" for name in class_names])
    for i, label in enumerate(labels):
      k = int(predictions["prediction"][i])  # -1: diverged
      writer.writerow([ids[i], int(label), k, f"{votes[i][k] if k >= 0 else 0.0:.6f}",
                       f"{predictions['vote_entropy'][i]:.6f}", int(fused[i])]
                      + [f"{p:.6f}" for p in probs[i]])


def uncertainty_report(predictions: dict, num_classes: int, dcg: bool = True,
                       diffusion_head: bool = True) -> dict:
  """Defer-to-expert curves (with their AURC) and reliability data of every head.

  Returns:
    {'defer': {name: `metrics.defer_curve`}, 'calibration': {head: `metrics.reliability_curve`}}.
    Defer curves score the diffusion head's predictions by its predictive entropy, by
    1 − sample agreement, by the entropy of the vote and by 1 − the DCG's fused max softmax,
    and the guidance model's own predictions by 1 − their max softmax. Calibration covers the
    diffusion head's vote probabilities and mean softmax, and the guidance heads' softmax.
    Without a diffusion head (ablations 'basic' and 'dcg') only the guidance model's entries
    are reported.
  """
  labels = predictions["labels"]
  heads = ("fused", "global", "local") if dcg else ("fused",)
  prefix = "dcg_" if dcg else "classifier_"
  softmax = {h: _softmax(predictions[h].astype(np.float64)) for h in heads}
  fused_confidence = softmax["fused"].max(axis=1)
  defer, calibration = {}, {}
  if diffusion_head:
    preds = predictions["prediction"]
    scores = {"diffusion: entropy": predictions["entropy"],
              "diffusion: 1 - agreement": 1.0 - predictions["agreement"],
              "diffusion: vote entropy": predictions["vote_entropy"],
              f"diffusion: 1 - {prefix}fused max prob": 1.0 - fused_confidence}
    defer = {name: metrics.defer_curve(score, preds, labels, num_classes)
             for name, score in scores.items()}
    calibration = {
        "diffusion (vote)": metrics.reliability_curve(predictions["vote_probs"], labels),
        "diffusion (mean softmax)": metrics.reliability_curve(predictions["probs"], labels)}
  defer[f"{prefix}fused: 1 - max prob"] = metrics.defer_curve(
      1.0 - fused_confidence, softmax["fused"].argmax(axis=1), labels, num_classes)
  for h in heads:
    calibration[f"{prefix}{h}"] = metrics.reliability_curve(softmax[h], labels)
  return {"defer": defer, "calibration": calibration}


def write_uncertainty_report(report: dict, workdir: str, split: str) -> None:
  """DIR/eval/<split>_uncertainty.json, <split>_defer.png and <split>_reliability.png."""
  if jax.process_index() != 0:
    return
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  metrics.write_json(os.path.join(out_dir, f"{split}_uncertainty.json"), report)
  metrics.save_defer_png(report["defer"], os.path.join(out_dir, f"{split}_defer.png"),
                         f"{split}: refer the most uncertain cases")
  metrics.save_reliability_png(report["calibration"],
                               os.path.join(out_dir, f"{split}_reliability.png"),
                               f"{split}: reliability")


def _file_stem(example_id) -> str:
  """An example id (which may be a relative path such as 'benign/benign (1).png') as one safe
  file-name component."""
  stem = os.path.splitext(str(example_id))[0]
  return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "example"


def write_overlays(models, variables, source, predictions: dict, ids, class_names,
                   workdir: str, split: str, num: int, batch_size: int) -> list[str]:
  """Explanation PNGs (`explain`) of `num` examples of the split, the most confidently wrong
  first, in DIR/eval/overlays/<split>_<rank>_<id>[_wrong].png. Nothing without a DCG.

  Returns:
    the paths written.
  """
  crop_size = getattr(models.guidance, "crop_size", None)
  if jax.process_index() != 0 or num <= 0 or crop_size is None:
    return []
  # Process 0 computes alone: a host copy keeps the computation off the other processes'
  # devices (global arrays would make it a collective that they never join).
  variables = jax.device_get(variables)
  labels = predictions["labels"]
  chosen = explain.select_examples(predictions, labels, num)
  images = np.stack([np.asarray(source[i]["image"]) for i in chosen])
  auxes = explain.explanation_aux(models, variables, images, batch_size)
  out_dir = os.path.join(workdir, "eval", "overlays")
  os.makedirs(out_dir, exist_ok=True)
  ids = list(ids) if ids is not None else [str(i) for i in range(len(labels))]
  paths = []
  for rank, (i, image, aux) in enumerate(zip(chosen, images, auxes)):
    k = int(predictions["prediction"][i])
    tag = "_wrong" if k != int(labels[i]) else ""
    path = os.path.join(out_dir, f"{split}_{rank:03d}_{_file_stem(ids[i])}{tag}.png")
    explain.save_overlay(path, image, aux, class_index=max(k, 0), crop_size=crop_size,
                         title=explain.title(class_names, predictions, i, labels[i]))
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------------------------
# The evaluation entry point: validation during training, the final test and `--mode eval`.


def inference_variables(state, use_ema: bool) -> dict:
  """{'guidance', 'denoiser'?} variables of a `train_state.TrainState` for evaluation."""
  return _model_variables(state.guidance, state.denoiser, state.ema, use_ema)


def _model_variables(guidance, denoiser, ema, use_ema: bool) -> dict:
  """{'guidance', 'denoiser'?} from a train state's fields; `denoiser` is {} without diffusion,
  `ema` is read only with `use_ema`."""
  variables = {"guidance": guidance}
  if denoiser:
    variables = eval_variables({**variables, "denoiser": denoiser}, ema, use_ema)
  return variables


def _eval_batches(run, source):
  """Padded evaluation batches of this process's share of a split."""
  batch = sharding.check_batch_size(run.config.training.eval_batch_size, run.mesh,
                                    "training.eval_batch_size")
  return input_pipeline.eval_batches(source, run.config.data, batch_size=batch,
                                     shard_index=jax.process_index(),
                                     num_shards=jax.process_count())


def _score(models, predictions):
  return score(predictions, models.num_classes, models.denoiser is not None,
               dcg=models.guidance_heads == models_lib.GUIDANCE_HEADS["dcg"])


def _sampler_settings(config, final: bool) -> dict:
  """The sampler of validation during training (cheaper) or of the final test."""
  d = config.diffusion
  if final:
    return {"sampler_name": d.sampler, "num_steps": d.test_steps,
            "num_samples": d.predict_num_samples}
  return {"sampler_name": d.val_sampler, "num_steps": d.val_steps,
          "num_samples": d.num_samples}


def evaluate(run: run_lib.Run, state, split: str, *, final: bool) -> tuple[dict, dict]:
  """Scores one split of a run: the one evaluation behind validation and the test.

  Args:
    run: the prepared run (`run.prepare`).
    state: a `train_state.TrainState` (its EMA replaces the denoiser's parameters when
      config.optim.eval_with_ema is set).
    split: 'train', 'val' or 'test'.
    final: False for validation during training (config.diffusion.val_sampler, val_steps,
      num_samples), True for the test and `--mode eval` (sampler, test_steps,
      predict_num_samples).

  Returns:
    (metrics {head: metrics}, see `score`; predictions of every example, see `predict`).
  """
  variables = inference_variables(state, run.config.optim.eval_with_ema)
  batches = _eval_batches(run, getattr(run.splits, split))
  label = f"{'evaluation' if final else 'validation'} ({split})"
  predictions = predict(run.models, variables, batches, run.eval_key, run.mesh,
                        progress=label, **_sampler_settings(run.config, final))
  return _score(run.models, predictions), predictions


def validate(run: run_lib.Run, state, split: str) -> dict:
  """Validation during training: the metrics {head: metrics} of `split` ('val', or 'test'
  with select_best_on='test')."""
  results, _ = evaluate(run, state, split, final=False)
  return results


def _checkpoint_kind(checkpoint):
  if checkpoint in checkpointing.KINDS:
    return checkpoint, None
  if str(checkpoint).isdigit():
    return "latest", int(checkpoint)
  raise ValueError(f"--checkpoint={checkpoint!r}; use 'best', 'latest' or a step number")


def load_variables(config, workdir: str, checkpoint: str = "best"):
  """Restores a checkpoint for use outside the training loop (no dataset needed).

  Args:
    config: the config the checkpoint was trained with (`load_run` reads it from the workdir).
    workdir: the training workdir.
    checkpoint: 'best', 'latest' or a step number. 'latest' read while the run trains may see
      its checkpoint deleted by the next save (keep_checkpoints=1): it is then read again at the
      newest step, up to `LATEST_RETRIES` times.

  Returns:
    (models bundle, variables {'guidance', 'denoiser'}) ready for `sampler.sample`; the
    denoiser's parameters are its EMA when config.optim.eval_with_ema is set.
  """
  models = models_lib.create_models(config)
  kind, step = _checkpoint_kind(checkpoint)
  abstract = train_state.abstract_train_state(models, config)
  for attempt in range(LATEST_RETRIES + 1):
    # A fresh manager each time: Orbax caches the list of steps it found when it opened.
    checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
    newest = checkpointer.latest_step(kind) if step is None else step
    try:
      fields = checkpointer.restore_fields(kind, newest, abstract, INFERENCE_FIELDS + (
          ("ema",) if config.optim.eval_with_ema else ()))
      break
    except Exception:  # pylint: disable=broad-except
      # Only a checkpoint that vanished under us is read again; anything else is raised.
      if (step is not None or kind != "latest" or attempt == LATEST_RETRIES
          or newest is None or os.path.isdir(os.path.join(workdir, "checkpoints", str(newest)))):
        raise
      logging.warning("checkpoint %s/checkpoints/%d was deleted while it was read (a training "
                      "run saved a newer one); reading the newest again", workdir, newest)
    finally:
      checkpointer.close()
  return models, _model_variables(fields["guidance"], fields["denoiser"], fields.get("ema"),
                                  config.optim.eval_with_ema)


# The train-state fields `load_variables` reads (and 'ema' with optim.eval_with_ema): not the
# optimiser states.
INFERENCE_FIELDS = ("guidance", "denoiser")

# How often `load_variables` reads 'latest' again when a training run deletes it meanwhile.
LATEST_RETRIES = 3


def load_run(workdir: str, checkpoint: str = "best"):
  """A trained run from its workdir alone: the config it was trained with and its variables.

      config, models, variables = diffmic_jax.load_run("runs/demo")
      sample_fn = sampler.make_sample_fn(models, config.diffusion.sampler,
                                         config.diffusion.test_steps,
                                         config.diffusion.predict_num_samples)
      out = sample_fn(variables, images, jax.random.fold_in(run_lib.eval_key(config), 0))

  With the images of `--mode eval`'s first batch (normalised, padded to
  training.eval_batch_size) `out` holds that batch's predictions.

  Args:
    workdir: the training workdir (its config.json, written by training, and checkpoints).
    checkpoint: 'best', 'latest' or a step number.

  Returns:
    (config: the run's resolved config, models: the model bundle, variables: for
    `sampler.sample`, see `load_variables`).

  Raises:
    errors.UserError: no or unreadable WORKDIR/config.json; FileNotFoundError: no checkpoint.
  """
  config = workdir_lib.read_config(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  run_lib.apply_deprecated_names(config)
  models, variables = load_variables(config, workdir, checkpoint)
  return config, models, variables


def evaluate_checkpoint(config, workdir: str, split: str = "test", checkpoint: str = "best",
                        run: run_lib.Run | None = None) -> dict:
  """`--mode eval` and the test after training: restores 'best', 'latest' or a step number,
  scores one split and writes the reports under DIR/eval (process 0), and their confusion
  matrix and explanation PNGs to TensorBoard (`eval_<split>/*` at the checkpoint's step).

  Returns:
    the metrics {head: metrics}.
  """
  run = run or run_lib.prepare(config, workdir)
  kind, step = _checkpoint_kind(checkpoint)
  state, _ = run.checkpointer.restore(kind, step,
                                      train_state.abstract_train_state(run.models, config))
  state = sharding.replicate(state, run.mesh)
  d = run.config.diffusion
  if split not in splits_lib.SPLIT_NAMES:
    raise ValueError(f"--split={split!r}; choose from {sorted(splits_lib.SPLIT_NAMES)}")
  source = getattr(run.splits, split)
  start = time.time()
  results, predictions = evaluate(run, state, split, final=True)
  diffusion_head = run.models.denoiser is not None
  extra = {"split": split, "checkpoint": kind, "step": int(state.step),
           **({"sampler": d.sampler, "steps": d.test_steps,
               "num_samples": d.predict_num_samples, "prediction_rule": PREDICTION_RULE,
               "eval_with_ema": bool(config.optim.eval_with_ema)} if diffusion_head else {}),
           "seconds": time.time() - start}
  table = write_report(results, run.splits.class_names, workdir, split, extra)
  write_predictions(predictions, getattr(source, "ids", None), run.splits.class_names, workdir,
                    split)
  report = uncertainty_report(predictions, run.models.num_classes,
                              dcg=run.models.guidance_heads == models_lib.GUIDANCE_HEADS["dcg"],
                              diffusion_head=diffusion_head)
  write_uncertainty_report(report, workdir, split)
  overlays = write_overlays(run.models, inference_variables(state, config.optim.eval_with_ema),
                            source, predictions, getattr(source, "ids", None),
                            run.splits.class_names, workdir, split,
                            num=config.training.eval_overlays,
                            batch_size=config.training.eval_batch_size)
  if not distributed.is_primary():
    return results
  confusion = os.path.join(workdir, "eval", f"{split}_confusion.png")
  tensorboard.add_evaluation_images(workdir, int(state.step), split, [confusion, *overlays])
  # The 'basic' ablation has no diffusion head, hence no sampler to name.
  sampler_note = f", sampler {d.sampler}, {d.test_steps} steps" if diffusion_head else ""
  print(f"\n{split} metrics (checkpoint {kind} at step {int(state.step)}{sampler_note}):\n"
        f"{table}\n", flush=True)
  for line in divergence_lines(results, split):
    logging.warning(line)
  return results
