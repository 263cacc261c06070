"""Reads the official DiffMIC split pickles (REFERENCE.md §8) without executing code.

The pickles are lists of `{'img_root': <path str>, 'label': <int>}`. A restricted unpickler
refuses every global (classes, functions), so only lists, dicts, tuples, strings, numbers,
booleans and None can be loaded; anything else raises an error naming the file.
"""

import io
import os
import pickle
from typing import Any

from diffmic_jax.platform import errors


class UnsafePickleError(pickle.UnpicklingError, errors.UserError):
  """The pickle references a class or function (it could run code when loaded)."""


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves no globals: plain containers and scalars only."""

  def find_class(self, module: str, name: str) -> Any:
    raise UnsafePickleError(
        f"refusing to load {module}.{name}: only lists, dicts, strings and numbers are allowed")


def _check_plain(value: Any, path: str) -> None:
  """Raises if `value` holds anything but lists/tuples/dicts of strings and numbers."""
  if isinstance(value, (list, tuple)):
    for item in value:
      _check_plain(item, path)
  elif isinstance(value, dict):
    for key, item in value.items():
      _check_plain(key, path)
      _check_plain(item, path)
  elif not isinstance(value, (str, int, float, bool, type(None))):
    raise UnsafePickleError(f"{path}: unexpected {type(value).__name__} in the pickle")


def load_plain_pickle(path: str) -> Any:
  """Loads a pickle that may only contain plain Python data.

  Raises:
    FileNotFoundError: the file does not exist.
    UnsafePickleError: the pickle refers to a class or function.
    ValueError: the file is not a readable pickle.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    value = _RestrictedUnpickler(io.BytesIO(data)).load()
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{path}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
          AttributeError) as e:
    raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
  _check_plain(value, path)
  return value


def read_split_pickle(path: str, root: str = "") -> list[tuple[str, int]]:
  """Reads one official split pickle.

  Args:
    path: the `.pkl` file: a list of {'img_root': str, 'label': int}.
    root: folder that relative `img_root` paths are resolved against (official: the repo
      root); '' keeps them as they are.

  Returns:
    [(image path, label)] in file order.

  Raises:
    ValueError: the content is not a list of such dicts (the message names the file).
  """
  entries = load_plain_pickle(path)
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a list of {{'img_root', 'label'}} dicts, "
                     f"got {type(entries).__name__}")
  records = []
  for i, entry in enumerate(entries):
    if not (isinstance(entry, dict) and "img_root" in entry and "label" in entry):
      raise ValueError(f"{path}: entry {i} is {entry!r}; expected a dict with keys "
                       "'img_root' and 'label'")
    label = entry["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
      raise ValueError(f"{path}: entry {i} has label {label!r}; expected an int >= 0")
    image_path = str(entry["img_root"])
    if root and not os.path.isabs(image_path):
      image_path = os.path.normpath(os.path.join(root, image_path))
    records.append((image_path, label))
  return records
