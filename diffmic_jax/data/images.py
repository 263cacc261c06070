"""Image reading, mode conversion and the deterministic preprocessing (REFERENCE.md §6.1).

Steps 1 and 2 of the official transform (centre square crop, bilinear resize) are deterministic,
so they run once at build time: `preprocess_file` returns the final `[S, S, 3]` uint8 image as PNG
bytes, plus a hash of the decoded full-resolution pixels used for duplicate detection.
"""

import hashlib
import io
import os
from typing import Union

import numpy as np
from PIL import Image

# Modes that Pillow converts to RGB exactly (palette, grey, alpha dropped as `.convert('RGB')`
# does in the official loader, CMYK and YCbCr colour conversion).
_CONVERTIBLE_MODES = ("RGB", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                      "1")
# 16-bit integer modes: scaled from the full 16-bit range to 8 bits (value * 255 / 65535).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


class BadImageError(ValueError):
  """An input image that cannot be used; the message names the file and the problem."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem


def _sixteen_bit_to_rgb(image: Image.Image, path: str) -> Image.Image:
  """`I;16`/`I` image -> 8-bit RGB, scaling [0, 65535] to [0, 255]."""
  array = np.asarray(image).astype(np.int64)
  if array.size and (array.min() < 0 or array.max() > 65535):
    raise BadImageError(path, f"mode {image.mode} with values outside [0, 65535] "
                        f"(min {array.min()}, max {array.max()}); expected 8- or 16-bit data")
  array8 = np.round(array * (255.0 / 65535.0)).astype(np.uint8)
  return Image.fromarray(array8, mode="L").convert("RGB")


def to_rgb(image: Image.Image, path: str = "<image>") -> Image.Image:
  """Converts any supported Pillow mode to RGB.

  Args:
    image: a loaded Pillow image.
    path: file name used in error messages.

  Returns:
    An RGB image of the same size.

  Raises:
    BadImageError: for modes with no faithful 8-bit RGB conversion (e.g. float 'F').
  """
  if image.mode == "RGB":
    return image
  if image.mode in _SIXTEEN_BIT_MODES:
    return _sixteen_bit_to_rgb(image, path)
  if image.mode in _CONVERTIBLE_MODES:
    if image.mode in ("P", "PA"):
      image = image.convert("RGBA")
    return image.convert("RGB")
  raise BadImageError(path, f"unsupported image mode {image.mode!r}; expected one of "
                      f"{sorted(_CONVERTIBLE_MODES + _SIXTEEN_BIT_MODES)}")


def open_rgb(source: Union[str, os.PathLike, bytes], name: str | None = None) -> Image.Image:
  """Opens, fully decodes and converts an image file (or encoded bytes) to RGB.

  Args:
    source: a path, or the encoded file content.
    name: the name used in error messages (defaults to the path).

  Returns:
    The decoded RGB Pillow image.

  Raises:
    BadImageError: missing, unreadable, corrupt or truncated file, or an unsupported mode.
  """
  name = str(source) if name is None else name
  if isinstance(source, bytes):
    stream = io.BytesIO(source)
  else:
    if not os.path.isfile(source):
      raise BadImageError(name, "file not found")
    stream = source
  try:
    with Image.open(stream) as image:
      image.load()
      if image.size[0] < 1 or image.size[1] < 1:
        raise BadImageError(name, f"empty image of size {image.size}")
      return to_rgb(image, name)
  except BadImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise BadImageError(name, f"not a readable image file ({e})") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(name, f"corrupt or truncated image ({type(e).__name__}: {e})") from e


def centre_square_crop(image: Image.Image) -> Image.Image:
  """Official `CropCenterSquare`: side min(w, h), origin round((w - s) / 2) (banker's rounding)."""
  width, height = image.size
  side = min(width, height)
  left = round((width - side) / 2)
  top = round((height - side) / 2)
  return image.crop((left, top, left + side, top + side))


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
  """Centre square crop then PIL bilinear (antialiased) resize, as torchvision `Resize`.

  Args:
    image: an RGB Pillow image of any size.
    image_size: the output side S.

  Returns:
    uint8 array [S, S, 3].
  """
  square = centre_square_crop(image)
  if square.size != (image_size, image_size):
    square = square.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(square, dtype=np.uint8)


def content_hash(image: Image.Image) -> str:
  """sha1 of the decoded RGB pixels and size (identical content <=> identical hash)."""
  digest = hashlib.sha1(f"{image.size}".encode())
  digest.update(image.tobytes())
  return digest.hexdigest()


THUMBNAIL_SIZE = 16


def thumbnail(image: Image.Image) -> np.ndarray:
  """uint8 [16, 16] grey thumbnail of the whole image, for near-duplicate detection."""
  grey = image.convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BILINEAR)
  return np.asarray(grey, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def preprocess_file(source: Union[str, os.PathLike, bytes, np.ndarray], image_size: int,
                    name: str | None = None) -> tuple[bytes, str, np.ndarray]:
  """Reads one image and returns (PNG bytes of the [S, S, 3] preprocessed image, content hash
  of the full decoded image, its uint8 [16, 16] grey thumbnail).

  Args:
    source: path, encoded bytes, or a uint8 array [H, W] / [H, W, C] (MedMNIST).
    image_size: the output side S.
    name: the name used in error messages.

  Raises:
    BadImageError: see `open_rgb`.
  """
  if isinstance(source, np.ndarray):
    image = array_to_rgb(source, name or "<array>")
  else:
    image = open_rgb(source, name)
  return encode_png(preprocess(image, image_size)), content_hash(image), thumbnail(image)


def array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array -> RGB Pillow image."""
  if array.dtype != np.uint8:
    raise BadImageError(name, f"array dtype {array.dtype}; expected uint8")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    return Image.fromarray(array, mode="L").convert("RGB")
  if array.ndim == 3 and array.shape[-1] in (3, 4):
    return Image.fromarray(array[..., :3], mode="RGB")
  raise BadImageError(name, f"array shape {array.shape}; expected [H, W], [H, W, 1|3|4]")
