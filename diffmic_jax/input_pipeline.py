"""Input pipeline: datasets -> train/val/test sources -> Grain batches (the only Grain user).

Sources hold uint8 images; batches are float32 ImageNet-normalised. Training batches are a pure
function of (seed, global step): batch `s` of epoch `e` takes positions [s * G, (s + 1) * G) of
epoch e's permutation (G = per-process batch x processes; each process its slice), and every
example's augmentation is drawn from (seed, epoch, position). So the same seed gives the same
batches with or without worker processes, and a resumed run continues mid-epoch exactly.
"""

import json
import logging
import math
import os
from typing import Any, Iterator, NamedTuple

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image

from diffmic_jax import errors
from diffmic_jax import files
from diffmic_jax.datasets import builders
from diffmic_jax.datasets import demo
from diffmic_jax.datasets import layouts
from diffmic_jax.datasets import splits as splits_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_STEPS = 2 ** 62  # "endless": the training step index space
_READ_THREADS = 2  # batches assembled concurrently in each process (Pillow releases the GIL)
_PREFETCH = 2  # batches buffered ahead per process


class Splits(NamedTuple):
  """Random-access sources: len(src), src[i] -> {'image': uint8 [H, W, 3], 'label': int}."""
  train: Any
  val: Any
  test: Any
  class_names: tuple[str, ...]
  record: dict | None = None  # the content of split.json (see `write_split`)


