"""Tests for diffmic_jax.data: builders on generated fixture trees, bad input, splits."""

import collections
import csv
import json
import os
import shutil
import pickle

import numpy as np
from PIL import Image
import pytest

from diffmic_jax.data import builders
from diffmic_jax.data import demo
from diffmic_jax.data import images
from diffmic_jax.data import layouts
from diffmic_jax.data import official_pickle
from diffmic_jax.data import splits

SIZE = 16
SHARED_DATA = os.environ.get(
    "DIFFMIC_SHARED_DATA",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def _save(path, seed=0, size=(30, 20), mode="RGB", fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(array).convert(mode).save(path, format=fmt)
  return path


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _build(tmp_path, **kwargs):
  settings = builders.BuildSettings(image_size=SIZE, **kwargs)
  builder = builders.prepare(settings, str(tmp_path / "tfds"))
  return builder, builders.read_metadata(builder)


def _by_id(metadata, key):
  return dict(zip(metadata["id"], metadata[key]))


# ----------------------------------------------------------------------------- builders


def _ham_tree(root, n=6):
  dx = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
  rows = []
  for i in range(n):
    folder = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
    _save(str(root / folder / f"ISIC_{i:07d}.jpg"), seed=i, fmt="JPEG")
    rows.append([f"HAM_{i // 2:07d}", f"ISIC_{i:07d}", dx[i % 7], "histo", "50", "male", "back"])
  _write_csv(root / layouts.HAM_METADATA_CSV,
             ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)


def test_ham_metadata_layout(tmp_path):
  _ham_tree(tmp_path / "ham")
  builder, md = _build(tmp_path, kind="ham10000", manual_dir=str(tmp_path / "ham"))
  names = builder.info.features["label"].names
  assert names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
  assert sorted(md["id"]) == [f"ISIC_{i:07d}" for i in range(6)]
  assert _by_id(md, "label") == {f"ISIC_{i:07d}": i for i in range(6)}
  assert _by_id(md, "group")["ISIC_0000003"] == "HAM_0000001"
  example = builder.as_data_source(builders.SPLIT)[0]
  assert example["image"].shape == (SIZE, SIZE, 3) and example["image"].dtype == np.uint8


def test_ham_isic2018_layout_and_alphabetical_order(tmp_path):
  root = tmp_path / "isic"
  classes = list(layouts.HAM_LABEL_ORDERS["official"])
  rows = []
  for i in range(7):
    _save(str(root / "ISIC2018_Task3_Training_Input" / f"ISIC_{i:07d}.jpg"), seed=i, fmt="JPEG")
    rows.append([f"ISIC_{i:07d}"] + ["1.0" if c == i else "0.0" for c in range(7)])
  _write_csv(root / layouts.ISIC_GROUND_TRUTH_CSV, ["image"] + classes, rows)
  builder, md = _build(tmp_path, kind="ham10000", manual_dir=str(root),
                       label_order="alphabetical")
  names = builder.info.features["label"].names
  assert names == sorted(classes)
  assert {i: names[l] for i, l in _by_id(md, "label").items()} == {
      f"ISIC_{i:07d}": classes[i] for i in range(7)}


def test_aptos_mixed_extensions(tmp_path):
  root = tmp_path / "aptos"
  exts = [".png", ".jpg", ".jpeg", ".png", ".jpg"]
  for i, ext in enumerate(exts):
    _save(str(root / "train_images" / f"id{i}{ext}"), seed=i, size=(40, 30),
          fmt="JPEG" if ext != ".png" else "PNG")
  _write_csv(root / "train.csv", ["id_code", "diagnosis"], [[f"id{i}", i] for i in range(5)])
  builder, md = _build(tmp_path, kind="aptos2019", manual_dir=str(root))
  assert _by_id(md, "label") == {f"id{i}": i for i in range(5)}
  assert len(builder.info.features["label"].names) == 5


def test_image_folder_and_centre_crop(tmp_path):
  root = tmp_path / "folder"
  # A 30x10 image: the left/right thirds are black, the centre square white.
  wide = np.zeros((10, 30, 3), np.uint8)
  wide[:, 10:20] = 255
  os.makedirs(root / "b")
  Image.fromarray(wide).save(root / "b" / "wide.png")
  _save(str(root / "a" / "x.png"))
  builder, md = _build(tmp_path, kind="image_folder", manual_dir=str(root))
  assert builder.info.features["label"].names == ["a", "b"]
  source = builder.as_data_source(builders.SPLIT)
  image = source[md["id"].index("b/wide.png")]["image"]
  assert image.min() == 255  # the crop kept exactly the white centre square


def test_manifest_with_split_and_group(tmp_path):
  root = tmp_path / "m"
  rows = []
  for i in range(6):
    _save(str(root / "img" / f"{i}.png"), seed=i)
    rows.append([f"img/{i}.png", ["cat", "dog"][i % 2], ["train", "train", "test"][i % 3],
                 f"g{i // 2}"])
  _write_csv(root / "manifest.csv", ["path", "label", "split", "group"], rows)
  _, md = _build(tmp_path, kind="manifest", manifest_file=str(root / "manifest.csv"))
  assert _by_id(md, "split")["img/2.png"] == "test"
  assert _by_id(md, "group")["img/5.png"] == "g2"
  assert _by_id(md, "label")["img/1.png"] == 1


def test_medmnist_npz_grey_any_size(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 5), ("val", 2), ("test", 3)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 20, 20), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)
  np.savez(tmp_path / "toymnist.npz", **arrays)
  builder, md = _build(tmp_path, kind="medmnist", manual_dir=str(tmp_path / "toymnist.npz"))
  assert collections.Counter(md["split"]) == {"train": 5, "val": 2, "test": 3}
  assert builder.info.features["label"].names == ["0", "1", "2"]
  image = builder.as_data_source(builders.SPLIT)[0]["image"]
  assert image.shape == (SIZE, SIZE, 3)
  assert np.array_equal(image[..., 0], image[..., 2])  # grey -> RGB


