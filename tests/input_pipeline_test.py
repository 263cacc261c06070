"""Tests for diffmic_jax.data.input_pipeline: splits from configs, training and evaluation
batches."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import default
from diffmic_jax.data import input_pipeline

LOW = (0 - np.array(input_pipeline.IMAGENET_MEAN)) / np.array(input_pipeline.IMAGENET_STD)
HIGH = (1 - np.array(input_pipeline.IMAGENET_MEAN)) / np.array(input_pipeline.IMAGENET_STD)


def _demo_config(**overrides):
  config = default.get_config().data
  config.image_size = 32
  config.demo_num_examples = 120
  for key, value in overrides.items():
    config[key] = value
  return config


def _array_source(n=50, size=16, num_classes=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return input_pipeline.ArraySource(images, np.arange(n) % num_classes)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _ids(batch):
  """Example ids of a batch whose images are the constant id (no augmentation)."""
  pixel = batch["image"][:, 0, 0, 0] * input_pipeline.IMAGENET_STD[0]
  return np.round((pixel + input_pipeline.IMAGENET_MEAN[0]) * 255).astype(int).tolist()


def test_demo_splits_and_split_json(tmp_path):
  config = _demo_config()
  splits = input_pipeline.create_splits(config, str(tmp_path))
  assert len(splits.train) + len(splits.val) + len(splits.test) == 120
  assert abs(len(splits.test) - 36) <= 2
  assert splits.class_names[0] == "horizontal_square"
  example = splits.train[0]
  assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
  saved = json.loads((tmp_path / "split.json").read_text())
  assert len(saved["test"]) == len(splits.test)
  again = input_pipeline.create_splits(config, str(tmp_path))  # same seed: same split, no error
  assert again.test.ids == splits.test.ids
  with pytest.raises(ValueError, match="differs"):
    input_pipeline.create_splits(_demo_config(split_seed=7), str(tmp_path))
  reused = input_pipeline.create_splits(
      _demo_config(split_seed=7, split_file=str(tmp_path / "split.json")), str(tmp_path))
  assert reused.test.ids == splits.test.ids


def test_num_classes_mismatch_names_the_field():
  with pytest.raises(ValueError, match="data.num_classes=5"):
    input_pipeline.create_splits(_demo_config(num_classes=5), None)


def test_missing_manual_dir_names_the_field(tmp_path):
  config = default.get_config().data
  config.name = "ham10000"
  config.num_classes = 7
  config.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="config.data.manual_dir is empty"):
    input_pipeline.create_splits(config, None)


def test_image_folder_through_create_splits(tmp_path):
  rng = np.random.default_rng(0)
  for label in ("a", "b", "c"):
    os.makedirs(tmp_path / "raw" / label)
    for i in range(10):
      Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
          tmp_path / "raw" / label / f"{i}.png")
  config = _demo_config(name="image_folder", manual_dir=str(tmp_path / "raw"), num_classes=3,
                        data_dir=str(tmp_path / "tfds"), image_size=16, test_fraction=0.2)
  splits = input_pipeline.create_splits(config, None)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 6)
  assert sorted(splits.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
  batch = next(input_pipeline.train_iterator(splits.train, config, batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)


def test_train_batches_shapes_ranges_and_determinism():
  config = _demo_config()
  source = _array_source()
  it = input_pipeline.train_iterator(source, config, batch_size=8, seed=1)
  batches = _take(it, 8)
  assert set(batches[0]) == {"image", "label"}
  assert batches[0]["image"].shape == (8, 16, 16, 3) and batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32
  for batch in batches:
    assert (batch["image"] >= LOW.astype(np.float32) - 1e-5).all()
    assert (batch["image"] <= HIGH.astype(np.float32) + 1e-5).all()
  same = _take(input_pipeline.train_iterator(source, config, batch_size=8, seed=1), 8)
  other = _take(input_pipeline.train_iterator(source, config, batch_size=8, seed=2), 8)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, same))
  assert not np.array_equal(batches[0]["image"], other[0]["image"])
  assert input_pipeline.steps_per_epoch(len(source), 8) == it.steps_per_epoch == 6


def test_epochs_reshuffle_and_drop_remainder():
  config = _demo_config(hflip=False, rotation_degrees=0.0)
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  source = input_pipeline.ArraySource(images, np.zeros(10))
  it = input_pipeline.train_iterator(source, config, batch_size=3, seed=0)
  epoch0 = sum((_ids(b) for b in _take(it, 3)), [])
  epoch1 = sum((_ids(b) for b in _take(it, 3)), [])
  assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # 3 steps of 3, no repeats
  assert epoch0 != epoch1


def test_resume_mid_epoch_gives_the_same_batches():
  config = _demo_config()
  source = _array_source()
  it = input_pipeline.train_iterator(source, config, batch_size=8, seed=3)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)  # crosses the epoch boundary (6 steps per epoch)
  resumed = input_pipeline.train_iterator(source, config, batch_size=8, seed=3)
  resumed.set_state(state)
  got = _take(resumed, 5)
  assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
             for a, b in zip(expected, got))
  with pytest.raises(ValueError, match="seed"):
    input_pipeline.train_iterator(source, config, batch_size=8, seed=4).set_state(state)


def test_shards_partition_each_global_batch():
  config = _demo_config(hflip=False, rotation_degrees=0.0)
  source = _array_source(n=40)
  full = next(input_pipeline.train_iterator(source, config, batch_size=8, seed=0))
  parts = [next(input_pipeline.train_iterator(source, config, batch_size=4, seed=0,
                                              shard_index=i, num_shards=2)) for i in range(2)]
  assert np.array_equal(np.concatenate([p["image"] for p in parts]), full["image"])


def test_a_state_saved_by_process_0_resumes_every_process_and_layout():
  """Checkpoints hold process 0's iterator state; any process, and any split of the same
  global batch, continues from it with the batches an uninterrupted run gets."""
  config = _demo_config()
  source = _array_source(n=40)
  shard = lambda i, n: input_pipeline.train_iterator(source, config, batch_size=8 // n, seed=2,
                                                     shard_index=i, num_shards=n)
  saver = shard(0, 2)
  _take(saver, 3)
  state = json.loads(json.dumps(saver.get_state()))
  uninterrupted = shard(1, 2)
  _take(uninterrupted, 3)
  expected = _take(uninterrupted, 4)  # crosses the epoch boundary (5 steps per epoch)
  resumed = shard(1, 2)
  resumed.set_state(state)
  one_process = shard(0, 1)
  one_process.set_state(state)
  whole = _take(one_process, 4)
  for want, got, full in zip(expected, _take(resumed, 4), whole):
    assert np.array_equal(want["image"], got["image"])
    assert np.array_equal(want["image"], full["image"][4:])  # process 1's half of the batch
  with pytest.raises(ValueError, match="global batch"):
    input_pipeline.train_iterator(source, config, batch_size=8, seed=2,
                                  num_shards=2).set_state(state)


def _check_rotation(seed):
  """A white square rotated by the angle the rng draws: pixels well inside the rotated square
  are white, pixels well outside are the black fill, for the counter-clockwise angle only."""
  angle = np.deg2rad(np.random.default_rng(seed).uniform(-30.0, 30.0))  # augment's only draw
  assert abs(angle) > np.deg2rad(5)  # the seeds are chosen so that the corners are filled
  rotated = input_pipeline.augment(np.full((32, 32, 3), 255, np.uint8),
                                   np.random.default_rng(seed), hflip=False, vflip=False,
                                   rotation_degrees=30.0)
  assert rotated.shape == (32, 32, 3) and rotated.dtype == np.uint8
  y, x = np.mgrid[0:32, 0:32] + 0.5 - 16.0  # pixel centres about the image centre (y down)

  def depth(theta):  # how far inside the source square each output pixel maps (px)
    sx = x * np.cos(theta) - y * np.sin(theta)
    sy = x * np.sin(theta) + y * np.cos(theta)
    return 16.0 - np.maximum(np.abs(sx), np.abs(sy))

  inside, outside = depth(angle) > 1.5, depth(angle) < -1.5
  assert outside.sum() > 20 and np.all(rotated[inside] == 255) and np.all(rotated[outside] == 0)
  assert not np.all(rotated[depth(-angle) < -1.5] == 0)  # the other direction does not fit


def test_augment_flips_and_rotation_fill():
  image = np.full((32, 32, 3), 200, np.uint8)
  image[:, :4] = 10
  rng = np.random.default_rng(0)
  flips = [input_pipeline.augment(image, rng, hflip=True, vflip=False, rotation_degrees=0.0)
           for _ in range(200)]
  flipped = np.mean([f[0, -1, 0] == 10 for f in flips])
  assert 0.35 < flipped < 0.65
  _check_rotation(seed=3)  # -24.9 degrees
  _check_rotation(seed=4)  # +26.6 degrees
  vflips = [input_pipeline.augment(image.transpose(1, 0, 2), rng, hflip=False, vflip=True,
                                   rotation_degrees=0.0)[-1, 0, 0] == 10 for _ in range(200)]
  assert 0.35 < np.mean(vflips) < 0.65


def test_class_balanced_sampling():
  """Every pair of consecutive examples holds both classes; each class cycles through all its
  examples before repeating one (the minority class twice per batch of 4)."""
  config = _demo_config(class_balanced=True, hflip=False, rotation_degrees=0.0)
  labels = np.array([0] * 6 + [1] * 2)
  images = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  source = input_pipeline.ArraySource(images, labels)
  it = input_pipeline.train_iterator(source, config, batch_size=4, seed=0)
  batches = _take(it, 3)
  drawn = np.concatenate([b["label"] for b in batches])
  assert all(sorted(pair) == [0, 1] for pair in drawn.reshape(-1, 2).tolist())
  ids = sum((_ids(b) for b in batches), [])
  majority, minority = [i for i in ids if i < 6], [i for i in ids if i >= 6]
  assert sorted(majority) == list(range(6))
  assert all(sorted(minority[k:k + 2]) == [6, 7] for k in range(0, 6, 2))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_eval_sees_every_example_once(num_shards):
  config = _demo_config()
  source = _array_source(n=23)
  seen = []
  for shard in range(num_shards):
    batches = input_pipeline.eval_batches(source, config, batch_size=4, shard_index=shard,
                                          num_shards=num_shards)
    for batch in batches:
      assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].dtype == bool
      assert set(batch) == {"image", "label", "mask"}
      seen += [img.tobytes() for img in batch["image"][batch["mask"]]]
    assert len(list(batches)) == len(batches)  # re-iterable
  expected = [input_pipeline.normalise(source[i]["image"]).tobytes() for i in range(23)]
  assert sorted(seen) == sorted(expected)


def test_worker_processes_give_the_same_batches():
  config = _demo_config()
  source = _array_source(n=24)
  in_process = _take(input_pipeline.train_iterator(source, config, batch_size=4, seed=5), 3)
  config.num_workers = 1
  workers = _take(input_pipeline.train_iterator(source, config, batch_size=4, seed=5), 3)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(in_process, workers))


def test_resume_with_workers_from_grain_state_or_from_the_step():
  """A state saved with a worker process resumes mid-epoch exactly, through grain's own state
  (same layout) and through the step (no workers)."""
  config = _demo_config(num_workers=1)
  source = _array_source(n=24)
  it = input_pipeline.train_iterator(source, config, batch_size=8, seed=6)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)  # crosses the epoch boundary (3 steps per epoch)
  for num_workers in (1, 0):
    config.num_workers = num_workers
    resumed = input_pipeline.train_iterator(source, config, batch_size=8, seed=6)
    resumed.set_state(state)
    got = _take(resumed, 3)
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
               for a, b in zip(expected, got)), num_workers
