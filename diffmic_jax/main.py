"""Command line: the only module that reads flags.

  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo [--mode train]
  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo --mode eval \
      [--checkpoint best|latest|STEP] [--split test|val|train]
  python -m diffmic_jax.main --config configs/ham10000.py --mode summary
  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo --mode predict \
      --input PATH [--output OUT] [--checkpoint best|latest|STEP] [--overlays]
"""

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
from diffmic_jax.training import summary
from diffmic_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
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
  if _MODE.value == "predict":
    if not _INPUT.value:
      raise ValueError("--mode predict needs --input PATH (an image, a folder or a CSV)")
    predict.predict_files(config, workdir, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value,
                          overlays=_OVERLAYS.value)
    return
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
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)


def _parse_flags(argv):
  """absl's parser, with a misspelled `--config.a.b` field reported as one line, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # raised by ml_collections for an unknown field
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    hint = " ".join(str(e.args[0] if e.args else e).replace("\\'", "'").split("\\n")).strip("'")
    print(f"error: unknown config field in {bad}: {hint}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
