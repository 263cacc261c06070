"""Few-step study: accuracy, macro-F1 and images/s against the number of reverse steps.

For each sampler (official_truncated, full, respaced) and each step count (1, 2, 5, 10, 20, 50,
100, 250, 1000, clipped to T; `full` always runs all T), scores a trained checkpoint on one
split through the evaluation code path (`evaluate.predict`, the --mode eval batches and keys)
and times the pass after compilation (data loading included, compile excluded).

  python experiments/accuracy/steps.py --config configs/demo.py --workdir runs/demo \
      [--checkpoint best] [--split test] [--num_samples 1] [--repeats 1] \
      [--json runs/demo/steps.json] [--png runs/demo/steps.png]

The config must be the one the run was trained with (split.json is checked against it).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Lets `python experiments/accuracy/steps.py` import configs/ and diffmic_jax from the repo root.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from diffmic_jax.data import input_pipeline
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.evaluation import evaluate
from diffmic_jax.platform import sharding
from diffmic_jax.run import metrics
from diffmic_jax.run import run as run_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_SPLIT = flags.DEFINE_enum("split", "test", splits_lib.SPLIT_NAMES, "Split to score.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Reverse samples per image (S).")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "5", "10", "20", "50", "100", "250", "1000"],
                           "Step counts (clipped to T).")
_SAMPLERS = flags.DEFINE_list("samplers", ["official_truncated", "full", "respaced"],
                              "Samplers to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed passes per setting; the fastest counts.")
_JSON = flags.DEFINE_string("json", None, "Output JSON (default WORKDIR/eval/steps.json).")
_PNG = flags.DEFINE_string("png", None, "Output PNG (default WORKDIR/eval/steps.png).")


def step_counts(sampler_name: str, requested, num_timesteps: int) -> list[int]:
  """The step counts a sampler is run with: `full` only T; the others the requested ones
  clipped to [1, T], without repeats, ascending."""
  if sampler_name == "full":
    return [num_timesteps]
  return sorted({min(max(int(n), 1), num_timesteps) for n in requested})


def measure(models, variables, batches, key, mesh, num_classes, *, sampler_name, num_steps,
            num_samples, repeats: int = 1) -> dict:
  """Accuracy, macro-F1 and images/s of one sampler setting over a split."""
  # Compile first (evaluate.predict reuses this cached jitted sampler), then time a full pass.
  # pylint: disable-next=protected-access
  sample_fn = evaluate._sample_fn(models, sampler_name, num_steps, num_samples)
  first = next(iter(batches))
  jax.block_until_ready(sample_fn(variables, sharding.put_batch(first, mesh)["image"], key))
  seconds = []
  for _ in range(max(1, repeats)):  # same key: every pass gives the same predictions
    start = time.perf_counter()
    predictions = evaluate.predict(models, variables, batches, key, mesh,
                                   sampler_name=sampler_name, num_steps=num_steps,
                                   num_samples=num_samples)
    seconds.append(time.perf_counter() - start)
  seconds = min(seconds)
  scores = metrics.classification_metrics(predictions["probs"], predictions["labels"],
                                          num_classes)
  n = len(predictions["labels"])
  return {"sampler": sampler_name, "steps": num_steps, "num_samples": num_samples,
          "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"],
          "num_examples": n, "seconds": seconds, "images_per_s": n / seconds}


def save_png(rows: list[dict], path: str, title: str) -> None:
  """Accuracy and macro-F1 (left) and images/s (right) against steps, one line per sampler."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["sampler"] for r in rows):
    mine = [r for r in rows if r["sampler"] == name]
    steps = [r["steps"] for r in mine]
    style = dict(marker="o", markersize=4, linestyle="-" if len(mine) > 1 else "none")
    line, = quality.plot(steps, [r["accuracy"] for r in mine], label=f"{name} accuracy", **style)
    quality.plot(steps, [r["f1_macro"] for r in mine], color=line.get_color(),
                 label=f"{name} macro F1", **{**style, "linestyle": ":", "marker": "s"})
    speed.plot(steps, [r["images_per_s"] for r in mine], label=name, **style)
  for ax, ylabel in ((quality, "score"), (speed, "images/s")):
    ax.set_xscale("log")
    ax.set(xlabel="reverse steps", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required")
  models, variables = evaluate.load_variables(config, workdir, _CHECKPOINT.value)
  splits = input_pipeline.create_splits(config.data, workdir)  # checks split.json
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)
  batch = sharding.check_batch_size(config.training.eval_batch_size, mesh,
                                    "training.eval_batch_size")
  batches = input_pipeline.eval_batches(getattr(splits, _SPLIT.value), config.data,
                                        batch_size=batch)
  rows = []
  for name in _SAMPLERS.value:
    for steps in step_counts(name, _STEPS.value, models.num_timesteps):
      row = measure(models, variables, batches, run_lib.eval_key(config), mesh,
                    models.num_classes, sampler_name=name, num_steps=steps,
                    num_samples=_NUM_SAMPLES.value, repeats=_REPEATS.value)
      rows.append(row)
      print(f"{name:>20} {steps:>5} steps: accuracy {row['accuracy']:.4f}, macro F1 "
            f"{row['f1_macro']:.4f}, {row['images_per_s']:.1f} images/s", flush=True)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  json_path = _JSON.value or os.path.join(out_dir, "steps.json")
  png_path = _PNG.value or os.path.join(out_dir, "steps.png")
  metrics.write_json(json_path, {"checkpoint": _CHECKPOINT.value, "split": _SPLIT.value,
                                 "device": str(jax.devices()[0]), "rows": rows})
  save_png(rows, png_path, f"{_SPLIT.value} split, S={_NUM_SAMPLES.value}, T="
           f"{models.num_timesteps}")
  print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
