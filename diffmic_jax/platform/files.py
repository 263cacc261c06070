"""Atomic file writes: the one helper behind every report, record and figure we write.

A temporary file beside the target is renamed onto it only when complete, so a reader, a crash
or a `kill -9` never leaves half a file where a whole one is expected.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
  """`open(path, mode)` that lands on `path` only if the block finishes.

  The file is written as `<path>.tmp<pid>` in the same folder (so the rename is atomic) and
  removed if the block raises; `path` keeps its old content until then.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, payload, indent: int = 2, default=None) -> None:
  """Writes `payload` as JSON to `path` atomically (`default`: as in `json.dump`)."""
  with atomic_open(path) as f:
    json.dump(payload, f, indent=indent, default=default)


def save_figure(fig, path, **kwargs) -> None:
  """`fig.savefig` as a PNG, atomically (a viewer never opens half a PNG); `path` may also be
  a binary file object (an in-memory buffer), written directly."""
  if hasattr(path, "write"):
    fig.savefig(path, format="png", **kwargs)
    return
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", **kwargs)
