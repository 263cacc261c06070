"""Weight conversion CLI: torchvision ResNets and official DiffMIC checkpoints. Never downloads.

torchvision state_dict -> trunk .npz (for config.guidance.pretrained / model.encoder_pretrained):

  python -m diffmic_jax.convert torchvision --arch resnet50 \
      --input resnet50-0676ba61.pth --output resnet50.npz

  .pth needs torch (`pip install torch==2.13.0`); .safetensors (`pip install safetensors`) and
  .npz of the same torchvision keys do not.

Official DiffMIC checkpoints -> an Orbax checkpoint that `--mode eval` restores:

  python -m diffmic_jax.convert official --ckpt ckpt_best.pth --aux-ckpt aux_ckpt_best.pth \
      --config configs/ham10000.py --workdir runs/ham10000_official [--use-ema]
  python -m diffmic_jax.main --config configs/ham10000.py --workdir runs/ham10000_official \
      --mode eval --checkpoint best

The official code (REFERENCE.md §6, §6.2) saves `ckpt*.pth` as a list
[model.state_dict(), optimizer.state_dict(), epoch, step] with the EMA shadow (a dict of
`named_parameters` names) appended in `ckpt.pth`, and `aux_ckpt*.pth` as
[dcg.state_dict(), aux_optimizer.state_dict()]. Only the state_dicts (and the EMA shadow) are
converted; the optimiser states are re-initialised.

Key names of the official modules (read from scott-yjyang/DiffMIC model.py and
pretraining/{dcg,modules}.py):
  ConditionalModel: encoder_x.f.{0: conv1, 1: bn1, 4..7: layer1..4}, encoder_x.g (Linear),
    norm (BN₀), lin{1,2,3}.lin (Linear), lin{1,2,3}.embed (Embedding), unetnorm{1,2,3}, lin4.
  DCG: ds_net.f.* (global ResNet-50, same nn.Sequential layout), left_postprocess_net.
    gn_conv_last (1×1 saliency conv), dn_resnet.f.* (local ResNet-50), mil_attn_U, mil_attn_V,
    mil_attn_w, classifier_linear (all bias-free Linear).
"""

import copy
import os
import pickle
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from diffmic_jax.nn import pretrained
from diffmic_jax.platform import errors
from diffmic_jax.run import workdir as workdir_lib

OFFICIAL_ABLATIONS = ("c2", "full")
CONFIG_HINT = ("the config must describe the official model: data.num_classes, "
               "diffusion.timesteps (embedding rows = T + 1), model.feature_dim, model.encoder, "
               "model.encoder_width/encoder_stage_sizes, model.conditioning='prior', "
               "guidance.backbone/width/stage_sizes and guidance.attention_dim")


# ---------------------------------------------------------------------------------------------
# Official name mapping.


def official_denoiser_module(path: Sequence[str]) -> str:
  """Our NoiseModel module path -> the official ConditionalModel module name.

  Args:
    path: e.g. ('encoder_net', 'layer1_0', 'bn1'), ('lin1', 'lin', 'dense'), ('norm2',).
  """
  head, rest = path[0], tuple(path[1:])
  if head == "encoder_net":
    return "encoder_x.f." + pretrained.trunk_module_name(rest, "sequential")
  simple = {("encoder_proj", ("dense",)): "encoder_x.g", ("norm", ()): "norm",
            ("lin4", ("dense",)): "lin4"}
  for i in (1, 2, 3):
    simple[(f"lin{i}", ("lin", "dense"))] = f"lin{i}.lin"
    simple[(f"lin{i}", ("embed",))] = f"lin{i}.embed"
    simple[(f"norm{i}", ())] = f"unetnorm{i}"
  if (head, rest) not in simple:
    raise KeyError(f"no official ConditionalModel name for our denoiser/{'/'.join(path)}")
  return simple[(head, rest)]


