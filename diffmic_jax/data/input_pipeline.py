"""Input pipeline: datasets -> train/val/test sources -> Grain batches (the only Grain user).

Sources hold uint8 images; batches are float32 ImageNet-normalised. Training batches are built
from grain's dataset operations: a source, grain's seeded global shuffle (reshuffled every
epoch, the incomplete last global batch of an epoch dropped), a per-example random map for the
augmentation and normalisation (each example's rng seeded from the seed and its position in the
stream), batching, and sharding by process (process p of P takes the p-th of every P batches, so
global batch s is positions [s * G, (s + 1) * G) of the stream, G = per-process batch x P), then
read threads and optionally worker processes (`mp_prefetch`). So the same seed gives the same
batches with or without worker processes and with any number of processes, and a resumed run
continues mid-epoch exactly, from grain's own iterator state (see `TrainIterator`).

The batches differ from those of the hand-written pipeline of commit 7231a5a and before (its own
permutation and rng derivation), so runs made with it are reproduced only at that commit.
"""

import json
import logging
import os
from typing import Any, Iterator, NamedTuple

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image

from diffmic_jax.data import builders
from diffmic_jax.data import demo
from diffmic_jax.data import layouts
from diffmic_jax.data import splits as splits_lib
from diffmic_jax.platform import errors
from diffmic_jax.platform import files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    labels_all = np.asarray(metadata["label"], np.int64)
    emptied = [class_names[c] for c in range(len(class_names))
               if np.any(labels_all == c) and not np.any(labels_all[keep] == c)]
    if emptied:
      raise errors.UserError(
          f"data.deduplicate=True (data.dedup_threshold={data_config.dedup_threshold}) removed "
          f"every example of class(es) {emptied} as duplicates; lower data.dedup_threshold, set "
          "data.deduplicate=False, or check the dataset for copied images")
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


class _Augment:
  """Picklable per-example random map: example -> augmented example (uint8)."""

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.kwargs = dict(hflip=bool(data_config.hflip), vflip=bool(data_config.vflip),
                       rotation_degrees=float(data_config.rotation_degrees))

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {"image": augment(example["image"], rng, **self.kwargs),
            "label": np.int32(example["label"])}


def _normalise_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Normalises a stacked uint8 batch: stacking uint8 moves a quarter of the bytes of float32."""
  return {**batch, "image": normalise(batch["image"])}


def _class_seed(seed: int, label: int) -> int:
  """A 32-bit seed per (seed, class): unrelated shuffles for classes of equal size."""
  return int(np.random.SeedSequence([seed, label]).generate_state(1, np.uint32)[0])


def _example_stream(source, data_config, seed: int, examples_per_epoch: int) -> grain.MapDataset:
  """The endless stream of training examples, before augmentation.

  Uniform: epoch e is the first `examples_per_epoch` of grain's epoch-e global shuffle (index
  shuffle seeded from (seed, e); the rest of the epoch is dropped). Class-balanced: grain's mix
  with equal weights takes the C classes present in turn (stream position i has the
  (i mod C)-th class in label order), each class cycling through its own examples, reshuffled
  every cycle. So every global batch holds the classes equally (up to one), and an example
  returns once per cycle of its class: a minority example often, a majority one less than once
  per epoch. (Before the grain pipeline, examples were drawn with replacement with probability
  proportional to 1 / class count: equal classes only in expectation.)
  """
  if not data_config.class_balanced:
    shuffled = grain.MapDataset.source(source).seed(seed).shuffle()
    return shuffled[:examples_per_epoch].repeat()
  labels = _source_labels(source)
  per_class = []
  for label in np.unique(labels):  # a class absent from the split cannot be drawn
    index = np.flatnonzero(labels == label)
    subset = SubsetSource(source, index, labels[index], ids=[])
    per_class.append(grain.MapDataset.source(subset).seed(_class_seed(seed, int(label)))
                     .shuffle().repeat())
  return grain.MapDataset.mix(per_class, weights=[1.0] * len(per_class))


def _train_batches(source, data_config, batch_size: int, seed: int, shard_index: int,
                   num_shards: int) -> grain.MapDataset:
  """This process's endless training batches: global batch s, positions [s*G + p*B, +B)."""
  global_batch = batch_size * num_shards
  examples = _example_stream(source, data_config, seed,
                             steps_per_epoch(len(source), global_batch) * global_batch)
  # The augmentation rng of an example comes from (seed, its position in the stream).
  augmented = examples.random_map(_Augment(data_config))
  batches = augmented.batch(batch_size, drop_remainder=True)[shard_index::num_shards]
  return batches.map(_normalise_batch)


def _to_iterator(batches: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
  """Grain iterator over the batches in order: read threads, then worker processes."""
  dataset = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PREFETCH))
  return iter(dataset)


