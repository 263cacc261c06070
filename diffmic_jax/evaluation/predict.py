"""`--mode predict`: classifies new image files with a trained checkpoint.

  python -m diffmic_jax.main --config C --workdir W --mode predict --input PATH \
      [--output OUT] [--checkpoint best|latest|STEP] [--overlays]

PATH is an image, a folder (searched recursively) or a CSV with a `path` column. Every image
goes through the preprocessing of the dataset builders (centre square crop, bilinear resize:
`data.images.preprocess`) and the normalisation of evaluation batches
(`input_pipeline.normalise`), then through the evaluation code path (`evaluate.predict`: the
same jitted sampler, batch size and PRNG keys as `--mode eval`), so an image of the test split
gets exactly the prediction `--mode eval` gives it when both see the same images in the same
order. Files that cannot be read are listed in OUT/skipped.csv with the reason, never fatal.
"""

import csv
import json
import os
from typing import Iterator

import numpy as np
import tqdm
from absl import logging
from scipy import special

from diffmic_jax.data import images as images_lib
from diffmic_jax.data import input_pipeline
from diffmic_jax.evaluation import evaluate
from diffmic_jax.evaluation import explain
from diffmic_jax.platform import files
from diffmic_jax.platform import sharding
from diffmic_jax.run import run as run_lib


def find_inputs(path: str) -> list[str]:
  """The image files named by --input, in a fixed order.

  Args:
    path: one image file, a folder (every non-hidden file below it, sorted by relative path) or
      a `.csv` with a `path` column (relative paths are relative to the CSV's folder).

  Raises:
    FileNotFoundError: PATH does not exist.
    ValueError: a CSV without a `path` column.
  """
  if os.path.isdir(path):
    found = []
    for root, dirs, files in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda p: os.path.relpath(p, path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input {path}: no such file or folder")
  if path.lower().endswith(".csv"):
    return _read_csv(path)
  return [path]


def _read_csv(path: str) -> list[str]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    if "path" not in (reader.fieldnames or []):
      raise ValueError(f"--input {path}: no 'path' column; expected a CSV whose header names a "
                       f"'path' column, got {reader.fieldnames}")
    rows = [row["path"].strip() for row in reader if (row.get("path") or "").strip()]
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


def _write_csv(path: str, header: list, rows) -> None:
  """Writes a CSV atomically (temporary file then rename)."""
  with files.atomic_open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def prediction_rows(paths, predictions: dict, names) -> tuple[list, list]:
  """(header, rows) of predictions.csv; see `predict_files`."""
  probs = predictions["probs"]
  dcg_probs = special.softmax(predictions["fused"].astype(np.float64), axis=1)
  votes = predictions["vote_probs"]
  header = (["path", "prediction"] + [f"p_{n}" for n in names] + [f"vote_{n}" for n in names]
            + ["entropy", "agreement", "interval_separated", "dcg_prediction", "dcg_probability"])
  rows = []
  for i, path in enumerate(paths):
    k, g = int(probs[i].argmax()), int(dcg_probs[i].argmax())
    rows.append([path, names[k]] + [f"{p:.6f}" for p in probs[i]]
                + [f"{v:.6f}" for v in votes[i]]
                + [f"{predictions['entropy'][i]:.6f}", f"{predictions['agreement'][i]:.6f}",
                   int(predictions["interval_separated"][i]), names[g], f"{dcg_probs[i, g]:.6f}"])
  return header, rows


def predict_files(config, workdir: str, input_path: str, output_dir: str | None = None,
                  checkpoint: str = "best", overlays: bool = False) -> dict:
  """Classifies every image named by `input_path` and writes the results.

  Writes OUT/predictions.csv (one row per readable image, in input order: path, predicted
  class name, per-class probabilities p_<class> (mean over the S = diffusion.
  predict_num_samples samples of softmax(ŷ₀), as --mode eval), the vote of the samples
  vote_<class>, the uncertainty scores (predictive entropy, sample agreement, and
  interval_separated: 1 when the predicted class's 95% interval of ŷ₀ lies above every other
  class's), the DCG's prediction and its softmax probability) and OUT/skipped.csv
  (path, reason) for the files that could not be read.

  Args:
    config: the config the checkpoint was trained with.
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
  paths = find_inputs(input_path)
  names = class_names(config, workdir)
  output_dir = output_dir or os.path.join(workdir, "predict")
  models, variables = evaluate.load_variables(config, workdir, checkpoint)
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)  # batches are sharded over the mesh
  batch_size = sharding.check_batch_size(config.training.eval_batch_size, mesh,
                                         "training.eval_batch_size")
  good, skipped = [], []
  d = config.diffusion
  with tqdm.tqdm(total=len(paths), desc="predict", unit="image", dynamic_ncols=True) as bar:
    batches = _batches(paths, config.data.image_size, batch_size, good, skipped, bar)
    predictions = _run(models, variables, batches, run_lib.eval_key(config), mesh,
                       sampler_name=d.sampler, num_steps=d.test_steps,
                       num_samples=d.predict_num_samples)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  if predictions is None:
    header, rows = prediction_rows([], _empty(len(names)), names)
  else:
    header, rows = prediction_rows(good, predictions, names)
  _write_csv(os.path.join(output_dir, "predictions.csv"), header, rows)
  _write_csv(os.path.join(output_dir, "skipped.csv"), ["path", "reason"], skipped)
  if overlays and predictions is not None:
    write_overlays(models, variables, good, predictions, names, config.data.image_size,
                   batch_size, os.path.join(output_dir, "overlays"))
  print(f"{len(good)} images classified, {len(skipped)} skipped; see {output_dir}/predictions.csv"
        + (f" and {output_dir}/skipped.csv" if skipped else ""), flush=True)
  return {"output_dir": output_dir, "num_predicted": len(good), "num_skipped": len(skipped)}


def _run(models, variables, batches, key, mesh, **kwargs):
  """evaluate.predict over the batches, or None when no file was readable."""
  first = next(batches, None)
  if first is None:
    return None
  def chained():
    yield first
    yield from batches
  return evaluate.predict(models, variables, chained(), key, mesh, **kwargs)


def _empty(num_classes: int) -> dict:
  zeros = np.zeros((0, num_classes))
  return {"probs": zeros, "fused": zeros, "vote_probs": zeros, "entropy": np.zeros(0),
          "agreement": np.zeros(0), "interval_separated": np.zeros(0, bool)}


def write_overlays(models, variables, paths, predictions: dict, names, image_size: int,
                   batch_size: int, out_dir: str) -> list[str]:
  """One explanation PNG per image (`explain.save_overlay`), named <n>_<file name>.png with n
  the row of predictions.csv; nothing for a model without a DCG. Returns the paths written."""
  crop_size = getattr(models.guidance, "crop_size", None)
  if crop_size is None:
    logging.warning("--overlays: this model has no DCG (no CAM or ROIs); no overlays written")
    return []
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for start in tqdm.trange(0, len(paths), batch_size, desc="overlays", unit="batch"):
    chunk = paths[start:start + batch_size]
    images = np.stack([load_image(p, image_size) for p in chunk])
    for j, aux in enumerate(explain.explanation_aux(models, variables, images, batch_size)):
      i = start + j
      stem = os.path.splitext(os.path.basename(chunk[j]))[0]
      path = os.path.join(out_dir, f"{i:05d}_{stem}.png")
      explain.save_overlay(path, images[j], aux,
                           class_index=int(predictions["probs"][i].argmax()),
                           crop_size=crop_size, title=explain.title(names, predictions, i))
      written.append(path)
  return written