def test_official_pickle(tmp_path):
  entries = []
  for i in range(4):
    _save(str(tmp_path / "dataset" / f"{i}.png"), seed=i)
    entries.append({"img_root": f"./dataset/{i}.png", "label": i % 2})
  for name, part in (("train.pkl", entries[:3]), ("test.pkl", entries[3:])):
    with open(tmp_path / name, "wb") as f:
      pickle.dump(part, f)
  _, md = _build(tmp_path, kind="official_pickle", manual_dir=str(tmp_path),
                 train_pickle=str(tmp_path / "train.pkl"), test_pickle=str(tmp_path / "test.pkl"))
  assert collections.Counter(md["split"]) == {"train": 3, "test": 1}


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump([{"img_root": "a.png", "label": 0}, _Evil()], f)
  with pytest.raises(official_pickle.UnsafePickleError, match="evil.pkl"):
    official_pickle.read_split_pickle(str(path))
  with open(path, "wb") as f:
    pickle.dump({"not": "a list"}, f)
  with pytest.raises(ValueError, match="expected a list"):
    official_pickle.read_split_pickle(str(path))


def test_half_built_dataset_is_never_read(tmp_path, monkeypatch):
  root = tmp_path / "folder"
  for i in range(6):
    _save(str(root / "a" / f"{i}.png"), seed=i)
  original = images.preprocess_file
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > 3:
      raise RuntimeError("simulated crash mid-build")
    return original(*args, **kwargs)

  monkeypatch.setattr(images, "preprocess_file", failing)
  settings = builders.BuildSettings(kind="image_folder", image_size=SIZE, manual_dir=str(root))
  with pytest.raises(RuntimeError, match="simulated"):
    builders.prepare(settings, str(tmp_path / "tfds"))
  final = builders.builder_dir(settings, str(tmp_path / "tfds"))
  assert not os.path.exists(os.path.join(final, "dataset_info.json"))
  monkeypatch.setattr(images, "preprocess_file", original)
  _, md = _build(tmp_path, kind="image_folder", manual_dir=str(root))
  assert len(md["id"]) == 6


