"""Lists the examples of each supported on-disk layout (no decoding, no TFDS).

Each `list_*` function returns a `Listing`: records (id, image source, label index, group,
predefined split) plus the class names. Problems with single examples (a file named in a CSV but
missing, an unknown label, an empty class) go through `Problems`, which raises an error naming the
file and the problem, or, when skipping is switched on, records them for the build report.
Problems with the whole input (missing or malformed CSV) always raise.
"""

import csv
import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from diffmic_jax.data import images
from diffmic_jax.data import official_pickle
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.platform import errors

HAM_LABEL_ORDERS = {
    # Column order of ISIC2018_Task3_Training_GroundTruth.csv, used by the official code.
    "official": ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
    # Alphabetical, as MedMNIST's DermaMNIST.
    "alphabetical": ("AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"),
}
HAM_METADATA_CSV = "HAM10000_metadata.csv"
ISIC_GROUND_TRUTH_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_GROUPINGS_CSV = "ISIC2018_Task3_Training_LesionGroupings.csv"
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images",
                  "ISIC2018_Task3_Training_Input", ".")
APTOS_CLASS_NAMES = ("no_dr", "mild", "moderate", "severe", "proliferative_dr")
APTOS_IMAGE_DIRS = ("train_images", "train")
APTOS_EXTENSIONS = (".png", ".jpg", ".jpeg")


class BadInputError(errors.UserError):
  """The raw data cannot be read as the layout expects; the message names the file."""


def printable(path: str) -> str:
  """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) become \ufffd."""
  return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_utf8(name: str) -> bool:
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Record:
  """One example before decoding.

  Attributes:
    id: unique example id (e.g. HAM image_id, APTOS id_code, '<class>/<file>').
    source: image path, or a uint8 array (MedMNIST).
    label: class index.
    group: group key for grouped splits (HAM lesion_id; '' = the example alone).
    split: predefined split ('train' | 'val' | 'test') or '' when the source has none.
  """
  id: str
  source: Any
  label: int
  group: str = ""
  split: str = ""


@dataclasses.dataclass
class Listing:
  records: list[Record]
  class_names: tuple[str, ...]


