"""`--mode predict`: classifies new image files with a trained checkpoint.

  python -m diffmic_jax.main --workdir W --mode predict --input PATH \
      [--output OUT] [--checkpoint best|latest|STEP] [--overlays]

The config is the run's own W/config.json (see main.py).

PATH is an image, a folder (searched recursively) or a CSV with a `path` column. Every image
goes through the preprocessing of the dataset builders (centre square crop, bilinear resize:
`data.images.preprocess`) and the normalisation of evaluation batches
(`input_pipeline.normalise`), then through the evaluation code path (`evaluate.predict`: the
same jitted sampler, batch size and PRNG keys as `--mode eval`), so an image of the test split
gets exactly the prediction `--mode eval` gives it when both see the same images in the same
order. An input of fewer images than `training.eval_batch_size` runs as one batch of just
those images (`batch_size_for`): the same noise per image, so the same predictions up to
float32 round-off, in a fraction of the time. Files and folders that cannot be read are listed
in OUT/skipped.csv with the reason, never fatal.
"""

import csv
import itertools
import json
import os
from typing import Iterator

import jax
import numpy as np
import tqdm
from absl import logging
from scipy import special

from diffmic_jax.data import images as images_lib
from diffmic_jax.data import input_pipeline
from diffmic_jax.evaluation import evaluate
from diffmic_jax.evaluation import explain
from diffmic_jax.platform import errors
from diffmic_jax.platform import files
from diffmic_jax.platform import sharding
from diffmic_jax.run import run as run_lib


def find_inputs(path: str) -> tuple[list[str], list[tuple[str, str]]]:
  """The image files named by --input, in a fixed order.

  Args:
    path: one image file, a folder (every non-hidden file below it, sorted by relative path) or
      a `.csv` with a `path` column (relative paths are relative to the CSV's folder).

  Returns:
    (paths, unreadable folders as (folder, reason): listed in skipped.csv, never dropped
     silently).

  Raises:
    FileNotFoundError: PATH does not exist.
    errors.UserError: a CSV without a `path` column or not in UTF-8.
  """
  if os.path.isdir(path):
    found, unreadable = [], []
    def refused(error: OSError):
      unreadable.append((error.filename, f"unreadable folder ({error.strerror})"))
    for root, dirs, names in os.walk(path, onerror=refused):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, f) for f in names if not f.startswith(".")]
    return sorted(found, key=lambda p: os.path.relpath(p, path)), sorted(unreadable)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input {path}: no such file or folder")
  if path.lower().endswith(".csv"):
    return _read_csv(path), []
  return [path], []