def official_dcg_module(path: Sequence[str]) -> str:
  """Our DCG module path -> the official DCG module name (see the module docstring)."""
  head, rest = path[0], tuple(path[1:])
  trunks = {"global_net": "ds_net.f.", "local_net": "dn_resnet.f."}
  if head in trunks:
    return trunks[head] + pretrained.trunk_module_name(rest, "sequential")
  simple = {("saliency", ()): "left_postprocess_net.gn_conv_last",
            ("mil", ("U", "dense")): "mil_attn_U", ("mil", ("V", "dense")): "mil_attn_V",
            ("mil", ("w", "dense")): "mil_attn_w",
            ("mil", ("classifier", "dense")): "classifier_linear"}
  if (head, rest) not in simple:
    raise KeyError(f"no official DCG name for our guidance/{'/'.join(path)}")
  return simple[(head, rest)]


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> dict:
  """Drops a 'module.' prefix that every key carries (nn.DataParallel checkpoints)."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict:
  return {str(k): pretrained.torch_to_numpy(v) for k, v in _strip_data_parallel(state_dict).items()}


def convert_official_model(state_dict: Mapping[str, Any], abstract_variables: Mapping,
                           module_name, source: str,
                           collections: Sequence[str] = pretrained.COLLECTIONS) -> dict:
  """Strictly converts an official state_dict into our {'params', 'batch_stats'} variables.

  Args:
    state_dict: official key -> tensor or array.
    abstract_variables: our model's variables (or ShapeDtypeStructs) giving the structure.
    module_name: `official_denoiser_module` or `official_dcg_module`.
    source: the file name, for errors.
    collections: which of our collections to fill ('params' alone for an EMA shadow, which
      holds parameters only).

  Returns:
    nested {collection: ...} of float32 jnp arrays.
  """
  expected = pretrained.flatten({c: abstract_variables[c] for c in collections})
  flat = pretrained.map_state_dict(_numpy_state_dict(state_dict), expected, module_name,
                                   source=source)
  return jax.tree.map(jnp.asarray, pretrained.unflatten(flat))


# ---------------------------------------------------------------------------------------------
# Reading official checkpoints.


def load_official_file(path: str, trust: bool = False):
  """torch.load of an official checkpoint on the CPU.

  Official checkpoints are lists [state_dict, optimizer_state, epoch, step(, ema_shadow)]
  (REFERENCE.md §6.2; diffusion_trainer.py), i.e. only tensors, dicts, lists, tuples, ints,
  floats, bools and None, which torch's safe `weights_only=True` unpickler accepts, so that is
  tried first. A file that needs more (e.g. a fork that pickled a whole module or a config
  object) can only be read with `weights_only=False`, which executes code stored in the file;
  that is done only when the user passes --trust-checkpoint for a file they trust.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; expected an official ckpt*.pth / "
                            "aux_ckpt*.pth written by torch.save")
  pretrained.check_torch_file(path)  # a missing, foreign or truncated file: named, without torch
  torch = pretrained.require_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust:
      raise errors.UserError(f"{path} holds objects beyond tensors and containers, which "
                             "torch's weights-only loader refuses; if you trust the file, rerun "
                             f"with --trust-checkpoint (full unpickling). Loader said: {e}") from e
  except (RuntimeError, EOFError, OSError) as e:
    raise errors.UserError(f"{path}: not a readable PyTorch checkpoint ({e}); expected an "
                           "official ckpt.pth / aux_ckpt.pth saved by torch.save") from e
  # The user vouched for the file (--trust-checkpoint): full unpickling, see the docstring.
  try:
    return torch.load(path, map_location="cpu", weights_only=False)
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
    raise errors.UserError(f"{path}: not a readable PyTorch checkpoint ({e})") from e


# What each official file holds (REFERENCE.md §6.2), for errors.
DENOISER_FILE = ("the official ckpt*.pth: a list [state_dict, optimizer_state, epoch, "
                 "step(, ema_shadow)] of the ConditionalModel, or a dict holding its state_dict "
                 "under 'state_dict' (PyTorch Lightning)")
DCG_FILE = ("the official aux_ckpt*.pth: a list [state_dict, optimizer_state] of the DCG, or a "
            "dict holding its state_dict under 'state_dict' (PyTorch Lightning)")


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _describe(obj) -> str:
  """A short description of what a file held instead of a checkpoint."""
  if isinstance(obj, Mapping):
    keys = [str(k) for k in list(obj)[:5]]
    return f"a dict with keys {keys}{' ...' if len(obj) > 5 else ''}"
  return type(obj).__name__


def _check_official_keys(state_dict: Mapping, prefix: str, model: str, path: str,
                         expected: str) -> None:
  """Raises unless `state_dict` holds the official `model`'s tensors (keys `prefix`...), e.g. for
  a Lightning checkpoint of another model, or the two files swapped."""
  keys = list(_strip_data_parallel(state_dict))
  if not any(k.startswith(prefix) for k in keys):
    raise ValueError(f"{path}: the state_dict holds no tensor of the official {model} "
                     f"({prefix}*; it has {len(keys)} tensors, e.g. {sorted(keys)[:3]}); "
                     f"expected {expected}")


def _step(value) -> int:
  return int(value) if isinstance(value, (int, np.integer)) else 0


