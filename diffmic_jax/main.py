"""Command line: the only module that reads flags.

  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo [--mode train]
  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo --mode eval \
      [--checkpoint best|latest|STEP] [--split test|val|train]
  python -m diffmic_jax.main --config configs/ham10000.py --mode summary
  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo --mode predict \
      --input PATH [--output OUT] [--checkpoint best|latest|STEP] [--overlays]
"""

import json
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffmic_jax import distributed
from diffmic_jax import host
from diffmic_jax import predict
from diffmic_jax import summary
from diffmic_jax import train

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
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val", "train"], "--mode eval: split.")

# Errors a user can fix (a bad config value, a missing file or checkpoint): one clear line and
# exit status 1 instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, KeyError)


def _enable_compilation_cache() -> None:
  cache = os.environ.get("DIFFMIC_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "diffmic_jax", "xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run(argv) -> None:
  del argv
  config = _CONFIG.value
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
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  if jax.process_index() == 0:
    name = "config.json" if _MODE.value == "train" else "eval_config.json"
    with open(os.path.join(workdir, name), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if _MODE.value == "train":
    train.train_and_evaluate(config, workdir)
  else:
    train.evaluate_checkpoint(config, workdir, split=_SPLIT.value, checkpoint=_CHECKPOINT.value)


def main(argv) -> None:
  # Orbax and grain log every save at INFO; keep the console to our progress bar and reports
  # unless the user asks for more with --verbosity.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Before the first JAX computation: keep XLA's large CPU buffers in the allocator instead of
  # unmapping and page-faulting them every call (7% faster paper-config inference here; see
  # experiments/README.md). Only glibc's allocator settings change; harmless elsewhere.
  host.tune_cpu_malloc()
  _enable_compilation_cache()
  try:
    _run(argv)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
