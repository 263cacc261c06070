"""A training run's records in its workdir: the lock, atomic writes, the config check on resume
and metrics.jsonl kept at one row per step.

A run's records change only once the run has been accepted: nothing here writes before the
checks pass, and every write goes to a temporary file renamed over the old one, so a crash or
`kill -9` leaves either the old or the new file, never a partial one.
"""

import fcntl
import json
import os
import tempfile
import time

import ml_collections
from absl import logging

from diffmic_jax.platform import errors
from diffmic_jax.platform import files
from diffmic_jax.platform import trees

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
METRICS_FILE = "metrics.jsonl"

# Fields that may change when a run is resumed without changing what the run trains: how often
# it evaluates, logs and saves, how evaluation samples (validation and the final test), what
# the final test writes, and where it reads or caches data from.
# Every other field (model, data, ablation, optimiser, schedule, seed, diffusion) alters the run.
SAFE_TO_CHANGE = frozenset({
    "training.eval_every_epochs", "training.log_every_steps", "training.eval_batch_size",
    "training.checkpoint_every_steps", "training.keep_checkpoints", "training.distributed",
    "training.allow_config_change", "training.profile_steps",
    "data.num_workers", "data.data_dir",
    "training.eval_overlays",
    "diffusion.num_samples", "diffusion.predict_num_samples", "diffusion.sampler",
    "diffusion.test_steps", "diffusion.sampler_weights",
    "diffusion.val_sampler", "diffusion.val_steps",
    "diffusion.test_timesteps", "diffusion.val_timesteps",  # the deprecated names of the two above
    "optim.eval_with_ema", "model.conv_impl",
})


write_text = files.write_text  # the atomic writer's name here before files.py, kept for callers


def lock(workdir: str):
  """Takes the exclusive lock DIR/.lock for a training run and writes our pid into it.

  The lock is an `fcntl.flock` on the open file: the kernel releases it when the process ends,
  however it ends, so the lock of a killed run is simply taken over.

  Returns:
    The open lock file; closing it releases the lock.

  Raises:
    errors.UserError: another live process holds the lock, or the workdir is not writable.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError as e:
    raise errors.UserError(f"--workdir {workdir}: cannot create {path} ({e.strerror}); "
                           "expected a writable folder") from e
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError as e:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise errors.UserError(f"{path} is held by pid {holder}: another training run uses this "
                           "workdir; wait for it to end or pick another --workdir") from e
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  return f


def check_writable(folder: str, purpose: str) -> None:
  """Raises errors.UserError unless a file can be created in `folder` (e.g. an immutable or
  read-only checkpoints/ folder, refused before training rather than when a save fails)."""
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".writable"):
      pass
  except OSError as e:
    raise errors.UserError(f"{folder}: cannot write there ({e.strerror}); expected a writable "
                           f"folder for {purpose}") from e


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
  """Compares two configs (as JSON dicts); fields missing from `saved` (added to the code after
  the run started) are not compared.

  Returns:
    (changes that alter the run, changes safe on resume), each 'field (old -> new)'.
  """
  saved_flat, new_flat = trees.flatten_dicts(saved, "."), trees.flatten_dicts(new, ".")
  unsafe, safe = [], []
  for field in sorted(set(saved_flat) & set(new_flat)):
    old, value = saved_flat[field], new_flat[field]
    if old != value:
      (safe if field in SAFE_TO_CHANGE else unsafe).append(f"{field} ({old!r} -> {value!r})")
  return unsafe, safe


def has_checkpoint(workdir: str) -> bool:
  """Whether DIR/checkpoints holds a finished checkpoint (Orbax names them by the step)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_resume_config(config, workdir: str) -> dict | None:
  """Refuses to resume with a config whose changes alter the run, unless allowed.

  Args:
    config: the new ConfigDict.
    workdir: the run's folder; checked when it holds a checkpoint.

  Returns:
    None when nothing changed, else {'time', 'accepted', 'overridden'} to be recorded in
    DIR/config_changes.jsonl once the run starts (see `write_records`).

  Raises:
    errors.UserError: changes that alter the run, listed field by field; or checkpoints without
      their config.json (nothing to check the config against), unless allowed.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_checkpoint(workdir):
    return None
  if not os.path.isfile(path):
    if not config.training.allow_config_change:
      raise errors.UserError(
          f"{path} is missing, but {os.path.join(workdir, 'checkpoints')} holds checkpoints: "
          "nothing to check this config against; restore config.json, use a new --workdir, or "
          "pass --config.training.allow_config_change=True to resume with this config (e.g. "
          "from converted official weights)")
    logging.warning("%s is missing; resuming with this config (allow_config_change=True), "
                    "recorded in %s", path, os.path.join(workdir, CONFIG_CHANGES_FILE))
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "accepted": [],
            "overridden": [f"{CONFIG_FILE} was missing"]}
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: unreadable ({e}); expected the JSON config this run "
                           "was started with") from e
  unsafe, safe = config_changes(saved, json.loads(config.to_json_best_effort()))
  if unsafe and not config.training.allow_config_change:
    accepted = f" (safe changes: {', '.join(safe)})" if safe else ""
    raise errors.UserError(
        f"{path}: resuming with changes that alter the run: {', '.join(unsafe)}{accepted}; "
        "restore them, use a new --workdir, or pass "
        "--config.training.allow_config_change=True to mix them into this run")
  if not unsafe and not safe:
    return None
  if safe:
    logging.info("Config changes accepted on resume: %s", ", ".join(safe))
  if unsafe:
    logging.warning("resuming with changes that alter the run (allow_config_change=True): %s; "
                    "recorded in %s", ", ".join(unsafe), os.path.join(workdir, CONFIG_CHANGES_FILE))
  return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "accepted": safe, "overridden": unsafe}


def write_records(config, workdir: str, changes: dict | None) -> None:
  """Writes config.json (atomically) and appends the accepted config changes, if any."""
  files.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
  if changes:
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a") as f:
      f.write(json.dumps(changes) + "\n")


def is_validation_row(row: dict) -> bool:
  return "split" in row


def truncate_metrics(workdir: str, step: int) -> set[int]:
  """Rewrites DIR/metrics.jsonl (atomically) to the rows of the steps before a resume at `step`.

  Training rows are keyed by the step index they trained (0-based, kept when < step); validation
  rows by the state's step after training (kept when <= step). Duplicates keep their first row.

  Returns:
    the steps whose validation row is kept (validations already done).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return set()
  rows, seen = [], set()
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      validation = is_validation_row(row)
      key = (validation, row.get("step"))
      if not isinstance(key[1], int) or key in seen:
        continue
      if (key[1] <= step) if validation else (key[1] < step):
        seen.add(key)
        rows.append(row)
  files.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
  return {r["step"] for r in rows if is_validation_row(r)}


