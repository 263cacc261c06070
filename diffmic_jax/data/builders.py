"""TFDS builders for DiffMIC's datasets (array_record, no TensorFlow needed).

Every builder writes one split, 'examples', whose examples are
  {'image': uint8 [S, S, 3] (centre square crop + bilinear resize, stored as PNG),
   'label': int, 'id': str, 'group': str, 'split': str, 'content_hash': str};
the train/val/test split is made later from 'id', 'label', 'group' and 'split' (see `splits`), so
changing split settings never rebuilds. The builder config name is `s<S>_<hash>`, where the hash
covers the build settings and a fingerprint (names, sizes, mtimes) of the raw files: a changed
source or image size builds a new dataset instead of reading a stale one.

TFDS writes into a `*.incomplete*` folder and renames it only when the build has finished, and
`prepare` only reads a folder holding `dataset_info.json`, so a half-built dataset is never read
as complete; a failed build is simply rebuilt on the next call.
"""

import abc
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from diffmic_jax.data import images
from diffmic_jax.data import layouts

VERSION = "1.0.0"
FORMAT = "png+thumbnail16"  # stored features; part of the config hash (a change rebuilds)
REPORT_FILE = "build_report.json"
SPLIT = "examples"  # the single TFDS split holding every example
_CHUNK = 256  # images decoded concurrently per chunk (bounds memory)
_THREADS = 4  # Pillow releases the GIL while decoding, resizing and encoding


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Everything that determines a built dataset's content.

  Attributes:
    kind: builder key of `BUILDERS`.
    image_size: side S of the stored square images.
    manual_dir: folder (or .npz file for medmnist) holding the raw data.
    manifest_file: CSV manifest (kind 'manifest').
    train_pickle: official DiffMIC train split pickle (kind 'official_pickle').
    test_pickle: official DiffMIC test split pickle (kind 'official_pickle').
    class_names: label order/names for image_folder, manifest, pickles and medmnist.
    label_order: HAM10000 label order, a key of `layouts.HAM_LABEL_ORDERS`.
    skip_bad_images: skip bad examples (listed in the build report) instead of failing.
  """
  kind: str
  image_size: int
  manual_dir: str = ""
  manifest_file: str = ""
  train_pickle: str = ""
  test_pickle: str = ""
  class_names: tuple[str, ...] = ()
  label_order: str = "official"
  skip_bad_images: bool = False

  def config_name(self) -> str:
    """`s<S>_<12 hex>`: the TFDS builder config name for these settings and raw files.

    Keyed on the files' content (names, sizes, mtimes), not on where they are: the same data
    under another path (a copy that keeps mtimes, `cp -a` or `rsync -a`) reuses the build.
    """
    content = {**dataclasses.asdict(self), "format": FORMAT, "version": VERSION}
    paths = {field: content.pop(field) for field in _PATH_FIELDS}
    digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode())
    for field in _PATH_FIELDS:
      if paths[field]:
        digest.update(f"{field}\n{_fingerprint(paths[field])}".encode("utf-8", "surrogateescape"))
    return f"s{self.image_size}_{digest.hexdigest()[:12]}"


_PATH_FIELDS = ("manual_dir", "manifest_file", "train_pickle", "test_pickle")


def _stat(path: str) -> str:
  try:
    stat = os.lstat(path)  # lstat: a broken symlink is listed, not an error here
  except OSError:
    return "missing"
  return f"{stat.st_size}|{stat.st_mtime_ns}"


def _fingerprint(path: str) -> str:
  """Cheap content fingerprint of a file (its name, size, mtime) or of a folder (sorted
  relative path, size, mtime of every file under it); the folder's own location is left out."""
  if not os.path.isdir(path):
    return f"{os.path.basename(path)}|{_stat(path)}"
  entries = []
  for dirpath, _, filenames in os.walk(path):
    for name in filenames:
      full = os.path.join(dirpath, name)
      entries.append(f"{os.path.relpath(full, path)}|{_stat(full)}")
  return "\n".join(sorted(entries))


