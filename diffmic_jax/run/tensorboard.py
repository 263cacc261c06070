"""TensorBoard event files in DIR/tensorboard/, without TensorFlow: the only tensorboardX user.

`MetricsLog` is where a training run's metrics go. It is written like the text file
DIR/metrics.jsonl (one JSON object per line, unchanged), and sends the numbers of every training
row to TensorBoard as they are written: `train/<metric>` (loss, eps-MSE, MMDs, gradient norm, DCG
loss and accuracy) and `learning_rate/denoiser`. `validation` adds every scalar metric of every
head (`val/<head>/<metric>`) and the first head's confusion matrix as an image;
`add_evaluation_images` adds an evaluation's confusion matrix and explanation PNGs. Only
process 0 writes (the others get a log that discards everything). A resumed run opens its log
with `purge_step`, so TensorBoard hides the previous run's events of the replayed steps.

  tensorboard --logdir runs/demo/tensorboard
"""

import io
import json
import os
import time

import numpy as np
from PIL import Image
from tensorboardX import event_file_writer
from tensorboardX import summary
from tensorboardX.proto import event_pb2

from diffmic_jax.run import metrics
from diffmic_jax.run import workdir as workdir_lib

SUBDIR = "tensorboard"
# Training-row fields that are not metrics, and tags for fields not shown under train/.
_NOT_SCALARS = ("step",)
_TAGS = {"lr": "learning_rate/denoiser"}


def _scalar_items(row: dict):
  """(name, float) for the numeric fields of a metrics row (bools and strings skipped)."""
  for name, value in row.items():
    if (name not in _NOT_SCALARS and isinstance(value, (int, float))
        and not isinstance(value, bool)):
      yield name, float(value)


class EventFile:
  """A new event file in DIR/tensorboard/, written synchronously: once `flush` returns, every
  event is on disk, as metrics.jsonl's rows are (tensorboardX's SummaryWriter hands events to a
  thread that writes them to disk up to two minutes later, so a killed run would lose them).

  tensorboardX names files by the second and the host only, and would truncate a file opened in
  the same second; the nanosecond suffix keeps every file, and TensorBoard's (sorted) reading
  order the order in which they were opened.
  """

  def __init__(self, workdir: str, purge_step: int | None = None):
    """`purge_step`: TensorBoard hides the earlier files' events at steps >= it (a resume)."""
    logdir = os.path.join(workdir, SUBDIR)
    os.makedirs(logdir, exist_ok=True)
    self._events = event_file_writer.EventsWriter(os.path.join(logdir, "events"),
                                                  f".{time.time_ns():020d}")
    if purge_step is not None:
      self._write(event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START)))

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._events.write_event(event)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._write(event_pb2.Event(step=step, summary=summary.scalar(tag, value)))

  def add_image(self, tag: str, pixels: np.ndarray, step: int) -> None:
    """`pixels`: uint8 [H, W, 3]."""
    self._write(event_pb2.Event(step=step, summary=summary.image(tag, pixels,
                                                                 dataformats="HWC")))

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()

  def __enter__(self) -> "EventFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def confusion_image(confusion, class_names, title: str) -> np.ndarray:
  """uint8 [H, W, 3] picture of a confusion matrix (the evaluation report's PNG)."""
  buffer = io.BytesIO()
  metrics.save_confusion_png(confusion, class_names, buffer, title)
  return png_array(buffer.getvalue())


def png_array(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3] pixels of PNG bytes."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class MetricsLog:
  """DIR/metrics.jsonl (file-like: write, flush) plus TensorBoard events in DIR/tensorboard/."""

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    """Opens DIR/metrics.jsonl for appending and a new TensorBoard event file.

    Args:
      workdir: the run's folder.
      enabled: False in processes other than 0: nothing is written.
      purge_step: on resume, the first step whose earlier events TensorBoard should hide (they
        are written again); None for a fresh run.
    """
    self._enabled = enabled
    path = os.path.join(workdir, workdir_lib.METRICS_FILE) if enabled else os.devnull
    self._file = open(path, "a")  # pylint: disable=consider-using-with
    self._writer = EventFile(workdir, purge_step) if enabled else None

  def write(self, text: str) -> None:
    """Appends JSON lines to metrics.jsonl; training rows (those without 'split') also become
    TensorBoard scalars at their 'step'."""
    self._file.write(text)
    if not self._enabled:
      return
    for line in text.splitlines():
      row = json.loads(line) if line.strip() else {}
      if "step" in row and not workdir_lib.is_validation_row(row):
        for name, value in _scalar_items(row):
          self._writer.add_scalar(_TAGS.get(name, f"train/{name}"), value, row["step"])

  def validation(self, step: int, split: str, results: dict, class_names) -> None:
    """Every scalar metric of every head, and the first head's confusion matrix as an image.

    Args:
      step: the global training step.
      split: 'val' (or 'test' with training.select_best_on='test').
      results: {head: `metrics.classification_metrics`} as `evaluate.score` returns them.
      class_names: C names, for the confusion-matrix axes.
    """
    if not self._enabled:
      return
    for head, head_metrics in results.items():
      for name, value in _scalar_items(head_metrics):
        self._writer.add_scalar(f"{split}/{head}/{name}", value, step)
    head, main = next(iter(results.items()))
    image = confusion_image(main["confusion_matrix"], class_names,
                            f"{split} step {step}: {head} (accuracy {main['accuracy']:.3f})")
    self._writer.add_image(f"{split}/confusion_matrix", image, step)

  def flush(self) -> None:
    self._file.flush()
    if self._enabled:
      self._writer.flush()

  def close(self) -> None:
    self._file.close()
    if self._enabled:
      self._writer.close()

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def add_evaluation_images(workdir: str, step: int, split: str, paths) -> None:
  """Adds PNGs an evaluation wrote (confusion matrix, explanations) as `eval_<split>/<name>`."""
  with EventFile(workdir) as writer:
    for path in paths:
      name = os.path.splitext(os.path.basename(path))[0]
      with open(path, "rb") as f:
        writer.add_image(f"eval_{split}/{name}", png_array(f.read()), step)
