"""TensorBoard events next to metrics.jsonl, read back with a TFRecord reader written from the
file format (no TensorFlow, no tensorboard package)."""

import glob
import io
import json
import os
import struct

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from diffmic_jax.run import tensorboard


def _file_events(path: str) -> list:
  """The Event protos of one file. TFRecord framing: uint64 length, uint32 CRC of the length,
  the Event proto, uint32 CRC."""
  data = open(path, "rb").read()
  events, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def read_events(logdir: str) -> tuple[dict, dict]:
  """({tag: {step: value}} scalars, {tag: {step: uint8 [H, W, 3]}} images) of every event file,
  as TensorBoard shows them: files in name order (the order they were opened), and a session
  start at step T (a resumed run's `purge_step`) hiding the earlier events at steps >= T."""
  scalars, images = {}, {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for event in _file_events(path):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for values in (*scalars.values(), *images.values()):
          for step in [s for s in values if s >= event.step]:
            del values[step]
      for value in event.summary.value:
        if value.HasField("image"):
          pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
          images.setdefault(value.tag, {})[event.step] = pixels
        elif value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars, images


_RESULTS = {
    "diffusion": {"num_examples": 4, "accuracy": 0.75, "f1_macro": 0.5, "per_class": {},
                  "confusion_matrix": [[2, 0], [1, 1]], "auc_macro_ovr": None},
    "dcg_fused": {"num_examples": 4, "accuracy": 0.25, "f1_macro": 0.125, "per_class": {},
                  "confusion_matrix": [[1, 1], [2, 0]], "auc_macro_ovr": 0.5},
}


def test_metrics_log_writes_jsonl_and_events(tmp_path):
  rows = [{"step": 3, "loss": 1.5, "lr": 1e-3, "grad_norm": 2.0},
          {"step": 4, "loss": 1.25, "lr": 2e-3, "grad_norm": 0.5}]
  validation_row = {"step": 5, "epoch": 0, "split": "val", "val_diffusion_accuracy": 0.75}
  with tensorboard.MetricsLog(str(tmp_path)) as log:
    log.write("".join(json.dumps(r) + "\n" for r in rows))
    log.write(json.dumps(validation_row) + "\n")
    log.validation(5, "val", _RESULTS, ("benign", "malignant"))
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert [json.loads(line) for line in lines] == rows + [validation_row]

  scalars, images = read_events(str(tmp_path / "tensorboard"))
  assert scalars["train/loss"] == {3: 1.5, 4: 1.25}
  assert scalars["train/grad_norm"] == {3: 2.0, 4: 0.5}
  np.testing.assert_allclose([scalars["learning_rate/denoiser"][s] for s in (3, 4)],
                             [1e-3, 2e-3], rtol=1e-6)
  assert scalars["val/diffusion/accuracy"] == {5: 0.75}
  assert scalars["val/dcg_fused/f1_macro"] == {5: 0.125}
  assert scalars["val/dcg_fused/auc_macro_ovr"] == {5: 0.5}
  assert "val/diffusion/auc_macro_ovr" not in scalars  # undefined AUC: no point
  assert not any(tag.startswith("train/") and "val" in tag for tag in scalars)  # rows with split
  (image,) = images["val/confusion_matrix"].values()
  assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
  assert image.min() < 100 and image.max() > 200  # a drawn matrix, not a blank picture


def test_flushed_rows_are_on_disk_before_the_log_closes(tmp_path):
  """A run killed after a flush (checkpoints follow one) keeps its events, as metrics.jsonl."""
  log = tensorboard.MetricsLog(str(tmp_path))
  log.write("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(3)))
  log.flush()
  scalars, _ = read_events(str(tmp_path / "tensorboard"))
  log.close()
  assert scalars["train/loss"] == {0: 0.0, 1: 1.0, 2: 2.0}


def test_a_resumed_log_hides_the_replayed_steps(tmp_path):
  with tensorboard.MetricsLog(str(tmp_path)) as log:
    log.write("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(6)))
    log.validation(4, "val", _RESULTS, ("benign", "malignant"))
  # Resumed from the checkpoint at step 4: the validation at step 4 is done, steps 4.. replay.
  with tensorboard.MetricsLog(str(tmp_path), purge_step=5) as log:
    log.write(json.dumps({"step": 4, "loss": 40.0}) + "\n")
  scalars, _ = read_events(str(tmp_path / "tensorboard"))
  assert scalars["train/loss"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}  # no step 5
  assert scalars["val/diffusion/accuracy"] == {4: 0.75}


def test_evaluation_images_are_the_pngs(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  path = str(tmp_path / "test_000_x.png")
  Image.fromarray(pixels).save(path)
  tensorboard.add_evaluation_images(str(tmp_path), 18, "test", [path])
  _, images = read_events(str(tmp_path / "tensorboard"))
  np.testing.assert_array_equal(images["eval_test/test_000_x"][18], pixels)


def test_other_processes_write_nothing(tmp_path):
  with tensorboard.MetricsLog(str(tmp_path), enabled=False) as log:
    log.write(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    log.validation(0, "val", _RESULTS, ("a", "b"))
    log.flush()
  assert os.listdir(tmp_path) == []