class _DiffmicBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: list records (subclass), decode + preprocess in threads, write 'examples'."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {VERSION: "Initial release."}

  def __init__(self, *, settings: BuildSettings, **kwargs: Any):
    self.settings = settings
    self.problems = layouts.Problems(settings.skip_bad_images)
    self._listing = None
    self.num_written = 0
    config = tfds.core.BuilderConfig(name=settings.config_name(), version=VERSION,
                                     release_notes={VERSION: "Initial release."})
    super().__init__(config=config, **kwargs)

  @abc.abstractmethod
  def _list(self) -> layouts.Listing:
    """Lists the raw examples (no decoding)."""

  @property
  def listing(self) -> layouts.Listing:
    if self._listing is None:
      self._listing = self._list()
    return self._listing

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.settings.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(self.listing.class_names)),
            "id": tfds.features.Text(),
            "group": tfds.features.Text(),
            "split": tfds.features.Text(),
            "content_hash": tfds.features.Text(),
            "thumbnail": tfds.features.Tensor(
                shape=(images.THUMBNAIL_SIZE, images.THUMBNAIL_SIZE), dtype=np.uint8),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from settings.manual_dir; nothing is downloaded
    return {SPLIT: self._generate_examples()}

  def _load(self, record: layouts.Record):
    """(png, hash, thumbnail) of one record, or the BadImageError (raised in the caller)."""
    name = record.source if isinstance(record.source, str) else record.id
    try:
      return images.preprocess_file(record.source, self.settings.image_size, name=name)
    except images.BadImageError as e:
      return e

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    records = self.listing.records
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      for start in range(0, len(records), _CHUNK):
        chunk = records[start:start + _CHUNK]
        for record, result in zip(chunk, pool.map(self._load, chunk)):
          if isinstance(result, images.BadImageError):
            if not self.problems.skip:
              raise result
            self.problems.report(result.path, result.problem)
            continue
          png, digest, thumb = result
          self.num_written += 1
          yield record.id, {"image": png, "label": record.label, "id": record.id,
                            "group": record.group, "split": record.split,
                            "content_hash": digest, "thumbnail": thumb}


class _NoCustomConfigWarning(logging.Filter):
  """Drops TFDS's "Using custom data configuration" warning: our builders always use one (the
  config name is the content key), so the warning would print on every run."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_NoCustomConfigWarning())

_MANUAL = "Builders never download: pass the folder holding the files as data.manual_dir."


class Ham10000(_DiffmicBuilder):
  """HAM10000 / ISIC 2018 Task 3 (7 classes; lesion_id kept as 'group')."""
  name = "diffmic_ham10000"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  Either HAM10000 as distributed (Harvard Dataverse / Kaggle): HAM10000_metadata.csv with the
  images in HAM10000_images_part_1/ and HAM10000_images_part_2/ (or images/); or ISIC 2018
  Task 3: ISIC2018_Task3_Training_GroundTruth.csv with ISIC2018_Task3_Training_Input/ (and
  optionally ISIC2018_Task3_Training_LesionGroupings.csv for lesion ids)."""

  def _list(self):
    return layouts.list_ham10000(self.settings.manual_dir, self.settings.label_order,
                                 self.problems)


