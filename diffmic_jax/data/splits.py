"""Train/val/test splits, content deduplication and split files (pure numpy, no TFDS).

Splits depend only on (ids, labels, groups, seed), never on the storage order: examples are
sorted by id first, so the same seed gives the same split wherever the data come from.
"""

import csv
import json
import os
from typing import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")  # the one list of split names


def _pick_prefix(sizes: np.ndarray, target: float) -> int:
  """Length k of the prefix of `sizes` whose sum is closest to `target` (ties: shorter)."""
  cumulative = np.concatenate([[0], np.cumsum(sizes)])
  return int(np.argmin(np.abs(cumulative - target)))


def stratified_pick(unit_labels: np.ndarray, unit_sizes: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Picks about `fraction` of the examples of every class, whole units at a time.

  Args:
    unit_labels: [U] class of each unit (an example, or a group of examples).
    unit_sizes: [U] number of examples in each unit.
    fraction: share of each class's examples to pick.
    rng: numpy generator.

  Returns:
    bool [U], True for the picked units.
  """
  picked = np.zeros(len(unit_labels), bool)
  for label in np.unique(unit_labels):
    units = rng.permutation(np.flatnonzero(unit_labels == label))
    k = _pick_prefix(unit_sizes[units], fraction * unit_sizes[units].sum())
    picked[units[:k]] = True
  return picked


def _units(order: np.ndarray, labels: np.ndarray, groups: Sequence[str] | None):
  """Units (groups, or single examples) over the positions `order` (sorted by id).

  Returns:
    (unit index per position [P], unit labels [U], unit sizes [U]).
  """
  if groups is None:
    unit_of = np.arange(len(order))
  else:
    keys = [groups[i] or f"\0{i}" for i in order]  # '' = an example alone
    _, first, unit_of = np.unique(keys, return_index=True, return_inverse=True)
  unit_labels = np.zeros(unit_of.max() + 1 if len(order) else 0, np.int64)
  unit_labels[unit_of[::-1]] = labels[order][::-1]  # label of each unit's first example
  return unit_of, unit_labels, np.bincount(unit_of, minlength=len(unit_labels))


def carve(order: np.ndarray, labels: np.ndarray, groups: Sequence[str] | None, fraction: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits the example indices `order` into (rest, carved), stratified and optionally grouped."""
  if fraction <= 0 or len(order) == 0:
    return order, order[:0]
  unit_of, unit_labels, unit_sizes = _units(order, labels, groups)
  picked = stratified_pick(unit_labels, unit_sizes, fraction, rng)[unit_of]
  return order[~picked], order[picked]


def random_split(ids: Sequence[str], labels: np.ndarray, *, test_fraction: float,
                 val_fraction: float, seed: int, groups: Sequence[str] | None = None
                 ) -> dict[str, np.ndarray]:
  """The paper's random split (train:test = 1 - test_fraction : test_fraction), stratified by
  class, plus `val_fraction` of the train part carved out as validation.

  Args:
    ids: [N] unique example ids.
    labels: [N] class indices.
    test_fraction, val_fraction: shares in [0, 1).
    seed: split seed.
    groups: [N] group keys (e.g. lesion ids) kept on one side, or None.

  Returns:
    {'train', 'val', 'test'}: example indices (int64 arrays, ordered by id).
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
  train, test = carve(order, labels, groups, test_fraction, rng)
  train, val = carve(train, labels, groups, val_fraction, rng)
  return {"train": train, "val": val, "test": test}


def predefined_split(ids: Sequence[str], labels: np.ndarray, assigned: Sequence[str], *,
                     val_fraction: float, seed: int, groups: Sequence[str] | None = None,
                     where: str = "dataset") -> dict[str, np.ndarray]:
  """Uses the split named per example ('train'|'val'|'test'); carves val from train if absent.

  Raises:
    ValueError: some examples have no split or an unknown one, or there is no train/test part.
  """
  assigned = np.asarray(assigned, dtype=object)
  bad = sorted(set(assigned) - set(SPLIT_NAMES))
  if bad:
    raise ValueError(f"{where}: split values {bad} (some examples unassigned?); expected every "
                     f"example in one of {list(SPLIT_NAMES)}")
  order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
  result = {name: order[assigned[order] == name] for name in SPLIT_NAMES}
  for name in ("train", "test"):
    if len(result[name]) == 0:
      raise ValueError(f"{where}: no examples in the '{name}' split")
  if len(result["val"]) == 0:
    rng = np.random.default_rng(seed)
    result["train"], result["val"] = carve(result["train"], np.asarray(labels), groups,
                                           val_fraction, rng)
  return result


def read_split_file(path: str) -> dict[str, str]:
  """Reads an explicit split: JSON {'train': [ids], 'val': [...], 'test': [...]} (the format of
  the saved split.json) or CSV with columns id,split. Returns {id: split name}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.split_file {path}: file not found")
  if path.endswith(".json"):
    with open(path) as f:
      content = json.load(f)
    if not isinstance(content, dict) or not any(k in content for k in SPLIT_NAMES):
      raise ValueError(f"{path}: expected a JSON object with lists under {list(SPLIT_NAMES)}")
    return {str(i): name for name in SPLIT_NAMES for i in content.get(name, [])}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if not {"id", "split"} <= set(reader.fieldnames or []):
      raise ValueError(f"{path}: wrong columns {reader.fieldnames}; expected id,split")
    return {row["id"]: row["split"].strip().lower() for row in reader}


def file_split(ids: Sequence[str], labels: np.ndarray, path: str, *, val_fraction: float,
               seed: int, groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """The split given by a split file; examples it does not list are left out.

  Raises:
    ValueError: the file names ids that are not in the dataset, or bad split names.
  """
  assignment = read_split_file(path)
  unknown = sorted(set(assignment) - set(ids))
  if unknown:
    raise ValueError(f"{path}: {len(unknown)} ids not in the dataset, e.g. {unknown[:5]}")
  listed = np.array([i for i, name in enumerate(ids) if name in assignment], np.int64)
  sub = predefined_split([ids[i] for i in listed], np.asarray(labels)[listed],
                         [assignment[ids[i]] for i in listed], val_fraction=val_fraction,
                         seed=seed, groups=None if groups is None else [groups[i] for i in listed],
                         where=path)
  return {name: listed[index] for name, index in sub.items()}


def _near_pairs(thumbnails: np.ndarray, threshold: float, chunk: int = 512):
  """Yields (i, j), i < j, whose thumbnails differ by at most `threshold` (RMS, 0-255 scale)."""
  flat = thumbnails.reshape(len(thumbnails), -1).astype(np.float32)
  squares = (flat ** 2).sum(1)
  limit = threshold ** 2 * flat.shape[1]
  for start in range(0, len(flat), chunk):
    rows = slice(start, start + chunk)
    distance = squares[rows, None] + squares[None] - 2 * flat[rows] @ flat.T
    for i, j in zip(*np.nonzero(distance <= limit)):
      if start + i < j:
        yield start + int(i), int(j)


def _clusters(num: int, pairs) -> list[list[int]]:
  """Connected components (union-find) of `num` items linked by `pairs`."""
  parent = list(range(num))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i, j in pairs:
    parent[root(i)] = root(j)
  components: dict[int, list[int]] = {}
  for i in range(num):
    components.setdefault(root(i), []).append(i)
  return list(components.values())


def deduplicate(ids: Sequence[str], labels: np.ndarray, hashes: Sequence[str],
                thumbnails: np.ndarray | None = None, threshold: float = 0.0
                ) -> tuple[np.ndarray, dict]:
  """Drops duplicates: identical decoded pixels, or (threshold > 0) grey 16x16 thumbnails
  within `threshold` RMS (0-255 scale). Of each set of copies the first id is kept; if the
  copies disagree on the label, all of them are dropped.

  Args:
    ids: [N] example ids; labels: [N]; hashes: [N] content hashes.
    thumbnails: uint8 [N, 16, 16], needed when threshold > 0.
    threshold: near-duplicate distance; 0 = exact copies only.

  Returns:
    (indices kept [K] in id order, report dict with counts and the duplicate sets).
  """
  first_with_hash: dict[str, int] = {}
  pairs = []
  for i, digest in enumerate(hashes):
    first = first_with_hash.setdefault(digest, i)
    if first != i:
      pairs.append((first, i))
  if threshold > 0:
    pairs += list(_near_pairs(np.asarray(thumbnails), threshold))
  keep, duplicate_sets, conflicts = [], [], []
  for members in _clusters(len(ids), pairs):
    members = sorted(members, key=lambda i: ids[i])
    if len({int(labels[i]) for i in members}) > 1:
      conflicts.append([ids[i] for i in members])
      continue
    keep.append(members[0])
    if len(members) > 1:
      duplicate_sets.append([ids[i] for i in members])
  keep = np.array(sorted(keep, key=lambda i: ids[i]), np.int64)
  report = {"num_before": len(ids), "num_after": len(keep),
            "num_dropped": len(ids) - len(keep),
            "num_dropped_conflicting_labels": sum(len(c) for c in conflicts),
            "threshold": threshold,
            "duplicate_sets": sorted(duplicate_sets), "conflicting_sets": sorted(conflicts)}
  return keep, report