# Fields that an evaluation or prediction may set apart from the run's config.json: they change
# how the trained model is run (batching, sampler, samples, their PRNG seed, the EMA or raw
# weights) or only how it was trained (optimiser, schedule, augmentation, initial weights), never
# the model or the preprocessing of its images. A field ending in '.' covers its whole group.
EVAL_MAY_DIFFER = frozenset({
    "seed", "training.", "optim.",
    "data.num_workers", "data.data_dir", "data.manual_dir", "data.hflip", "data.vflip",
    "data.rotation_degrees", "data.class_balanced",
    "guidance.pretrained", "guidance.pretrain_epochs", "guidance.joint_train", "guidance.loss",
    "guidance.lr", "guidance.amsgrad", "guidance.b1", "guidance.b2", "guidance.eps",
    "model.encoder_pretrained", "model.cond_dropout", "model.conv_impl",
    "diffusion.mmd_weight", "diffusion.mmd_kernel", "diffusion.sampler", "diffusion.test_steps",
    "diffusion.val_sampler", "diffusion.val_steps", "diffusion.test_timesteps",
    "diffusion.val_timesteps", "diffusion.num_samples", "diffusion.predict_num_samples",
    "diffusion.sampler_weights",
})


def _as_tuples(value):
  """JSON lists back to the tuples the configs use (hashable, as the model fields need)."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def read_config(path: str):
  """A resolved config written by training (DIR/config.json) as an unlocked ConfigDict.

  Raises:
    errors.UserError: the file is missing, unreadable or not a JSON object, naming it.
  """
  try:
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
  except FileNotFoundError as e:
    raise errors.UserError(f"{path}: no such file; expected the config.json that training "
                           "writes into its workdir (or pass --config)") from e
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: unreadable ({e}); expected the JSON config a training "
                           "run writes") from e
  if not isinstance(payload, dict) or not payload:
    raise errors.UserError(f"{path}: expected a JSON object of config fields, got "
                           f"{type(payload).__name__}")
  return ml_collections.ConfigDict(_as_tuples(payload))


def eval_mismatches(saved: dict, new: dict) -> list[str]:
  """Fields on which an evaluation's config differs from the run's in a way that changes the
  model or the preprocessing of its images (not in `EVAL_MAY_DIFFER`).

  Args:
    saved, new: configs as JSON dicts; fields missing from either are not compared.

  Returns:
    'field (run's value -> new value)' for each, sorted.
  """
  saved_flat, new_flat = trees.flatten_dicts(saved, "."), trees.flatten_dicts(new, ".")
  differ = []
  for field in sorted(set(saved_flat) & set(new_flat)):
    free = field in EVAL_MAY_DIFFER or any(
        field.startswith(group) for group in EVAL_MAY_DIFFER if group.endswith("."))
    if not free and saved_flat[field] != new_flat[field]:
      differ.append(f"{field} ({saved_flat[field]!r} -> {new_flat[field]!r})")
  return differ


def check_eval_config(config, workdir: str) -> None:
  """Refuses to evaluate or predict with a config that disagrees with the run's config.json on
  a field that changes the model or the preprocessing (nothing to check without the file).

  Raises:
    errors.UserError: listing the fields.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return
  saved = json.loads(read_config(path).to_json_best_effort())
  differ = eval_mismatches(saved, json.loads(config.to_json_best_effort()))
  if differ:
    raise errors.UserError(
        f"{path}: this run was trained with other values of fields that change the model or "
        f"its image preprocessing: {', '.join(differ)}; leave out --config (the run's "
        "config.json is used) or set them as trained")