def parse_denoiser_checkpoint(obj, path: str):
  """-> (state_dict, step, ema_shadow or None) from an official ckpt*.pth object.

  Accepts the official list, a bare state_dict, and a dict holding the state_dict under
  'state_dict' (a PyTorch Lightning .ckpt: its 'global_step' becomes the step).
  """
  if _is_state_dict(obj):
    state_dict, step, ema = obj, 0, None
  elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
    state_dict, step, ema = obj["state_dict"], _step(obj.get("global_step")), None
  elif isinstance(obj, (list, tuple)) and obj and _is_state_dict(obj[0]):
    state_dict, step = obj[0], (_step(obj[3]) if len(obj) > 3 else 0)
    ema = obj[4] if len(obj) > 4 and _is_state_dict(obj[4]) else None
  else:
    raise ValueError(f"{path}: expected {DENOISER_FILE}; got {_describe(obj)}")
  _check_official_keys(state_dict, "encoder_x.", "ConditionalModel", path, DENOISER_FILE)
  return state_dict, step, ema


def parse_aux_checkpoint(obj, path: str):
  """-> DCG state_dict from an official aux_ckpt*.pth object ([state_dict, optimizer_state], a
  bare state_dict, or a dict holding it under 'state_dict')."""
  if _is_state_dict(obj):
    state_dict = obj
  elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
    state_dict = obj["state_dict"]
  elif isinstance(obj, (list, tuple)) and obj and _is_state_dict(obj[0]):
    state_dict = obj[0]
  else:
    raise ValueError(f"{path}: expected {DCG_FILE}; got {_describe(obj)}")
  _check_official_keys(state_dict, "ds_net.", "DCG", path, DCG_FILE)
  return state_dict


# ---------------------------------------------------------------------------------------------
# Official checkpoint -> Orbax TrainState.


def build_official_state(config, denoiser_state_dict, dcg_state_dict, *, step: int = 0,
                         ema_shadow=None, use_ema: bool = False, sources=("ckpt", "aux_ckpt")):
  """Builds the TrainState that training and evaluation expect from official state_dicts.

  Args:
    config: the experiment config (must describe the official model, see CONFIG_HINT).
    denoiser_state_dict: ConditionalModel state_dict.
    dcg_state_dict: DCG state_dict.
    step: the official step counter (becomes TrainState.step and the checkpoint step).
    ema_shadow: the EMA shadow dict, or None.
    use_ema: the denoiser params become the EMA shadow.
    sources: (denoiser file, DCG file) names for errors.

  Returns:
    a train_state.TrainState with fresh optimiser states, checked against the abstract state that
    `train_state.create_train_state` builds for this config.
  """
  from diffmic_jax.diffusion import models as models_lib  # pylint: disable=g-import-not-at-top
  from diffmic_jax.run import checkpointing  # pylint: disable=g-import-not-at-top
  from diffmic_jax.run import train_state  # pylint: disable=g-import-not-at-top

  if config.ablation not in OFFICIAL_ABLATIONS:
    raise ValueError(f"config.ablation={config.ablation!r}: official checkpoints hold a DCG and "
                     f"a denoiser; use one of {list(OFFICIAL_ABLATIONS)}")
  if use_ema and ema_shadow is None:
    raise ValueError(f"--use-ema: {sources[0]} has no EMA shadow (only ckpt.pth written at the end "
                     "of training has one; ckpt_best.pth does not)")
  config = copy.deepcopy(config)
  config.guidance.pretrained = ""  # the official weights replace any ImageNet initialisation.
  config.model.encoder_pretrained = ""
  models = models_lib.create_models(config)
  guidance_tx, denoiser_tx, _ = train_state.build_optimizers(config, steps_per_epoch=1)
  seed_key = jax.random.PRNGKey(config.seed)
  abstract = train_state.abstract_train_state(models, config)
  try:
    denoiser = convert_official_model(denoiser_state_dict, abstract.denoiser,
                                      official_denoiser_module, sources[0])
    guidance = convert_official_model(dcg_state_dict, abstract.guidance, official_dcg_module,
                                      sources[1])
    ema = None
    if ema_shadow is not None:
      ema = convert_official_model(ema_shadow, abstract.denoiser, official_denoiser_module,
                                   f"{sources[0]} (EMA shadow)", collections=("params",))["params"]
  except pretrained.WeightMismatchError as e:
    raise pretrained.WeightMismatchError(f"{e}\nHint: {CONFIG_HINT}") from e
  if use_ema:
    denoiser = {**denoiser, "params": ema}
  _, key_train = jax.random.split(seed_key)
  state = train_state.from_variables({"guidance": guidance, "denoiser": denoiser}, guidance_tx,
                                     denoiser_tx, key_train, step=step, ema=ema)
  checkpointing.check_structure(state, abstract, "converted official weights")
  return state


