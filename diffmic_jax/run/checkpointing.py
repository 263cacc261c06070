"""Orbax checkpoints: the only module that imports orbax.

Two managers under the workdir: `checkpoints/` keeps the latest K training checkpoints and
`checkpoints_best/` the best-on-validation one. Each checkpoint holds the whole train state
(both models, both optimiser states, the EMA, the step and the PRNG key) and a JSON item with
the data-iterator position and bookkeeping. Orbax writes into a temporary directory and renames
it when complete, so a checkpoint interrupted by a crash or `kill -9` is never restored.
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffmic_jax.platform import errors
from diffmic_jax.platform import sharding
from diffmic_jax.platform import trees

KINDS = ("latest", "best")
# The managers' folders under a workdir, in the order a source run's checkpoint is taken from.
FOLDERS = {"best": "checkpoints_best", "latest": "checkpoints"}
DAMAGED_FOLDER = "checkpoints_damaged"  # where a resume sets damaged checkpoints aside
# Files every finished checkpoint holds (Orbax's metadata of both items and the state's index).
REQUIRED_FILES = ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata")


class MismatchError(ValueError):
  """A readable checkpoint whose structure differs from the model built from the config."""


class Checkpointer:
  """Latest-K and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    root = os.path.abspath(workdir)
    def manager(name, keep):
      # Handlers are registered up front so that a fresh manager can read item metadata.
      return ocp.CheckpointManager(
          os.path.join(root, name),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=True,
              # Both managers may save the same step (a validation step that is also a
              # checkpoint step); with several processes their barriers need distinct names.
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix=name)),
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

    self._root = root
    self._managers = {"latest": manager(FOLDERS["latest"], keep),
                      "best": manager(FOLDERS["best"], 1)}

  def save(self, kind: str, step: int, state, meta: dict) -> None:
    """Saves state and JSON meta at `step` (asynchronously; see `wait`)."""
    self._managers[kind].save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def directory(self, kind: str) -> str:
    """The folder of one manager (DIR/checkpoints or DIR/checkpoints_best)."""
    return str(self._managers[kind].directory)

  def latest_step(self, kind: str = "latest"):
    return self._managers[kind].latest_step()

  def all_steps(self, kind: str = "latest"):
    return list(self._managers[kind].all_steps())

  def restore(self, kind: str, step, abstract_state):
    """Restores (state, meta) into the structure of `abstract_state`, strictly.

    Args:
      kind: 'latest' or 'best'.
      step: a step number, or None for the manager's latest.
      abstract_state: a pytree of arrays or jax.ShapeDtypeStruct giving the expected
        structure, shapes and dtypes. Leaves come back replicated on every device.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: the checkpoint's structure, shapes or dtypes differ from the expected ones.
    """
    manager, step = self._checked_step(kind, step, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(replicated_target(abstract_state)),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_fields(self, kind: str, step, abstract_state, fields) -> dict:
    """Only some fields of a checkpointed train state, {name: pytree}, reading only their
    arrays: evaluation and prediction need the models, not the optimiser states or the EMA
    (two to three times the models' bytes in a trained run).

    Args:
      kind, step: as `restore`.
      abstract_state: the whole expected train state (a dataclass pytree); the checkpoint is
        checked against all of it, as by `restore`.
      fields: names of `abstract_state`'s fields to read.

    Raises:
      as `restore`.
    """
    manager, step = self._checked_step(kind, step, abstract_state)
    target = replicated_target(abstract_state)
    skipped = {f.name: jax.tree.map(lambda _: ocp.PLACEHOLDER, getattr(target, f.name))
               for f in dataclasses.fields(target) if f.name not in fields}
    target = dataclasses.replace(target, **skipped)
    # StandardRestore has no placeholders; the PyTree handler reads the same files.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      restored = reader.restore(
          os.path.join(str(manager.directory), str(step), "state"),
          args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return {name: getattr(restored, name) for name in fields}

  def _checked_step(self, kind: str, step, abstract_state):
    """(manager, step) of an existing checkpoint whose structure matches `abstract_state`."""
    manager = self._managers[kind]
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no {kind} checkpoint in {manager.directory}: train first, or "
                              "pick another with --checkpoint best|latest|STEP")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no {kind} checkpoint at step {step} in {manager.directory}; "
                              f"available: {sorted(manager.all_steps())}")
    stored = manager.item_metadata(step)["state"]
    check_structure(stored, abstract_state, f"{manager.directory}/{step}")
    return manager, step

  def restore_newest_intact(self, kind: str, abstract_state):
    """Restores the newest checkpoint of `kind` that is intact, skipping damaged newer ones.

    A checkpoint is damaged when one of REQUIRED_FILES is missing or Orbax cannot read it
    (missing or cut data files); each one skipped is named in a warning.

    Returns:
      (step, state, meta, skipped steps, newest first); step, state and meta are None when
      there is no checkpoint at all.

    Raises:
      MismatchError: a readable checkpoint that does not fit the config (not damage).
      errors.UserError: every checkpoint is damaged.
    """
    folder = self.directory(kind)
    skipped = []
    for step in sorted(self.all_steps(kind), reverse=True):
      missing = [f for f in REQUIRED_FILES
                 if not os.path.exists(os.path.join(folder, str(step), f))]
      try:
        if missing:
          raise FileNotFoundError(f"missing {', '.join(missing)}")
        state, meta = self.restore(kind, step, abstract_state)
      except MismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Orbax and TensorStore report missing or cut files with many exception types.
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        logging.warning("checkpoint %s/%d is damaged (%s); skipped, restoring an earlier one",
                        folder, step, reason)
        skipped.append(step)
        continue
      if skipped:
        logging.warning("restored %s/%d; skipped the damaged checkpoints of steps %s",
                        folder, step, skipped)
      return step, state, meta, skipped
    if skipped:
      raise errors.UserError(f"every checkpoint in {folder} is damaged (steps {skipped}, see "
                             "the warnings above); restore them from a backup or use a new "
                             "--workdir")
    return None, None, None, []

  def set_aside(self, kind: str, step: int) -> str:
    """Moves a damaged checkpoint to DIR/checkpoints_damaged/<kind>-<step> (kept for the user,
    out of Orbax's sight, so that the step can be saved again). Call `reload` afterwards in
    every process. Returns the new path."""
    target = os.path.join(self._root, DAMAGED_FOLDER, f"{kind}-{step}")
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(self._root, DAMAGED_FOLDER, f"{kind}-{step}.{suffix}")
      suffix += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory(kind), str(step)), target)
    return target

  def reload(self) -> None:
    """Reads the list of checkpoints from disk again (after `set_aside`)."""
    for manager in self._managers.values():
      manager.reload()

  def read_meta(self, kind: str, step: int) -> dict:
    """The JSON meta item of one checkpoint (the state is not read)."""
    restored = self._managers[kind].restore(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def delete(self, kind: str, step: int) -> None:
    """Removes one finished checkpoint (a stale one the resumed run will write again).

    Every process of a multi-process run must call it: Orbax synchronises them, and process 0
    removes the files.
    """
    self._managers[kind].delete(int(step))

  def wait(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def replicated_target(tree):
  """Restore targets for `tree`'s leaves (anything with shape and dtype), replicated on all
  devices of this job: the train state always is, whatever devices and processes saved it (a
  checkpoint of a 2-process run restores on one CPU, and the other way round)."""
  everywhere = sharding.replicated(sharding.make_mesh())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), tree)


