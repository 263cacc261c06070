"""Command line: the only module that reads flags.

  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo [--mode train]
  python -m diffmic_jax.main --workdir runs/demo --mode eval
      (options: --checkpoint best|latest|STEP, --split test|val|train)
  python -m diffmic_jax.main --config configs/ham10000.py --mode summary
  python -m diffmic_jax.main --workdir runs/demo --mode predict --input PATH
      (options: --output OUT, --checkpoint best|latest|STEP, --overlays)

`--config` is a Python config file (`get_config()`) or a resolved config.json of a run. Eval
and predict read the run's own WORKDIR/config.json when --config is left out; fields that do
not change the model or its preprocessing (batch size, sampler, number of samples, ...) may
be overridden with `--config.a.b=value`, the others must agree with the run's
(`workdir.check_eval_config`).
"""

import errno
import json
import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffmic_jax.data import splits as splits_lib
from diffmic_jax.evaluation import evaluate
from diffmic_jax.evaluation import predict
from diffmic_jax.platform import distributed
from diffmic_jax.platform import errors
from diffmic_jax.platform import files
from diffmic_jax.platform import host
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import workdir as workdir_lib
from diffmic_jax.training import summary
from diffmic_jax.training import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a Python file with get_config() or a run's config.json "
    "(default for --mode eval|predict: WORKDIR/config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "summary", "predict"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best",
                                  "--mode eval|predict: 'best', 'latest' or a step number.")
_INPUT = flags.DEFINE_string("input", None, "--mode predict: an image, a folder (recursive) or "
                             "a CSV with a 'path' column.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode predict: output folder "
                              "(default WORKDIR/predict).")
_OVERLAYS = flags.DEFINE_bool("overlays", False, "--mode predict: write an explanation PNG "
                               "(CAM, ROI boxes, attention) per image to OUTPUT/overlays.")
_SPLIT = flags.DEFINE_enum("split", "test", splits_lib.SPLIT_NAMES, "--mode eval: split.")

# Errors a user can fix (a bad config value, a missing file or checkpoint, a workdir that cannot
# be written): one clear line and exit status 1 instead of a traceback. KeyError, TypeError and
# the rest are bugs and keep their traceback.
USER_ERRORS = (errors.UserError, ValueError, FileNotFoundError, PermissionError,
               FloatingPointError)