def convert_official(config, ckpt: str, aux_ckpt: str, workdir: str, *, use_ema: bool = False,
                     trust: bool = False, kinds: Sequence[str] = ("latest", "best"),
                     force: bool = False) -> dict:
  """Converts official ckpt/aux_ckpt files into Orbax checkpoints under `workdir`.

  The workdir must be new or empty: a run's checkpoints are never deleted or replaced. The
  files are read and converted first, then the workdir's lock is taken (a training run in it
  refuses the conversion), and only then is anything written.

  Args:
    force: write into a workdir that already holds files: the converted checkpoint is added to
      checkpoints/ (nothing there is deleted, and an existing checkpoint of the same step is
      refused); checkpoints_best/ is written only when it holds no checkpoint yet.

  Returns:
    the meta written with the checkpoints (plus 'step', 'ema' and the 'kinds' written).

  Raises:
    errors.UserError: a non-empty workdir without `force`, a step that exists already, or a
      workdir held by a training run.
  """
  from diffmic_jax.run import checkpointing  # pylint: disable=g-import-not-at-top
  from diffmic_jax.run import train_state  # pylint: disable=g-import-not-at-top

  state_dict, step, ema_shadow = parse_denoiser_checkpoint(load_official_file(ckpt, trust), ckpt)
  dcg_state_dict = parse_aux_checkpoint(load_official_file(aux_ckpt, trust), aux_ckpt)
  state = build_official_state(config, state_dict, dcg_state_dict, step=step,
                               ema_shadow=ema_shadow, use_ema=use_ema, sources=(ckpt, aux_ckpt))
  meta = train_state.run_meta(None, "joint", best_step=step, source="official")
  lock = workdir_lib.lock(workdir)
  try:
    kinds = _kinds_to_write(workdir, kinds, step, force)
    # keep=None: saving never deletes an older checkpoint of the latest manager.
    checkpointer = checkpointing.Checkpointer(workdir, keep=None)
    try:
      for kind in kinds:
        checkpointer.save(kind, step, state, meta)
      checkpointer.wait()
    finally:
      checkpointer.close()
  finally:
    lock.close()
  return {**meta, "step": step, "ema": ema_shadow is not None, "kinds": list(kinds)}


def _kinds_to_write(workdir: str, kinds: Sequence[str], step: int, force: bool) -> list[str]:
  """The checkpoint kinds a conversion may write into `workdir` (see `convert_official`)."""
  present = sorted(set(os.listdir(workdir)) - {workdir_lib.LOCK_FILE})
  if present and not force:
    raise errors.UserError(
        f"--workdir {workdir} is not empty (holds {', '.join(present[:5])}"
        f"{', ...' if len(present) > 5 else ''}): converting into a run could replace its "
        "checkpoints; pick a new --workdir, or pass --force to add the converted checkpoint "
        "beside them (checkpoints_best/ is never touched then)")
  steps = {kind: _finished_steps(os.path.join(workdir, folder))
           for kind, folder in (("latest", "checkpoints"), ("best", "checkpoints_best"))}
  if step in steps["latest"]:
    raise errors.UserError(f"{os.path.join(workdir, 'checkpoints', str(step))} exists: the "
                           f"converted step {step} would replace it; use a new --workdir")
  written = [k for k in kinds if not (k == "best" and steps["best"])]
  if len(written) < len(kinds):
    logging.warning("%s holds a best checkpoint (steps %s): left untouched, the converted "
                    "weights are written to checkpoints/ only",
                    os.path.join(workdir, "checkpoints_best"), sorted(steps["best"]))
  return written


def _finished_steps(folder: str) -> set[int]:
  """Steps of the finished checkpoints in an Orbax folder (named by their step)."""
  if not os.path.isdir(folder):
    return set()
  return {int(name) for name in os.listdir(folder) if name.isdigit()}


def convert_torchvision_file(input_path: str, output_path: str, arch: Optional[str]) -> dict:
  """torchvision state_dict file -> trunk .npz. Returns a short summary."""
  if not output_path.endswith(".npz"):
    raise ValueError(f"--output={output_path}: the converted trunk is an .npz file")
  state_dict = pretrained.read_state_dict(input_path)
  flat, signature = pretrained.convert_torchvision(state_dict, arch, source=input_path)
  pretrained.save_trunk(output_path, flat, signature, source=input_path)
  ignored = [k for k in state_dict if k in pretrained.TORCHVISION_IGNORED
             or k.endswith(pretrained.IGNORED_SUFFIXES)]
  return {"arch": signature.describe(), "tensors": len(flat), "ignored": ignored}