class TrainIterator:
  """Endless iterator of training batches with a JSON-serialisable state.

  State: {'step': global batches returned so far, 'seed', 'batch_size', 'shard_index',
  'num_shards', 'num_workers', 'start': the step the grain dataset starts at, 'grain': grain's
  own iterator state}. `set_state` restores grain's state when the layout (processes and
  workers) is the one that saved it, and otherwise restarts the grain dataset at 'step'.
  """

  def __init__(self, source, data_config, batch_size: int, seed: int, shard_index: int,
               num_shards: int):
    if seed < 0:
      raise ValueError(f"seed={seed}; expected a non-negative integer")
    self._batches = _train_batches(source, data_config, batch_size, seed, shard_index,
                                   num_shards)
    self._layout = {"seed": seed, "batch_size": batch_size, "shard_index": shard_index,
                    "num_shards": num_shards, "num_workers": int(data_config.num_workers)}
    self.steps_per_epoch = steps_per_epoch(len(source), batch_size * num_shards)
    if self.steps_per_epoch == 0:
      raise ValueError(f"the training split has {len(source)} examples, fewer than one global "
                       f"batch of {batch_size * num_shards}")
    self._step = self._start = 0
    self._iterator = None

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._open(self._start)
    batch = next(self._iterator)
    self._step += 1
    return batch

  def _open(self, start: int) -> grain.DatasetIterator:
    """A grain iterator whose first batch is global batch `start`."""
    return _to_iterator(self._batches[start:] if start else self._batches,
                        self._layout["num_workers"])

  def get_state(self) -> dict[str, Any]:
    grain_state = None if self._iterator is None else self._iterator.get_state()
    return {"step": self._step, **self._layout, "start": self._start, "grain": grain_state}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a saved state; the seed and the global batch must match.

    The step counts global batches, so a state saved by one process (process 0 writes the
    checkpoint's metadata) resumes every process, with any number of processes or workers that
    splits the same global batch: grain's own state where the layout matches (every process
    has consumed as many batches as process 0), else a fresh grain dataset from that step.
    """
    seed = self._layout["seed"]
    saved_seed = state.get("seed", seed)
    if saved_seed != seed:
      raise ValueError(f"iterator state has seed={saved_seed} but this iterator has {seed}; "
                       "resume with the same seed")
    global_batch = self._layout["batch_size"] * self._layout["num_shards"]
    saved = (state.get("batch_size", self._layout["batch_size"])
             * state.get("num_shards", self._layout["num_shards"]))
    if saved != global_batch:
      raise ValueError(f"iterator state has a global batch of {saved} but this iterator has "
                       f"{global_batch}; resume with the same training.batch_size")
    self._step = int(state["step"])
    same_layout = all(state.get(k) == self._layout[k] for k in ("num_shards", "num_workers"))
    if same_layout and state.get("grain") is not None:
      self._start = int(state["start"])
      self._iterator = self._open(self._start)
      self._iterator.set_state(state["grain"])
    else:
      self._start, self._iterator = self._step, None


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
  return TrainIterator(source, data_config, batch_size, seed, shard_index, num_shards)


class _Normalise:
  """Picklable map: evaluation example -> normalised example with mask True."""

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    return {"image": normalise(example["image"]), "label": np.int32(example["label"]),
            "mask": True}


class _Padding:
  """Picklable map: index -> a zero example with mask False (fills the last global batch)."""

  def __init__(self, shape: tuple[int, ...]):
    self.shape = shape

  def __call__(self, index: int) -> dict[str, Any]:
    del index
    return {"image": np.zeros(self.shape, np.float32), "label": np.int32(0), "mask": False}


def _eval_dataset(source, batch_size: int, shard_index: int,
                  num_shards: int) -> grain.MapDataset:
  """This process's padded evaluation batches; padding only at the end of the split."""
  examples = grain.MapDataset.source(source).map(_Normalise())
  padding = -len(source) % (batch_size * num_shards)
  if padding:
    shape = tuple(source[0]["image"].shape)
    examples = grain.MapDataset.concatenate(
        [examples, grain.MapDataset.range(padding).map(_Padding(shape))])
  return examples.batch(batch_size)[shard_index::num_shards]


class EvalBatches:
  """Re-iterable, finite: every example of the split exactly once (mask False = padding)."""

  def __init__(self, source, batch_size: int, shard_index: int, num_shards: int,
               num_workers: int):
    self._batches = (_eval_dataset(source, batch_size, shard_index, num_shards) if len(source)
                     else None)
    self._num_workers = num_workers

  def __len__(self) -> int:
    return 0 if self._batches is None else len(self._batches)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self._batches is None:
      return iter(())
    return _to_iterator(self._batches, self._num_workers)


def eval_batches(source, data_config: ml_collections.ConfigDict, *, batch_size: int,
                 shard_index: int = 0, num_shards: int = 1) -> EvalBatches:
  """Evaluation batches {'image': float32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}.

  No augmentation; the last global batch is padded (mask False) so that every example is seen
  exactly once across processes; len() gives the number of batches.
  """
  return EvalBatches(source, batch_size, shard_index, num_shards, data_config.num_workers)