# OSErrors of a full disk, a quota or a read-only file system: one line too.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _enable_compilation_cache() -> None:
  cache = os.environ.get("DIFFMIC_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "diffmic_jax", "xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run(argv) -> None:
  del argv
  config = _CONFIG.value
  run_lib.apply_deprecated_names(config)
  if _MODE.value == "summary":
    print(json.dumps(summary.model_summary(config), indent=2))
    return
  if not _WORKDIR.value:
    raise ValueError("--workdir is required for --mode train, eval and predict")
  workdir = _WORKDIR.value
  if _MODE.value in ("eval", "predict"):
    workdir_lib.check_eval_config(config, workdir)
    if _argv_value(sys.argv, "config") is None and not _given("config.training.distributed"):
      # The run's config.json of a run trained by several processes says distributed=True:
      # how it was launched, not the model. One process evaluates it unless the command says
      # otherwise (the launcher and a SLURM command pass --config.training.distributed=True).
      config.training.distributed = False
  if _MODE.value == "predict":
    if not _INPUT.value:
      raise ValueError("--mode predict needs --input PATH (an image, a folder or a CSV)")
    predict.predict_files(config, workdir, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value,
                          overlays=_OVERLAYS.value)
    return
  # A bad value is one line from every process before they connect (no runtime logs); a batch
  # that cannot split over the processes too.
  run_lib.validate_config(config, shapes=False)
  if config.training.distributed and (count := distributed.planned_process_count()):
    if config.training.batch_size % count:
      raise errors.UserError(f"config.training.batch_size={config.training.batch_size} must "
                             f"be divisible by the number of processes ({count})")
  # Before anything asks JAX for its devices: join the other processes of a multi-process run.
  distributed.initialize(config.training.distributed)
  if jax.process_index() != 0 and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # other processes would repeat process 0's lines
  logging.info("devices: %s; malloc: %s", jax.devices(), host.malloc_in_use())
  if jax.default_backend() == "cpu" and (hint := host.tcmalloc_hint()):
    logging.info(hint)
  if _MODE.value == "train":
    # train_and_evaluate locks the workdir and writes config.json once the run is accepted.
    train.train_and_evaluate(config, workdir)
    return
  if not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir {workdir}: no such directory (train first)")
  evaluate.evaluate_checkpoint(config, workdir, split=_SPLIT.value, checkpoint=_CHECKPOINT.value)
  if jax.process_index() == 0:  # the config of the last evaluation, written after it succeeded
    files.write_text(os.path.join(workdir, "eval_config.json"),
                     config.to_json_best_effort(indent=2))


class _OwnInfoOnly(std_logging.Filter):
  """Passes our INFO lines (resuming, dataset preparation) and everyone's warnings: orbax and
  grain log every save at INFO, which --verbosity=0 shows."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def main(argv) -> None:
  # Status lines go through absl logging (stderr), results (the metrics table) to stdout.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  # Before the first JAX computation: keep XLA's large CPU buffers in the allocator instead of
  # unmapping and page-faulting them every call (7% faster paper-config inference here; see
  # experiments/speed/README.md). Only glibc's allocator settings change; harmless elsewhere.
  host.tune_cpu_malloc()
  _enable_compilation_cache()
  # A failing process of a multi-process run exits at once, so that its peers are stopped.
  with distributed.exit_at_once_on_error():
    try:
      _run(argv)
    except USER_ERRORS as e:
      errors.report(f"error: {e}")
      sys.exit(1)
    except errors.Preempted as e:  # SIGTERM/SIGINT during training: saved, then stopped
      if jax.process_index() == 0:
        errors.report(f"preempted: {e}")
      sys.exit(e.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: one line, not a traceback
      errors.report("interrupted (SIGINT); nothing half-written is kept")
      sys.exit(130)
    except OSError as e:
      if e.errno not in _FULL_OR_READ_ONLY:
        raise
      errors.report(f"error: {e.filename or 'a file'}: {e.strerror}; expected free space in a "
                    "writable --workdir (and data.data_dir)")
      sys.exit(1)


# The repository's root (holding configs/) when the package runs from a checkout.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


class _ConfigParser(flags.ArgumentParser):
  """--config: a resolved config.json (`workdir.read_config`) or a Python config file (read by
  ml_collections' own parser), whose `from configs import ...` works from any directory."""

  def __init__(self, python_parser):
    self._python_parser = python_parser

  def parse(self, argument):
    if argument.lower().endswith(".json"):
      config = workdir_lib.read_config(argument)
      config.lock()
      return config
    _make_configs_importable(argument)
    return self._python_parser.parse(argument)

  def flag_type(self):
    return self._python_parser.flag_type()


def _make_configs_importable(path: str) -> None:
  """Configs import each other (`from configs import default`): a config inside a `configs`
  package resolves them there (first on sys.path); any other falls back to the installed
  `configs` package or, from a checkout, the repository's (last on sys.path)."""
  folder = os.path.dirname(os.path.abspath(path))
  if (os.path.basename(folder) == "configs"
      and os.path.isfile(os.path.join(folder, "__init__.py"))):
    sys.path.insert(0, os.path.dirname(folder))
  if _REPO_ROOT not in sys.path and os.path.isdir(os.path.join(_REPO_ROOT, "configs")):
    sys.path.append(_REPO_ROOT)


def _given(name: str) -> bool:
  """Whether the command line set flag `name` (a `config.a.b` override exists only then)."""
  return name in flags.FLAGS and flags.FLAGS[name].present


def _argv_value(argv, name: str):
  """The value of --name in argv (`--name=v` or `--name v`), or None."""
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    for prefix in (f"--{name}", f"-{name}"):
      if arg.startswith(prefix + "="):
        return arg[len(prefix) + 1:]
      if arg == prefix and i + 1 < len(argv):
        return argv[i + 1]
  return None


_HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def _with_config(argv) -> list[str]:
  """argv with --config resolved: a missing file is one line; left out, --mode eval|predict
  take WORKDIR/config.json (training writes it), train and summary refuse."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    # absl prints the help and exits, nothing needs a config; -h as in convert and launch.
    return [argv[0], *("--help" if arg == "-h" else arg for arg in argv[1:])]
  path = _argv_value(argv, "config")
  if path is not None:
    config_file = path.split(":", 1)[0]  # ml_collections passes 'file.py:arg' to get_config
    if not os.path.isfile(config_file):
      raise errors.UserError(f"--config {config_file}: no such file; expected a Python config "
                             "(configs/*.py) or a run's config.json")
    return argv
  mode, workdir = _argv_value(argv, "mode") or "train", _argv_value(argv, "workdir")
  if mode not in ("eval", "predict") or not workdir:
    raise errors.UserError(f"--config is required for --mode {mode} (--mode eval and predict "
                           "read WORKDIR/config.json without it)")
  saved = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(saved):
    raise errors.UserError(f"{saved}: no such file (this workdir was not made by training); "
                           "pass the run's --config")
  return [argv[0], f"--config={saved}", *argv[1:]]


def _parse_flags(argv):
  """absl's parser, with a misspelled `--config.a.b` field, a missing or bad --config and any
  other bad flag reported as one line, not a traceback."""
  try:
    argv = _with_config(argv)
    rest = flags.FLAGS(argv)
    if len(rest) > 1:  # words that are no flag: a copied `[--x]`, a value without its --name
      raise errors.UserError(
          f"unexpected argument(s) {' '.join(rest[1:])}: every option is --name=value or "
          "--name value (a boolean: --name or --noname), typed without the usage's [ ]")
    return rest
  except (errors.UserError, flags.Error) as e:
    errors.report(f"error: {e}")
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # raised by ml_collections for an unknown field
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    inner = e
    while isinstance(inner, BaseException) and inner.args:  # ml_collections nests a KeyError
      inner = inner.args[0]
    name, _, suggestion = str(inner).partition("\n")  # "'field'\nDid you mean ...?"
    hint = f"{name}; {suggestion[:1].lower()}{suggestion[1:]}" if suggestion else name
    errors.report(f"error: unknown config field in {bad}: {hint}")
    sys.exit(1)


flags.FLAGS["config"].parser = _ConfigParser(flags.FLAGS["config"].parser)

if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