# ---------------------------------------------------------------------------------------------
# CLI.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags (only when run as a program, so that importing this module never
  clashes with the flags of diffmic_jax.main, e.g. --config and --workdir)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (official mode).",
                                  flag_values=flag_values)
  flags.DEFINE_enum("arch", None, ["resnet18", "resnet34", "resnet50"],
                    "torchvision architecture the input must be (torchvision mode).",
                    flag_values=flag_values)
  flags.DEFINE_string("input", None, "torchvision state_dict: .pth, .safetensors or .npz.",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "Converted trunk .npz to write.", flag_values=flag_values)
  flags.DEFINE_string("ckpt", None, "Official ckpt.pth / ckpt_best.pth (denoiser).",
                      flag_values=flag_values)
  flags.DEFINE_string("aux-ckpt", None, "Official aux_ckpt.pth / aux_ckpt_best.pth (DCG).",
                      flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Workdir to write the Orbax checkpoints into.",
                      flag_values=flag_values)
  flags.DEFINE_bool("use-ema", False, "Use the EMA shadow of ckpt.pth as the denoiser weights "
                    "(ckpt_best.pth has none). Without it the raw weights are used and the "
                    "shadow, if any, becomes the EMA.", flag_values=flag_values)
  flags.DEFINE_bool("force", False, "Official mode: write into a --workdir that already holds "
                    "files; nothing there is deleted or replaced, and an existing best "
                    "checkpoint is kept.", flag_values=flag_values)
  flags.DEFINE_bool("trust-checkpoint", False, "If a .pth cannot be read with torch's safe "
                    "weights-only loader, unpickle it in full (this runs code stored in the "
                    "file: only for files you trust).", flag_values=flag_values)


def _require(fv: flags.FlagValues, *names: str):
  missing = [n for n in names if fv[n].value is None or fv[n].value == ""]
  if missing:
    raise app.UsageError(f"missing flag(s): {', '.join('--' + m for m in missing)}")


def _run_torchvision(fv: flags.FlagValues):
  _require(fv, "arch", "input", "output")
  summary = convert_torchvision_file(fv["input"].value, fv["output"].value, fv["arch"].value)
  print(f"Converted {summary['tensors']} tensors of a {summary['arch']} trunk to "
        f"{fv['output'].value} (ignored: {len(summary['ignored'])} fc/num_batches_tracked "
        "entries).")


def _run_official(fv: flags.FlagValues):
  _require(fv, "config", "ckpt", "aux-ckpt", "workdir")
  workdir, use_ema = fv["workdir"].value, fv["use-ema"].value
  meta = convert_official(fv["config"].value, fv["ckpt"].value, fv["aux-ckpt"].value, workdir,
                          use_ema=use_ema, trust=fv["trust-checkpoint"].value,
                          force=fv["force"].value)
  weights = "EMA shadow" if use_ema else "raw weights"
  written = " and ".join(f"'{k}'" for k in meta["kinds"])
  print(f"Wrote {written} checkpoints at step {meta['step']} ({weights}; EMA shadow "
        f"{'found' if meta['ema'] else 'absent'}) to {os.path.abspath(workdir)}.\n"
        "Evaluate: python -m diffmic_jax.main --config <the same config and overrides> "
        f"--workdir {workdir} --mode eval --checkpoint "
        f"{'best' if 'best' in meta['kinds'] else meta['step']}")


COMMANDS = {"torchvision": _run_torchvision, "official": _run_official}


def run_command(command: str, fv: flags.FlagValues = flags.FLAGS) -> None:
  """Runs one CLI command with parsed flags `fv` (see `define_flags`)."""
  if command not in COMMANDS:
    raise app.UsageError(f"usage: python -m diffmic_jax.convert COMMAND [flags]; COMMAND is one "
                         f"of {sorted(COMMANDS)} (got {command!r})")
  COMMANDS[command](fv)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"usage: python -m diffmic_jax.convert COMMAND [flags]; COMMAND is one "
                         f"of {sorted(COMMANDS)} (got {argv[1:]})")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO.
  try:
    run_command(argv[1])
  # ValueError: the package's user errors (a list or a tensor where a checkpoint was
  # expected, a bad config value), as in diffmic_jax.main.
  except (errors.UserError, ValueError, pretrained.WeightMismatchError, FileNotFoundError,
          PermissionError, ImportError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
