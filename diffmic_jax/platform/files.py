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


def is_stale_temporary(name: str) -> bool:
  """Whether a file name is one of `atomic_open`'s temporaries (`<name>.tmp<pid>`) whose
  process no longer runs (left behind by a kill)."""
  stem, sep, pid = name.rpartition(".tmp")
  if not (sep and stem and pid.isdigit()):
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # another user's live process
    return False
  return False


def remove_stale_temporaries(folder: str) -> list[str]:
  """Removes the stale temporaries (`is_stale_temporary`) under `folder`; returns their paths."""
  removed = []
  for dirpath, _, names in os.walk(folder):
    for name in names:
      if is_stale_temporary(name):
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(dirpath, name))
          removed.append(os.path.join(dirpath, name))
  return removed


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