def test_changed_source_builds_a_new_dataset(tmp_path):
  root = tmp_path / "folder"
  _save(str(root / "a" / "0.png"))
  _, md = _build(tmp_path, kind="image_folder", manual_dir=str(root))
  _save(str(root / "a" / "1.png"))
  _, md2 = _build(tmp_path, kind="image_folder", manual_dir=str(root))
  assert (len(md["id"]), len(md2["id"])) == (1, 2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
def test_convertible_modes(tmp_path, mode):
  path = str(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
  if mode == "I;16":
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
  else:
    _save(path, mode=mode)
  image = images.open_rgb(path)
  assert image.mode == "RGB" and image.size in ((30, 20), (8, 8))
  if mode == "I;16":
    assert np.asarray(image).min() == 255  # full 16-bit range -> full 8-bit range


def test_unsupported_mode_names_file(tmp_path):
  path = str(tmp_path / "f.tif")
  Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
  with pytest.raises(images.BadImageError, match="f.tif.*unsupported image mode 'F'"):
    images.open_rgb(path)


def _corrupt(root):
  (root / "a" / "bad.png").write_bytes(b"this is not an image")


def _truncated(root):
  _save(str(root / "a" / "trunc.jpg"), size=(64, 64), fmt="JPEG")
  data = (root / "a" / "trunc.jpg").read_bytes()
  (root / "a" / "trunc.jpg").write_bytes(data[: len(data) // 2])


def _empty_class(root):
  os.makedirs(root / "c")


def _broken_link(root):
  os.symlink(root / "a" / "gone.png", root / "a" / "link.png")


def _non_utf8_name(root):
  name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not valid UTF-8
  _save(str(root / "a" / name))


BAD_FOLDER_CASES = {"corrupt": (_corrupt, "bad.png", "not a readable image"),
                    "truncated": (_truncated, "trunc.jpg", "corrupt or truncated"),
                    "empty_class": (_empty_class, "c", "empty class"),
                    "broken_link": (_broken_link, "link.png", "broken link"),
                    "non_utf8_name": (_non_utf8_name, "caf\ufffd.png", "not valid UTF-8")}


@pytest.mark.parametrize("case", sorted(BAD_FOLDER_CASES))
def test_bad_image_folder(tmp_path, case):
  make, name, problem = BAD_FOLDER_CASES[case]
  root = tmp_path / "folder"
  for label in ("a", "b"):
    _save(str(root / label / "ok.png"))
  make(root)
  with pytest.raises(ValueError, match=f"{name}.*{problem}"):
    _build(tmp_path, kind="image_folder", manual_dir=str(root))
  builder, md = _build(tmp_path, kind="image_folder", manual_dir=str(root), skip_bad_images=True)
  assert sorted(md["id"]) == ["a/ok.png", "b/ok.png"]
  skipped = builders.read_report(builder)["skipped"]
  assert len(skipped) == 1 and name in skipped[0]["file"] and problem in skipped[0]["problem"]


def _aptos_csv(root, rows, header=("id_code", "diagnosis")):
  for i in range(2):
    _save(str(root / "train_images" / f"id{i}.png"), seed=i)
  _write_csv(root / "train.csv", header, rows)


BAD_CSV_CASES = {
    "missing_file": ([["id0", 0], ["id1", 1], ["id9", 2]], "id9.*not found"),
    "unknown_label": ([["id0", 0], ["id1", 7]], "id1.*unknown label"),
    "duplicate_id": ([["id0", 0], ["id1", 1], ["id0", 2]],
                     r"train.csv \(row 4, id_code=id0\): duplicate id_code, first listed in row 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV_CASES))
def test_bad_csv_rows(tmp_path, case):
  rows, message = BAD_CSV_CASES[case]
  _aptos_csv(tmp_path / "aptos", rows)
  with pytest.raises(layouts.BadInputError, match=message):
    _build(tmp_path, kind="aptos2019", manual_dir=str(tmp_path / "aptos"))
  builder, md = _build(tmp_path, kind="aptos2019", manual_dir=str(tmp_path / "aptos"),
                       skip_bad_images=True)
  assert len(md["id"]) == len(rows) - 1
  assert len(builders.read_report(builder)["skipped"]) == 1


def test_ham_duplicate_image_id_is_named(tmp_path):
  root = tmp_path / "ham"
  _ham_tree(root)
  lines = (root / layouts.HAM_METADATA_CSV).read_text().splitlines()
  (root / layouts.HAM_METADATA_CSV).write_text("\n".join(lines + [lines[2]]) + "\n")
  with pytest.raises(layouts.BadInputError,
                     match=r"\(row 8, image_id=ISIC_0000001\): duplicate image_id.*row 3"):
    _build(tmp_path, kind="ham10000", manual_dir=str(root))
  _, md = _build(tmp_path, kind="ham10000", manual_dir=str(root), skip_bad_images=True)
  assert len(md["id"]) == 6


def test_latin1_manifest_names_the_file(tmp_path):
  _save(str(tmp_path / "img" / "x.png"))
  manifest = tmp_path / "manifest.csv"
  manifest.write_bytes("path,label\nimg/x.png,b\xe9nin\n".encode("latin-1"))
  with pytest.raises(layouts.BadInputError, match=r"manifest.csv: not UTF-8 text"):
    _build(tmp_path, kind="manifest", manifest_file=str(manifest))


def test_leftover_incomplete_build_does_not_break_the_next(tmp_path):
  root = tmp_path / "folder"
  _save(str(root / "a" / "0.png"))
  settings = builders.BuildSettings(kind="image_folder", image_size=SIZE, manual_dir=str(root))
  final = builders.builder_dir(settings, str(tmp_path / "tfds"))
  # What a kill -9 during a build leaves: TFDS's temporary folder with partial files.
  leftover = os.path.join(os.path.dirname(final), f"incomplete.ABC123_{builders.VERSION}")
  os.makedirs(leftover)
  open(os.path.join(leftover, "diffmic_image_folder-examples.array_record-00000-of-00001"),
       "wb").write(b"partial")
  _, md = _build(tmp_path, kind="image_folder", manual_dir=str(root))
  assert md["id"] == ["a/0.png"]


def test_cache_is_keyed_on_content_not_path_and_tfds_is_quiet(tmp_path, capsys, caplog):
  caplog.set_level("INFO")
  root = tmp_path / "folder"
  for i in range(2):
    _save(str(root / "a" / f"{i}.png"), seed=i)
  _build(tmp_path, kind="image_folder", manual_dir=str(root))
  assert "Preparing the image_folder dataset" in caplog.text
  assert "Downloading" not in capsys.readouterr().out
  shutil.copytree(root, tmp_path / "moved")  # copy2 keeps names, sizes and mtimes
  moved = builders.BuildSettings(kind="image_folder", image_size=SIZE,
                                 manual_dir=str(tmp_path / "moved"))
  original = builders.BuildSettings(kind="image_folder", image_size=SIZE, manual_dir=str(root))
  assert moved.config_name() == original.config_name()
  caplog.clear()
  _build(tmp_path, kind="image_folder", manual_dir=str(tmp_path / "moved"))
  assert "Preparing" not in caplog.text  # reused, not built again


def test_csv_with_wrong_columns(tmp_path):
  _aptos_csv(tmp_path / "aptos", [["id0", 0]], header=("image", "grade"))
  with pytest.raises(layouts.BadInputError, match=r"train.csv: wrong columns.*id_code"):
    _build(tmp_path, kind="aptos2019", manual_dir=str(tmp_path / "aptos"), skip_bad_images=True)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="valid:.*image_folder"):
    builders.prepare(builders.BuildSettings(kind="nope", image_size=8))


# ----------------------------------------------------------------------------- splits


def _toy_labels(n=600, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
  ids = [f"x{i:04d}" for i in range(n)]
  return ids, labels


def test_random_split_deterministic_stratified_and_order_free():
  ids, labels = _toy_labels()
  a = splits.random_split(ids, labels, test_fraction=0.3, val_fraction=0.1, seed=3)
  b = splits.random_split(ids, labels, test_fraction=0.3, val_fraction=0.1, seed=3)
  c = splits.random_split(ids, labels, test_fraction=0.3, val_fraction=0.1, seed=4)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["test"], c["test"])
  everything = np.concatenate([a["train"], a["val"], a["test"]])
  assert sorted(everything) == list(range(len(ids)))
  for label in range(5):
    n = (labels == label).sum()
    assert abs((labels[a["test"]] == label).sum() - 0.3 * n) <= 1
  # Storage order does not matter: the same ids land in the same split.
  perm = np.random.default_rng(0).permutation(len(ids))
  d = splits.random_split([ids[i] for i in perm], labels[perm], test_fraction=0.3,
                          val_fraction=0.1, seed=3)
  assert sorted(ids[perm[i]] for i in d["test"]) == sorted(ids[i] for i in a["test"])


def test_grouped_split_keeps_groups_on_one_side():
  ids, labels = _toy_labels()
  groups = [f"lesion{i // 3}" for i in range(len(ids))]
  labels = np.array([labels[(i // 3) * 3] for i in range(len(ids))])  # one label per lesion
  result = splits.random_split(ids, labels, test_fraction=0.3, val_fraction=0.1, seed=0,
                               groups=groups)
  sides = {name: {groups[i] for i in index} for name, index in result.items()}
  assert not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
  assert not sides["train"] & sides["val"]
  assert abs(len(result["test"]) / len(ids) - 0.3) < 0.03


def test_split_file_overrides(tmp_path):
  ids, labels = _toy_labels(20)
  path = tmp_path / "split.json"
  path.write_text(json.dumps({"train": ids[:10], "test": ids[10:15]}))
  result = splits.file_split(ids, labels, str(path), val_fraction=0.2, seed=0)
  assert sorted(np.concatenate([result["train"], result["val"]])) == list(range(10))
  assert sorted(result["test"]) == list(range(10, 15))
  path.write_text(json.dumps({"train": ["nope"], "test": ids[:1]}))
  with pytest.raises(ValueError, match="not in the dataset"):
    splits.file_split(ids, labels, str(path), val_fraction=0.0, seed=0)


def test_deduplicate_exact_near_and_conflicting():
  rng = np.random.default_rng(0)
  thumbs = rng.integers(0, 200, (5, 16, 16)).astype(np.uint8)
  thumbs[1] = thumbs[0] + 2  # near copy of 0, same label
  thumbs[4] = thumbs[3]  # exact copy of 3 with another label
  ids = ["a", "b", "c", "d", "e"]
  labels = np.array([0, 0, 1, 1, 2])
  hashes = ["h0", "h1", "h2", "h3", "h3"]
  keep, report = splits.deduplicate(ids, labels, hashes, thumbs, threshold=4.0)
  assert [ids[i] for i in keep] == ["a", "c"]
  assert report["num_dropped"] == 3 and report["num_dropped_conflicting_labels"] == 2
  keep, _ = splits.deduplicate(ids, labels, hashes, thumbs, threshold=0.0)
  assert [ids[i] for i in keep] == ["a", "b", "c"]


def test_demo_is_deterministic_and_balanced():
  x, y = demo.make_demo(40, 32, seed=1)
  x2, y2 = demo.make_demo(40, 32, seed=1)
  assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
  assert np.array_equal(x, x2) and np.array_equal(y, y2)
  assert np.bincount(y).tolist() == [10] * 4


# ----------------------------------------------------------------------------- shared data


def _shared(name):
  path = os.path.join(SHARED_DATA, name)
  if not os.path.isdir(path):
    pytest.skip(f"{path} not present")
  return path


def test_shared_ham10000_all_images(tmp_path):
  root = _shared("ham10000_200x150")
  builder, md = _build(tmp_path, kind="ham10000", manual_dir=root)
  names = builder.info.features["label"].names
  counts = collections.Counter(names[label] for label in md["label"])
  assert counts == {"NV": 6705, "MEL": 1113, "BKL": 1099, "BCC": 514, "AKIEC": 327,
                    "VASC": 142, "DF": 115}
  assert len(set(md["group"])) == 7470


def test_shared_busi_780_before_dedup(tmp_path):
  root = _shared("busi_256")
  builder, md = _build(tmp_path, kind="image_folder", manual_dir=root)
  assert builder.info.features["label"].names == ["benign", "malignant", "normal"]
  assert collections.Counter(md["label"]) == {0: 437, 1: 210, 2: 133}
  keep, report = splits.deduplicate(md["id"], np.asarray(md["label"]), md["content_hash"],
                                    md["thumbnail"], threshold=8.0)
  assert report["num_before"] == 780 and 550 < len(keep) < 700