class ArraySource:
  """In-memory source over uint8 images [N, H, W, 3] and int labels [N] (the demo)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


class SubsetSource:
  """The examples `indices` of a random-access source (a TFDS ArrayRecordDataSource).

  Attributes:
    labels: int64 [len(self)] labels, known without decoding images.
    ids: example ids, in the same order.
  """

  def __init__(self, base: Any, indices: np.ndarray, labels: np.ndarray, ids: list[str]):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(labels, np.int64)
    self.ids = ids

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.base[int(self.indices[index])]
    return {"image": example["image"], "label": int(example["label"])}


# ----------------------------------------------------------------------------- splits


def _build_settings(config: ml_collections.ConfigDict) -> builders.BuildSettings:
  return builders.BuildSettings(
      kind=config.name, image_size=config.image_size,
      manual_dir=os.path.abspath(config.manual_dir) if config.manual_dir else "",
      manifest_file=os.path.abspath(config.manifest_file) if config.manifest_file else "",
      train_pickle=config.train_pickle, test_pickle=config.test_pickle,
      class_names=tuple(config.class_names) if config.name in _ORDERED_BY_CLASS_NAMES else (),
      label_order=config.label_order, skip_bad_images=config.skip_bad_images)


# Datasets whose label order data.class_names defines (others: it only renames the classes).
_ORDERED_BY_CLASS_NAMES = ("image_folder", "manifest", "official_pickle", "medmnist")


def _load_demo(config) -> tuple[Any, dict[str, list], tuple[str, ...]]:
  images, labels = demo.make_demo(config.demo_num_examples, config.image_size, config.demo_seed)
  ids = [f"demo_{i:06d}" for i in range(len(labels))]
  metadata = {"id": ids, "label": labels.tolist(), "group": [""] * len(ids),
              "split": [""] * len(ids), "content_hash": ids, "thumbnail": None}
  return ArraySource(images, labels), metadata, demo.CLASS_NAMES


# Datasets read from the folder of downloaded files (the others take file fields).
_NEED_MANUAL_DIR = ("ham10000", "aptos2019", "image_folder", "medmnist")


def _load_tfds(config) -> tuple[Any, dict[str, list], tuple[str, ...], dict]:
  if config.name in _NEED_MANUAL_DIR and not config.manual_dir:
    raise ValueError(f"config.data.manual_dir is empty, but data.name={config.name!r} reads the "
                     "downloaded files from it; pass --config.data.manual_dir=PATH")
  builder = builders.prepare(_build_settings(config), config.data_dir)
  metadata = builders.read_metadata(builder)
  names = tuple(builder.info.features["label"].names)
  return builder.as_data_source(builders.SPLIT), metadata, names, builders.read_report(builder)


def _class_names(config, names: tuple[str, ...]) -> tuple[str, ...]:
  if config.num_classes != len(names):
    raise ValueError(f"data.num_classes={config.num_classes} but dataset {config.name!r} has "
                     f"{len(names)} classes {list(names)}")
  if config.class_names:
    if len(config.class_names) != len(names):
      raise ValueError(f"data.class_names has {len(config.class_names)} names; dataset "
                       f"{config.name!r} has {len(names)} classes {list(names)}")
    return tuple(config.class_names)
  return names


def _split_indices(config, metadata: dict[str, list], keep: np.ndarray) -> dict[str, np.ndarray]:
  """Chooses split file > predefined split > random split, on the kept examples."""
  ids = [metadata["id"][i] for i in keep]
  labels = np.asarray(metadata["label"], np.int64)[keep]
  groups = None
  if config.group_split:
    groups = [metadata["group"][i] for i in keep]
    if not any(groups):
      raise ValueError(f"data.group_split=True but dataset {config.name!r} has no groups")
  predefined = [metadata["split"][i] for i in keep]
  common = dict(val_fraction=config.val_fraction, seed=config.split_seed, groups=groups)
  if config.split_file:
    result = splits_lib.file_split(ids, labels, config.split_file, **common)
  elif any(predefined):
    result = splits_lib.predefined_split(ids, labels, predefined, where=config.name, **common)
  else:
    result = splits_lib.random_split(ids, labels, test_fraction=config.test_fraction, **common)
  return {name: keep[index] for name, index in result.items()}


def _write_json(path: str, content: dict) -> None:
  """Writes atomically (a reader never sees a partial file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_json(path, content, indent=1)


def _check_split(workdir: str, config, ids_per_split) -> None:
  """Refuses to silently change the split saved by an existing run (DIR/split.json)."""
  path = os.path.join(workdir, "split.json")
  if os.path.isfile(path) and not config.split_file:
    try:
      with open(path) as f:
        saved = json.load(f)
    except ValueError as e:
      raise errors.UserError(f"{path}: not valid JSON ({e}); expected this run's split") from e
    if any(saved.get(name) != ids for name, ids in ids_per_split.items()):
      raise errors.UserError(
          f"{path}: the split saved by this run differs from the one the config now gives; set "
          f"data.split_file={path} to keep it or use a new workdir")


def write_split(workdir: str, splits: Splits) -> None:
  """Writes <workdir>/split.json atomically (call once the run has been accepted)."""
  _write_json(os.path.join(workdir, "split.json"), splits.record)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks the `config.data` choices against the builders' registry (before any build)."""
  if config.name != "demo":
    builders.check_kind(config.name)
  if config.name == "ham10000" and config.label_order not in layouts.HAM_LABEL_ORDERS:
    raise errors.UserError(f"config.data.label_order={config.label_order!r}; choose from "
                           f"{sorted(layouts.HAM_LABEL_ORDERS)}")
  if config.name == "demo" and config.demo_num_examples < 1:
    raise errors.UserError(f"config.data.demo_num_examples={config.demo_num_examples}; "
                           "expected >= 1")


def _check_every_class_split(indices: dict[str, np.ndarray], labels: np.ndarray, class_names,
                             config) -> None:
  """Raises naming a class that has no example in one of the splits (it could not be scored)."""
  for c, name in enumerate(class_names):
    counts = {split: int(np.sum(labels[index] == c)) for split, index in indices.items()}
    total = sum(counts.values())
    empty = [split for split, n in counts.items() if n == 0]
    if empty and total:
      raise errors.UserError(
          f"data: class {name!r} has {total} example(s), too few for the split "
          f"(none in {empty}; data.test_fraction={config.test_fraction}, "
          f"data.val_fraction={config.val_fraction}); a class needs an example in each of "
          "train, val and test: add images, or give data.split_file")


def create_splits(data_config: ml_collections.ConfigDict, workdir: str | None,
                  write: bool = True) -> Splits:
  """Builds (once, cached under data_config.data_dir) or loads the dataset and splits it.

  Args:
    data_config: the `config.data` section (see configs/default.py).
    workdir: where split.json (example ids per split) is checked and written; None: neither.
    write: write split.json (False: only check it; `write_split` writes it later).

  Returns:
    Splits(train, val, test, class_names); each source has `labels` and `ids`.

  Raises:
    ValueError: data.num_classes (or data.class_names) does not match the dataset, or bad
      split settings.
  """
  report = {}
  if data_config.name == "demo":
    base, metadata, names = _load_demo(data_config)
  else:
    base, metadata, names, report = _load_tfds(data_config)
  class_names = _class_names(data_config, names)
  keep = np.arange(len(metadata["id"]), dtype=np.int64)
  extra = {"skipped_bad_examples": report.get("skipped", [])}
  if data_config.deduplicate:
    kept, dedup = splits_lib.deduplicate(
        metadata["id"], np.asarray(metadata["label"]), metadata["content_hash"],
        metadata.get("thumbnail"), data_config.dedup_threshold)
    keep = np.sort(kept)
    extra["deduplication"] = dedup
    logging.info("Deduplication: %d -> %d examples (%d dropped, %d with conflicting labels)",
                 dedup["num_before"], dedup["num_after"], dedup["num_dropped"],
                 dedup["num_dropped_conflicting_labels"])
  indices = _split_indices(data_config, metadata, keep)
  labels = np.asarray(metadata["label"], np.int64)
  _check_every_class_split(indices, labels, class_names, data_config)
  sources = {name: SubsetSource(base, index, labels[index], [metadata["id"][i] for i in index])
             for name, index in indices.items()}
  ids_per_split = {name: src.ids for name, src in sources.items()}
  record = {"dataset": data_config.name, "class_names": list(class_names),
            "split_seed": data_config.split_seed, **ids_per_split, **extra}
  splits = Splits(sources["train"], sources["val"], sources["test"], class_names, record)
  if workdir:
    _check_split(workdir, data_config, ids_per_split)
    if write:
      write_split(workdir, splits)
  return splits


# ----------------------------------------------------------------------------- batches


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (drop_remainder); batch_size is the global batch."""
  return num_examples // batch_size


def normalise(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 ImageNet-normalised ((x / 255 - mean) / std)."""
  std = np.asarray(IMAGENET_STD, np.float32)
  output = images.astype(np.float32)
  output *= 1 / (255 * std)  # in place: two passes instead of four
  output -= np.asarray(IMAGENET_MEAN, np.float32) / std
  return output


def augment(image: np.ndarray, rng: np.random.Generator, *, hflip: bool, vflip: bool,
            rotation_degrees: float) -> np.ndarray:
  """The official random transforms (REFERENCE.md §6.1 steps 3-5) on uint8 [H, W, 3].

  Horizontal flip (p=0.5), vertical flip (p=0.5, APTOS), then rotation by U[-d, d) degrees
  about the centre, PIL bilinear, black fill, same size.
  """
  if hflip and rng.random() < 0.5:
    image = image[:, ::-1]
  if vflip and rng.random() < 0.5:
    image = image[::-1]
  if rotation_degrees > 0:
    angle = rng.uniform(-rotation_degrees, rotation_degrees)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).rotate(
        angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0)))
  return np.ascontiguousarray(image)