def _read_csv(path: str) -> list[str]:
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      if "path" not in (reader.fieldnames or []):
        raise errors.UserError(f"--input {path}: no 'path' column; expected a CSV whose header "
                               f"names a 'path' column, got {reader.fieldnames}")
      rows = [row["path"].strip() for row in reader if (row.get("path") or "").strip()]
  except UnicodeDecodeError as e:
    raise errors.UserError(f"--input {path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                           "save the CSV as UTF-8") from e
  base = os.path.dirname(os.path.abspath(path))
  return [p if os.path.isabs(p) else os.path.join(base, p) for p in rows]


def class_names(config, workdir: str) -> tuple[str, ...]:
  """The run's class names: WORKDIR/split.json (written at training time), else
  data.class_names, else class_0..class_{C-1}."""
  path = os.path.join(workdir, "split.json")
  names = ()
  if os.path.isfile(path):
    with open(path) as f:
      names = tuple(json.load(f).get("class_names", ()))
  names = names or tuple(config.data.class_names)
  c = config.data.num_classes
  if names and len(names) != c:
    raise ValueError(f"{path}: {len(names)} class names but data.num_classes={c}")
  return names or tuple(f"class_{i}" for i in range(c))


def load_image(path: str, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3]: the builders' decoding, centre square crop and resize of one file.

  Raises:
    images.BadImageError: missing, unreadable or unsupported file.
  """
  return images_lib.preprocess(images_lib.open_rgb(path), image_size)


def batch_size_for(num_images: int, eval_batch_size: int, num_devices: int) -> int:
  """The batch `predict_files` runs: `eval_batch_size`, or for fewer images the smallest
  multiple of the device count that holds them all.

  One image would otherwise be padded to a whole evaluation batch (64 at the paper's
  configuration: 64 × S chains where one is wanted). Row i of every random draw is the same
  in any batch of more than i rows (JAX's default threefry draws are partitionable: each
  element's bits depend on its index alone), so the smaller batch gives each image the noise
  it gets in the full one; only the order of float32 sums differs.
  """
  needed = -(-max(num_images, 1) // num_devices) * num_devices
  return min(eval_batch_size, needed)


def _batches(paths, image_size: int, batch_size: int, good: list, skipped: list,
             progress) -> Iterator[dict]:
  """Padded evaluation batches ({'image', 'label', 'mask'}) of the readable files.

  Appends the path of every readable file to `good` and (path, reason) of every other file
  to `skipped`, in input order.
  """
  pending = []
  for path in paths:
    try:
      pending.append(load_image(path, image_size))
      good.append(path)
    except images_lib.BadImageError as e:
      skipped.append((path, e.problem))
    progress.update(1)
    if len(pending) == batch_size:
      yield _pad(pending, batch_size)
      pending = []
  if pending:
    yield _pad(pending, batch_size)


def _pad(images: list, batch_size: int) -> dict:
  """A batch of fixed size (one compiled program): padding rows are zero, mask False."""
  n = len(images)
  image = np.zeros((batch_size,) + images[0].shape, np.float32)
  image[:n] = input_pipeline.normalise(np.stack(images))
  return {"image": image, "label": np.zeros(batch_size, np.int32),
          "mask": np.arange(batch_size) < n}


# File names need not be UTF-8 (Linux allows any bytes): Python carries the odd bytes as
# surrogates, written back as the same bytes so a CSV row names the file exactly.
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}

# predictions.csv gains its rows every CHUNK_BATCHES batches: a crash or a kill keeps them.
CHUNK_BATCHES = 8


def _write_csv(path: str, header: list, rows) -> None:
  """Writes a CSV atomically (temporary file then rename)."""
  with files.atomic_open(path, "w", **CSV_ENCODING) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def prediction_header(names) -> list[str]:
  """The columns of predictions.csv; see `predict_files`."""
  return (["path", "prediction", "vote_share", "vote_entropy", "interval_separated",
           "dcg_prediction", "dcg_probability"] + [f"p_{n}" for n in names]
          + [f"vote_{n}" for n in names] + ["softmax_entropy"])


def prediction_rows(paths, predictions: dict, names) -> list[list]:
  """The rows of predictions.csv of `paths` and their `evaluate.predict` outputs."""
  probs, votes = predictions["probs"], predictions["vote_probs"]
  dcg_probs = special.softmax(predictions["fused"].astype(np.float64), axis=1)
  rows = []
  for i, path in enumerate(paths):
    k, g = int(predictions["prediction"][i]), int(dcg_probs[i].argmax())
    rows.append([path, names[k] if k >= 0 else "diverged", f"{votes[i][k] if k >= 0 else 0:.6f}",
                 f"{predictions['vote_entropy'][i]:.6f}",
                 int(predictions["interval_separated"][i]), names[g], f"{dcg_probs[i, g]:.6f}"]
                + [f"{p:.6f}" for p in probs[i]] + [f"{v:.6f}" for v in votes[i]]
                + [f"{predictions['entropy'][i]:.6f}"])
  return rows


def _output_folder(output_dir: str) -> str:
  """OUT, refused (one line) when it is a file or cannot be created."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise errors.UserError(f"--output {output_dir}: an existing file; expected a folder "
                           "(new or existing) for predictions.csv")
  return output_dir


def _make_folder(output_dir: str) -> None:
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"--output {output_dir}: cannot create the folder ({e.strerror}); "
                           "expected a writable folder") from e