class Problems:
  """Raises per-example problems, or collects them when `skip` is set."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.items: list[dict[str, str]] = []

  def report(self, name: str, problem: str) -> None:
    if not self.skip:
      raise BadInputError(f"{printable(name)}: {problem}")
    self.items.append({"file": printable(name), "problem": problem})


def read_csv(path: str, required: Sequence[str]) -> list[dict[str, str]]:
  """Reads a CSV with a header row and checks that the `required` columns are there.

  Raises:
    BadInputError: missing file, no header, or missing columns (lists found and expected).
  """
  if not os.path.isfile(path):
    raise BadInputError(f"{path}: CSV file not found")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in (reader.fieldnames or [])]
      missing = [c for c in required if c not in columns]
      if missing:
        raise BadInputError(f"{path}: wrong columns {columns}; expected at least "
                            f"{list(required)} (missing {missing})")
      return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
              for row in reader]
  except UnicodeDecodeError as e:
    raise BadInputError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                        f"offset {e.start}); expected a UTF-8 CSV (re-save it as UTF-8)") from e
  except csv.Error as e:
    raise BadInputError(f"{path}: not a readable CSV ({e})") from e


def _unique_rows(rows, key: str, csv_path: str, problems: "Problems"):
  """Yields the rows whose `key` was not seen before; a repeated id is a problem (reported with
  its row number; skipped, keeping the first row, with skip_bad_images)."""
  first_row = {}
  for i, row in enumerate(rows):
    value = row[key]
    if value in first_row:
      problems.report(f"{csv_path} (row {i + 2}, {key}={value})",
                      f"duplicate {key}, first listed in row {first_row[value]}; expected "
                      "each id once")
      continue
    first_row[value] = i + 2
    yield row


def index_images(folders: Sequence[str], extensions: Sequence[str] = images.IMAGE_EXTENSIONS
                ) -> dict[str, str]:
  """Maps file stem -> path for the image files directly inside `folders` (first one wins)."""
  found = {}
  for folder in folders:
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext.lower() in extensions and stem not in found:
        found[stem] = os.path.join(folder, name)
  return found


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _ham_groups(root: str) -> dict[str, str]:
  """image id -> lesion id from the ISIC lesion groupings CSV, if present."""
  path = os.path.join(root, ISIC_GROUPINGS_CSV)
  if not os.path.isfile(path):
    return {}
  return {row["image"]: row["lesion_id"] for row in read_csv(path, ("image", "lesion_id"))}


def _ham_rows(root: str, class_names: Sequence[str], problems: Problems):
  """Yields (image_id, label index, lesion_id, csv path) from either HAM layout."""
  metadata = os.path.join(root, HAM_METADATA_CSV)
  ground_truth = os.path.join(root, ISIC_GROUND_TRUTH_CSV)
  if os.path.isfile(metadata):
    rows = read_csv(metadata, ("lesion_id", "image_id", "dx"))
    for row in _unique_rows(rows, "image_id", metadata, problems):
      dx = row["dx"].upper()
      if dx not in class_names:
        problems.report(f"{metadata} ({row['image_id']})",
                        f"unknown label dx={row['dx']!r}; expected one of {list(class_names)}")
        continue
      yield row["image_id"], class_names.index(dx), row["lesion_id"]
  elif os.path.isfile(ground_truth):
    groups = _ham_groups(root)
    rows = read_csv(ground_truth, ("image",) + tuple(class_names))
    for row in _unique_rows(rows, "image", ground_truth, problems):
      try:
        hot = [c for c in class_names if float(row[c] or 0) == 1.0]
      except ValueError:
        hot = [row[c] for c in class_names]
      if len(hot) != 1:
        problems.report(f"{ground_truth} ({row['image']})",
                        f"unknown label: expected exactly one 1 in {list(class_names)}, got {hot}")
        continue
      yield row["image"], class_names.index(hot[0]), groups.get(row["image"], "")
  else:
    raise BadInputError(f"{root}: neither {HAM_METADATA_CSV} nor {ISIC_GROUND_TRUTH_CSV} found; "
                        "see the manual download instructions of the ham10000 builder")


def list_ham10000(root: str, label_order: str, problems: Problems) -> Listing:
  """HAM10000 as distributed, or the ISIC 2018 Task 3 layout (module docstring of builders)."""
  if label_order not in HAM_LABEL_ORDERS:
    raise ValueError(f"data.label_order={label_order!r}; valid: {sorted(HAM_LABEL_ORDERS)}")
  class_names = HAM_LABEL_ORDERS[label_order]
  files = index_images([os.path.join(root, d) for d in HAM_IMAGE_DIRS])
  records = []
  for image_id, label, lesion_id in _ham_rows(root, class_names, problems):
    if image_id not in files:
      problems.report(image_id, f"image named in the CSV not found in {root}/"
                      f"{{{','.join(HAM_IMAGE_DIRS)}}}")
      continue
    records.append(Record(image_id, files[image_id], label, lesion_id))
  return Listing(records, tuple(class_names))


def list_aptos2019(root: str, problems: Problems) -> Listing:
  """Kaggle APTOS 2019: train.csv (id_code, diagnosis), train_images/<id_code>.<png|jpg|jpeg>."""
  csv_path = os.path.join(root, "train.csv")
  files = index_images([os.path.join(root, d) for d in APTOS_IMAGE_DIRS], APTOS_EXTENSIONS)
  records = []
  rows = read_csv(csv_path, ("id_code", "diagnosis"))
  for row in _unique_rows(rows, "id_code", csv_path, problems):
    id_code, diagnosis = row["id_code"], row["diagnosis"]
    if not (diagnosis.isdigit() and int(diagnosis) < len(APTOS_CLASS_NAMES)):
      problems.report(f"{csv_path} ({id_code})",
                      f"unknown label diagnosis={diagnosis!r}; expected 0..4")
      continue
    if id_code not in files:
      problems.report(id_code, f"image named in {csv_path} not found in "
                      f"{root}/{{train_images,train}} with extension .png, .jpg or .jpeg")
      continue
    records.append(Record(id_code, files[id_code], int(diagnosis)))
  return Listing(records, APTOS_CLASS_NAMES)


def _resolve_class_names(found: Sequence[str], configured: Sequence[str]) -> tuple[str, ...]:
  if configured:
    return tuple(configured)
  return tuple(sorted(set(found), key=_natural_key))


def list_image_folder(root: str, class_names: Sequence[str], problems: Problems) -> Listing:
  """`<root>/<class>/<image>` (nested folders inside a class are included)."""
  if not os.path.isdir(root):
    raise BadInputError(f"{root}: image folder not found")
  folders = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  for folder in [d for d in folders if not is_utf8(d)]:
    problems.report(os.path.join(root, folder), "class folder name is not valid UTF-8; "
                    "expected UTF-8 names (rename the folder)")
    folders.remove(folder)
  if not folders:
    raise BadInputError(f"{root}: no class sub-folders; expected <root>/<class>/<image>")
  for folder in folders:
    if class_names and folder not in class_names:
      problems.report(os.path.join(root, folder),
                      f"unknown label {folder!r}; data.class_names is {list(class_names)}")
  per_class = {}
  for name in _resolve_class_names(folders, class_names):
    files = []
    for path in _walk_images(os.path.join(root, name)):
      if not is_utf8(path):  # TFDS stores ids as UTF-8 text
        problems.report(path, "file name is not valid UTF-8; expected UTF-8 file names "
                        "(rename the file)")
      elif not os.path.isfile(path):
        problems.report(path, "broken link or not a regular file")
      else:
        files.append(path)
    if not files:
      problems.report(os.path.join(root, name), "empty class: no image files")
      continue
    per_class[name] = files
  names = tuple(per_class)
  records = [Record(os.path.relpath(path, root), path, names.index(name))
             for name, files in per_class.items() for path in files]
  return Listing(records, names)


def _walk_images(folder: str) -> list[str]:
  """Image files under `folder`, recursively, in a stable order.

  Raises:
    BadInputError: a folder that cannot be read (its images would be missing silently).
  """
  def refuse(error: OSError):
    raise BadInputError(f"{printable(error.filename or folder)}: cannot read the folder "
                        f"({error.strerror}); expected readable image folders (fix its "
                        "permissions or move it out of the dataset)") from error

  paths = []
  for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse):
    dirnames.sort()
    paths += [os.path.join(dirpath, f) for f in sorted(filenames)
              if os.path.splitext(f)[1].lower() in images.IMAGE_EXTENSIONS]
  return paths


def list_manifest(manifest: str, root: str, class_names: Sequence[str],
                  problems: Problems) -> Listing:
  """CSV manifest `path,label[,split][,group]`; relative paths resolve against `root` or, when
  `root` is '', the manifest's folder. Labels are class names (strings)."""
  rows = read_csv(manifest, ("path", "label"))
  base = root or os.path.dirname(os.path.abspath(manifest))
  names = _resolve_class_names([r["label"] for r in rows if r["label"]], class_names)
  records, seen = [], set()
  for i, row in enumerate(rows):
    where = f"{manifest} (row {i + 2}, {row['path']})"
    split = row.get("split", "").lower()
    if not row["label"]:
      problems.report(where, "empty label; expected a class name")
      continue
    if row["label"] not in names:
      problems.report(where, f"unknown label {row['label']!r}; expected one of {list(names)}")
      continue
    if split not in splits_lib.SPLIT_NAMES + ("",):
      problems.report(where, f"unknown split {split!r}; expected one of {list(splits_lib.SPLIT_NAMES)}")
      continue
    path = os.path.join(base, row["path"])
    if not os.path.isfile(path):
      problems.report(where, f"image {path} not found")
      continue
    if row["path"] in seen:
      problems.report(where, "path listed twice; expected each image once")
      continue
    seen.add(row["path"])
    records.append(Record(row["path"], path, names.index(row["label"]), row.get("group", ""),
                          split))
  _check_nonempty_classes(records, names, manifest, problems)
  return Listing(records, names)