def _source_labels(source) -> np.ndarray:
  labels = getattr(source, "labels", None)
  if labels is None:
    labels = [source[i]["label"] for i in range(len(source))]
  return np.asarray(labels, np.int64)


class _TrainBatch:
  """Picklable map: global step -> this process's training batch (see module docstring)."""

  def __init__(self, source, data_config, batch_size, seed, shard_index, num_shards):
    if seed < 0:
      raise ValueError(f"seed={seed}; expected a non-negative integer")
    self.source = source
    self.batch_size = batch_size
    self.global_batch = batch_size * num_shards
    self.offset = shard_index * batch_size
    self.seed = seed
    self.steps = steps_per_epoch(len(source), self.global_batch)
    if self.steps == 0:
      raise ValueError(f"the training split has {len(source)} examples, fewer than one global "
                       f"batch of {self.global_batch}")
    self.augment_kwargs = dict(hflip=bool(data_config.hflip), vflip=bool(data_config.vflip),
                               rotation_degrees=float(data_config.rotation_degrees))
    self.weights = None
    if data_config.class_balanced:
      labels = _source_labels(source)
      self.weights = 1.0 / np.bincount(labels)[labels]
      self.weights /= self.weights.sum()
    self._cached = (-1, None)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[steps * global_batch] example indices of one epoch."""
    cached_epoch, order = self._cached
    if cached_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch, 0])
      n = self.steps * self.global_batch
      if self.weights is None:
        order = rng.permutation(len(self.source))[:n]
      else:
        order = rng.choice(len(self.source), size=n, p=self.weights)
      self._cached = (epoch, order)
    return order

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, step_in_epoch = divmod(int(step), self.steps)
    order = self.epoch_order(epoch)
    images, labels = [], []
    for j in range(self.batch_size):
      position = step_in_epoch * self.global_batch + self.offset + j
      example = self.source[int(order[position])]
      rng = np.random.default_rng([self.seed, epoch, 1, position])
      images.append(augment(example["image"], rng, **self.augment_kwargs))
      labels.append(example["label"])
    return {"image": normalise(np.stack(images)), "label": np.asarray(labels, np.int32)}


def _iterate(map_fn, start: int, stop: int, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  """Grain iterator over map_fn(start), ..., map_fn(stop - 1) in order."""
  dataset = grain.MapDataset.range(start, stop).map(map_fn).to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PREFETCH))
  return iter(dataset)


class TrainIterator:
  """Endless iterator of training batches with a JSON-serialisable state.

  State: {'step': number of batches returned so far, 'seed', 'batch_size', 'num_shards',
  'shard_index'}; `set_state` restarts the Grain pipeline at that step.
  """

  def __init__(self, batch_fn: _TrainBatch, num_workers: int, shard_index: int,
               num_shards: int):
    self._batch_fn = batch_fn
    self._num_workers = num_workers
    self._shard = (shard_index, num_shards)
    self._step = 0
    self._iterator = None

  @property
  def steps_per_epoch(self) -> int:
    return self._batch_fn.steps

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = _iterate(self._batch_fn, self._step, _MAX_STEPS, self._num_workers)
    batch = next(self._iterator)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step, "seed": self._batch_fn.seed,
            "batch_size": self._batch_fn.batch_size, "shard_index": self._shard[0],
            "num_shards": self._shard[1]}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a saved state; the seed and the global batch must match.

    The step counts global batches, so a state saved by one process (process 0 writes the
    checkpoint's metadata) resumes every process, with any number of processes that splits the
    same global batch.
    """
    saved_seed = state.get("seed", self._batch_fn.seed)
    if saved_seed != self._batch_fn.seed:
      raise ValueError(f"iterator state has seed={saved_seed} but this iterator has "
                       f"{self._batch_fn.seed}; resume with the same seed")
    global_batch = self._batch_fn.global_batch
    saved = state.get("batch_size", self._batch_fn.batch_size) * state.get("num_shards",
                                                                            self._shard[1])
    if saved != global_batch:
      raise ValueError(f"iterator state has a global batch of {saved} but this iterator has "
                       f"{global_batch}; resume with the same training.batch_size")
    self._step = int(state["step"])
    self._iterator = None