class Aptos2019(_DiffmicBuilder):
  """APTOS 2019 blindness detection, Kaggle train set (5 grades)."""
  name = "diffmic_aptos2019"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  Kaggle competition 'aptos2019-blindness-detection': train.csv (id_code, diagnosis) and
  train_images/<id_code>.png (.jpg and .jpeg are accepted too)."""

  def _list(self):
    return layouts.list_aptos2019(self.settings.manual_dir, self.problems)


class ImageFolder(_DiffmicBuilder):
  """Any `<root>/<class>/<image>` folder (PMG, BUSI, users' own data)."""
  name = "diffmic_image_folder"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  One sub-folder per class: <manual_dir>/<class>/<image>.{png,jpg,jpeg,bmp,tif,tiff,...}."""

  def _list(self):
    return layouts.list_image_folder(self.settings.manual_dir, self.settings.class_names,
                                     self.problems)


class Manifest(_DiffmicBuilder):
  """CSV manifest `path,label[,split][,group]`."""
  name = "diffmic_manifest"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  data.manifest_file: a CSV with columns path,label and optionally split (train|val|test) and
  group; relative paths resolve against data.manual_dir, or the CSV's folder if that is ''."""

  def _list(self):
    return layouts.list_manifest(self.settings.manifest_file, self.settings.manual_dir,
                                 self.settings.class_names, self.problems)


class OfficialPickle(_DiffmicBuilder):
  """The official DiffMIC split pickles (lists of {'img_root', 'label'}), read safely."""
  name = "diffmic_official_pickle"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  data.train_pickle / data.test_pickle: the official *_train.pkl / *_test.pkl; relative
  img_root paths resolve against data.manual_dir (the official repository root)."""

  def _list(self):
    return layouts.list_official_pickles(self.settings.train_pickle, self.settings.test_pickle,
                                         self.settings.manual_dir, self.settings.class_names,
                                         self.problems)


class Medmnist(_DiffmicBuilder):
  """A MedMNIST .npz file (official train/val/test kept as predefined splits)."""
  name = "diffmic_medmnist"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL + """
  data.manual_dir: a MedMNIST <name>[_<size>].npz file, or a folder holding exactly one."""

  def _list(self):
    return layouts.list_medmnist(self.settings.manual_dir, self.settings.class_names)


BUILDERS = {
    "ham10000": Ham10000,
    "aptos2019": Aptos2019,
    "image_folder": ImageFolder,
    "manifest": Manifest,
    "official_pickle": OfficialPickle,
    "medmnist": Medmnist,
}


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def builder_dir(settings: BuildSettings, data_dir: str) -> str:
  """Folder of the finished dataset for these settings."""
  return os.path.join(data_dir or default_data_dir(), BUILDERS[settings.kind].name,
                      settings.config_name(), VERSION)


def check_kind(kind: str) -> None:
  if kind not in BUILDERS:
    raise ValueError(f"unknown dataset data.name={kind!r}; valid: {sorted(BUILDERS)} "
                     "(and 'demo')")


def prepare(settings: BuildSettings, data_dir: str = "") -> tfds.core.DatasetBuilder:
  """Builds the dataset once (if not already complete) and returns a read-only builder.

  Args:
    settings: what to build.
    data_dir: TFDS data folder ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    A builder read from the finished folder: `.as_data_source('examples')`, `.info`.

  Raises:
    layouts.BadInputError, images.BadImageError: bad input (unless skip_bad_images).
  """
  check_kind(settings.kind)
  data_dir = data_dir or default_data_dir()
  path = builder_dir(settings, data_dir)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    builder = BUILDERS[settings.kind](settings=settings, data_dir=data_dir,
                                      file_format="array_record")
    source = settings.manual_dir or settings.manifest_file or settings.train_pickle
    logging.info("Preparing the %s dataset from %s into %s (once; later runs with the same "
                 "files reuse it)...", settings.kind, source, path)
    # TFDS prints "Downloading and preparing dataset Unknown size ..." and its own bars though
    # nothing is downloaded; our line above says what happens instead.
    with contextlib.redirect_stdout(io.StringIO()), _tfds_quiet():
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=settings.manual_dir or None))
    _write_report(builder, path)
    logging.info("Prepared %d examples.", builder.num_written)
  return tfds.builder_from_directory(path)


@contextlib.contextmanager
def _tfds_quiet():
  """Switches TFDS's progress bars off for the duration of a build."""
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()


def _write_report(builder: _DiffmicBuilder, path: str) -> None:
  report = {"settings": dataclasses.asdict(builder.settings),
            "num_examples": builder.num_written,
            "class_names": list(builder.listing.class_names),
            "skipped": builder.problems.items}
  with open(os.path.join(path, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=1)
  if builder.problems.items:
    logging.warning("Skipped %d bad examples; see %s", len(builder.problems.items),
                    os.path.join(path, REPORT_FILE))


def read_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The build report (settings, counts, skipped examples) of a prepared dataset."""
  path = os.path.join(os.fspath(builder.data_dir), REPORT_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def read_metadata(builder: tfds.core.DatasetBuilder) -> dict[str, list]:
  """Reads everything but the images (not decoded) of every example.

  Returns:
    {'id', 'label', 'group', 'split', 'content_hash': lists; 'thumbnail': uint8 [N, 16, 16]},
    indexed like `builder.as_data_source('examples')`.
  """
  source = builder.as_data_source(SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
  columns = {"id": [], "label": [], "group": [], "split": [], "content_hash": [],
             "thumbnail": []}
  for i in range(len(source)):
    example = source[i]
    for key, values in columns.items():
      value = example[key]
      values.append(value.decode() if isinstance(value, bytes) else value)
  columns["label"] = [int(v) for v in columns["label"]]
  columns["thumbnail"] = np.asarray(columns["thumbnail"], np.uint8).reshape(
      -1, images.THUMBNAIL_SIZE, images.THUMBNAIL_SIZE)
  return columns