def _steps(folder: str) -> list[int]:
  """The finished checkpoints of one manager folder (Orbax names them by the step)."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n, "state")))


def find_checkpoint(path: str) -> str:
  """The step folder of a finished checkpoint named by a workdir, a manager folder or a step.

  Args:
    path: a run's workdir (its best checkpoint, else its latest), a manager folder
      (`W/checkpoints_best`, `W/checkpoints`: its newest step) or one step's folder
      (`W/checkpoints/1200`).

  Raises:
    errors.UserError: no finished checkpoint there.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  for folder in [path] + [os.path.join(path, name) for name in FOLDERS.values()]:
    steps = _steps(folder)
    if steps:
      return os.path.join(folder, str(steps[-1]))
  raise errors.UserError(
      f"{path}: no finished checkpoint; expected a workdir of ours (with checkpoints_best/ or "
      "checkpoints/), one of those folders, or one step's folder holding state/")


def read_state(path: str) -> tuple[dict, str]:
  """Reads a finished checkpoint's train state as nested dicts, without a model to match.

  Every leaf comes back replicated on this job's devices, whatever saved it (`restore`).

  Args:
    path: as `find_checkpoint`.

  Returns:
    ({'guidance': {'params', 'batch_stats'}, 'denoiser': ..., 'step': ..., ...}, step folder).
  """
  folder = find_checkpoint(path)
  checkpointer = ocp.StandardCheckpointer()
  item = os.path.join(folder, "state")
  stored = checkpointer.metadata(item).item_metadata.tree
  return checkpointer.restore(item, replicated_target(stored)), folder


def check_structure(stored, expected, where: str) -> None:
  """Raises MismatchError (a ValueError) naming the first missing, unexpected or mis-shaped
  entry."""
  stored_flat = trees.flatten(stored)
  expected_flat = trees.flatten(jax.tree.map(ocp.utils.to_shape_dtype_struct, expected))
  missing = sorted(set(expected_flat) - set(stored_flat))
  extra = sorted(set(stored_flat) - set(expected_flat))
  if missing or extra:
    raise MismatchError(f"checkpoint {where} does not match the model built from the config: "
                     f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                     f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
  for name, want in expected_flat.items():
    got = stored_flat[name]
    if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise MismatchError(f"checkpoint {where}: {name} has shape {tuple(got.shape)} {got.dtype}, "
                       f"the config expects {tuple(want.shape)} {want.dtype}")