def train_iterator(source, data_config: ml_collections.ConfigDict, *, batch_size: int,
                   seed: int, shard_index: int = 0, num_shards: int = 1) -> TrainIterator:
  """Endless training batches {'image': float32 [B, H, W, 3], 'label': int32 [B]}.

  Args:
    source: random-access source (Splits.train).
    data_config: `config.data` (hflip, vflip, rotation_degrees, class_balanced, num_workers).
    batch_size: per-process batch B; the global batch is B * num_shards.
    seed: shuffling and augmentation seed (>= 0).
    shard_index, num_shards: this process's slice of every global batch.

  Returns:
    A `TrainIterator` (get_state()/set_state() for checkpoints, `steps_per_epoch`).
  """
  batch_fn = _TrainBatch(source, data_config, batch_size, seed, shard_index, num_shards)
  return TrainIterator(batch_fn, data_config.num_workers, shard_index, num_shards)


class _EvalBatch:
  """Picklable map: batch index -> this process's padded evaluation batch."""

  def __init__(self, source, batch_size, shard_index, num_shards):
    self.source = source
    self.batch_size = batch_size
    self.global_batch = batch_size * num_shards
    self.offset = shard_index * batch_size

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    positions = index * self.global_batch + self.offset + np.arange(self.batch_size)
    mask = positions < len(self.source)
    examples = [self.source[int(p)] for p in positions[mask]]
    image = np.zeros((self.batch_size,) + examples[0]["image"].shape, np.float32) if examples \
        else None
    label = np.zeros(self.batch_size, np.int32)
    for j, example in enumerate(examples):
      image[j] = normalise(example["image"])
      label[j] = example["label"]
    if image is None:  # a process whose slice of the last global batch is empty
      shape = self.source[0]["image"].shape
      image = np.zeros((self.batch_size,) + shape, np.float32)
    return {"image": image, "label": label, "mask": mask}


class EvalBatches:
  """Re-iterable, finite: every example of the split exactly once (mask False = padding)."""

  def __init__(self, source, batch_size: int, shard_index: int, num_shards: int,
               num_workers: int):
    self._batch_fn = _EvalBatch(source, batch_size, shard_index, num_shards)
    self._num_batches = math.ceil(len(source) / (batch_size * num_shards))
    self._num_workers = num_workers

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self._num_batches == 0:
      return iter(())
    return _iterate(self._batch_fn, 0, self._num_batches, self._num_workers)


def eval_batches(source, data_config: ml_collections.ConfigDict, *, batch_size: int,
                 shard_index: int = 0, num_shards: int = 1) -> EvalBatches:
  """Evaluation batches {'image': float32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}.

  No augmentation; the last global batch is padded (mask False) so that every example is seen
  exactly once across processes; len() gives the number of batches.
  """
  return EvalBatches(source, batch_size, shard_index, num_shards, data_config.num_workers)