def _check_nonempty_classes(records, names, where, problems):
  counts = np.bincount([r.label for r in records], minlength=len(names))
  for name, count in zip(names, counts):
    if count == 0:
      problems.report(where, f"empty class {name!r}: no examples")


def _index_names(labels: Sequence[int], class_names: Sequence[str], where: str):
  num = max(labels, default=-1) + 1
  if class_names:
    if num > len(class_names):
      raise BadInputError(f"{where}: label {num - 1} but data.class_names has "
                          f"{len(class_names)} names")
    return tuple(class_names)
  return tuple(str(i) for i in range(num))


def list_official_pickles(train_pickle: str, test_pickle: str, root: str,
                          class_names: Sequence[str], problems: Problems) -> Listing:
  """Official DiffMIC split pickles; `root` resolves relative img_root paths (official: the
  repository root)."""
  records = []
  for split, path in (("train", train_pickle), ("test", test_pickle)):
    if not path:
      continue
    for image_path, label in official_pickle.read_split_pickle(path, root):
      if not os.path.isfile(image_path):
        problems.report(f"{path} ({image_path})", "image not found")
        continue
      records.append(Record(image_path, image_path, label, "", split))
  names = _index_names([r.label for r in records], class_names, train_pickle)
  return Listing(records, names)


def _find_npz(path: str) -> str:
  if os.path.isfile(path):
    return path
  found = sorted(f for f in os.listdir(path) if f.endswith(".npz")) if os.path.isdir(path) else []
  if len(found) != 1:
    raise BadInputError(f"{path}: expected a MedMNIST .npz file or a folder holding exactly one "
                        f"(found {found})")
  return os.path.join(path, found[0])


def list_medmnist(path: str, class_names: Sequence[str]) -> Listing:
  """MedMNIST .npz (keys {train,val,test}_{images,labels}); images of any size, grey or RGB."""
  npz_path = _find_npz(path)
  with np.load(npz_path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  records = []
  for split in splits_lib.SPLIT_NAMES:
    if f"{split}_images" not in arrays or f"{split}_labels" not in arrays:
      raise BadInputError(f"{npz_path}: keys {sorted(arrays)}; expected "
                          f"{split}_images and {split}_labels for each of {list(splits_lib.SPLIT_NAMES)}")
    labels = arrays[f"{split}_labels"]
    if labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]
    if labels.ndim != 1:
      raise BadInputError(f"{npz_path}: {split}_labels has shape {labels.shape}; expected "
                          "[N] or [N, 1] (multi-label MedMNIST sets are not supported)")
    for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], labels)):
      records.append(Record(f"{split}_{i:06d}", image, int(label), "", split))
  names = _index_names([r.label for r in records], class_names, npz_path)
  return Listing(records, names)