def predict_files(config, workdir: str, input_path: str, output_dir: str | None = None,
                  checkpoint: str = "best", overlays: bool = False) -> dict:
  """Classifies every image named by `input_path` and writes the results.

  Writes OUT/predictions.csv, one row per readable image in input order, CHUNK_BATCHES batches
  at a time (a crash keeps the rows so far): path; prediction, the class most of the S =
  diffusion.predict_num_samples reverse samples vote for (ties broken by the mean softmax;
  the official argmax ŷ₀ for S = 1); vote_share, that class's share of the votes; vote_entropy,
  the entropy of the vote (0 = unanimous); interval_separated, 1 when the predicted class's
  95% interval of ŷ₀ lies above every other class's; the DCG's prediction and its softmax
  probability; per class the mean softmax p_<class> and the vote share vote_<class>; and
  softmax_entropy, the entropy of the mean softmax. OUT/skipped.csv (path, reason) lists the
  files and folders that could not be read; OUT/predict_config.json the config used.

  Args:
    config: the config the checkpoint was trained with (main.py reads WORKDIR/config.json).
    workdir: the training workdir (checkpoints, split.json).
    input_path: an image, a folder or a CSV with a `path` column (`find_inputs`).
    output_dir: OUT; default WORKDIR/predict.
    checkpoint: 'best', 'latest' or a step number.
    overlays: also write OUT/overlays/<n>_<file name>.png for every image (`explain`).

  Returns:
    {'output_dir', 'num_predicted', 'num_skipped'}.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir}: no such folder (train first)")
  output_dir = _output_folder(output_dir or os.path.join(workdir, "predict"))
  paths, skipped = find_inputs(input_path)
  names = class_names(config, workdir)
  models, variables = evaluate.load_variables(config, workdir, checkpoint)
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)  # batches are sharded over the mesh
  batch_size = sharding.check_batch_size(config.training.eval_batch_size, mesh,
                                         "training.eval_batch_size")
  if jax.config.jax_threefry_partitionable:  # else a row's noise depends on the batch size
    batch_size = batch_size_for(len(paths), batch_size, mesh.size)
  _make_folder(output_dir)
  files.write_text(os.path.join(output_dir, "predict_config.json"),
                   config.to_json_best_effort(indent=2))
  good, num_batches = [], 0
  d = config.diffusion
  with (tqdm.tqdm(total=len(paths), desc="predict", unit="image", dynamic_ncols=True) as bar,
        open(os.path.join(output_dir, "predictions.csv"), "w", **CSV_ENCODING) as out):
    writer = csv.writer(out)
    writer.writerow(prediction_header(names))
    out.flush()
    batches = _batches(paths, config.data.image_size, batch_size, good, skipped, bar)
    while chunk := list(itertools.islice(batches, CHUNK_BATCHES)):
      first_row = len(good) - sum(int(b["mask"].sum()) for b in chunk)
      predictions = evaluate.predict(models, variables, chunk, run_lib.eval_key(config), mesh,
                                     sampler_name=d.sampler, num_steps=d.test_steps,
                                     num_samples=d.predict_num_samples, first_batch=num_batches)
      num_batches += len(chunk)
      writer.writerows(prediction_rows(good[first_row:], predictions, names))
      out.flush()
      if overlays:
        write_overlays(models, variables, good[first_row:], predictions, names,
                       config.data.image_size, batch_size, os.path.join(output_dir, "overlays"),
                       first_row=first_row)
  _write_csv(os.path.join(output_dir, "skipped.csv"), ["path", "reason"], skipped)
  if overlays and not good:
    logging.warning("--overlays: no readable image, no overlays written")
  print(f"{len(good)} images classified, {len(skipped)} skipped; see {output_dir}/predictions.csv"
        + (f" and {output_dir}/skipped.csv" if skipped else ""), flush=True)
  return {"output_dir": output_dir, "num_predicted": len(good), "num_skipped": len(skipped)}


def write_overlays(models, variables, paths, predictions: dict, names, image_size: int,
                   batch_size: int, out_dir: str, first_row: int = 0) -> list[str]:
  """One explanation PNG per image (`explain.save_overlay`), named <n>_<file name>.png with n
  the row of predictions.csv (paths[0] being row `first_row`); nothing for a model without a
  DCG. Returns the paths written."""
  crop_size = getattr(models.guidance, "crop_size", None)
  if crop_size is None:
    logging.warning("--overlays: this model has no DCG (no CAM or ROIs); no overlays written")
    return []
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    images = np.stack([load_image(p, image_size) for p in chunk])
    for j, aux in enumerate(explain.explanation_aux(models, variables, images, batch_size)):
      i = start + j
      stem = os.path.splitext(os.path.basename(chunk[j]))[0]
      path = os.path.join(out_dir, f"{first_row + i:05d}_{stem}.png")
      explain.save_overlay(path, images[j], aux,
                           class_index=max(int(predictions["prediction"][i]), 0),
                           crop_size=crop_size, title=explain.title(names, predictions, i))
      written.append(path)
  return written
