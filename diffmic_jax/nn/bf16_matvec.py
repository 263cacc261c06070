"""x @ W with bfloat16 weights W and float32 activations: the sampler's batch-1 products.

At one image a sampler step multiplies one row by each of the denoiser's two F × F matrices,
so the step costs what reading their weights from memory costs (302 MB per step in float32
at F = 6144). Weights rounded to bfloat16 are half the bytes, but XLA's CPU code converts them
more slowly than memory delivers them (experiments/speed/matvec_formats.py); on CPU this
module's product is an XLA FFI handler (bf16_matvec.cc) that streams them at memory speed,
from Flax's kernel layout [K, N], so preparing the weights is one conversion, no transpose.
Elsewhere (`jax.lax.platform_dependent`'s default) it is XLA's float32 dot with the weights
widened: both compute in float32 on the bfloat16 values, equal up to float32 round-off.

The handler is compiled on the first CPU product of a process, by the machine's C++ compiler
(`$CXX`, else `c++`) for the CPU it runs on, against the FFI headers jaxlib ships, into
`$DIFFMIC_KERNEL_CACHE` (default `~/.cache/diffmic_jax/kernels`), one file per source,
compiler, flags (`$CXXFLAGS` is appended), jaxlib and CPU, so later processes load it in
milliseconds.

    y = bf16_matvec.matvec(x, w)   # x [..., K] float32, w [K, N] bfloat16 -> [..., N] float32
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib

from diffmic_jax.platform import errors
from diffmic_jax.platform import host

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bf16_matvec.cc")
_TARGET = "diffmic_bf16_matvec"
_SYMBOL = "DiffmicBf16Matvec"
_lock = threading.Lock()
_library = None  # the loaded handler library, once registered


def cache_dir() -> str:
  return os.environ.get("DIFFMIC_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "diffmic_jax", "kernels")


def _compiler() -> str:
  name = os.environ.get("CXX") or "c++"
  path = shutil.which(name)
  if path is None:
    raise errors.UserError(
        f"diffusion.sampler_weights='bfloat16' on CPU compiles {SOURCE} on first use and "
        f"needs a C++ compiler: {name!r} (from $CXX, else 'c++') was not found; install one "
        "(e.g. g++) or set $CXX, or use diffusion.sampler_weights='float32'")
  return path


def compile_library(extra_flags: tuple = (), directory: str | None = None) -> str:
  """Compiles `SOURCE` (if not compiled already) and returns the shared library's path.

  Args:
    extra_flags: more compiler flags, after `$CXXFLAGS`.
    directory: where the library is kept (`cache_dir()`).
  """
  compiler = _compiler()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", *shlex.split(os.environ.get("CXXFLAGS", "")),
           *extra_flags]
  with open(SOURCE, "rb") as f:
    source = f.read()
  cpu = host.cpu_description()  # what -march=native compiles for
  digest = hashlib.sha256(b"\0".join(
      [source, version.encode(), " ".join(flags).encode(), jaxlib.__version__.encode(),
       f"{cpu['model']} {cpu['vector_extensions']}".encode()])).hexdigest()[:16]
  directory = directory or cache_dir()
  path = os.path.join(directory, f"bf16_matvec_{digest}.so")
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  # Compiled beside its final name and renamed, so a concurrent process never loads half a file.
  fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=directory)
  os.close(fd)
  try:
    done = subprocess.run([compiler, *flags, SOURCE, "-o", partial], capture_output=True,
                          text=True)
    if done.returncode != 0:
      lines = done.stderr.strip().splitlines() or ["no message"]
      first_error = next((l for l in lines if "error" in l.lower()), lines[-1])
      raise errors.UserError(
          f"diffusion.sampler_weights='bfloat16': compiling {SOURCE} with {compiler} "
          f"{' '.join(flags)} failed: {first_error.strip()}; fix the compiler or $CXXFLAGS, or "
          "use diffusion.sampler_weights='float32'")
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def ensure_registered() -> ctypes.CDLL:
  """Compiles and loads the CPU handler once per process and registers it with XLA."""
  global _library
  with _lock:
    if _library is None:
      library = ctypes.CDLL(compile_library())
      jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)),
                                  platform="cpu")
      _library = library
  return _library


def _check(x, w):
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"bf16_matvec: expected x [..., K] and w [K, N], got {x.shape}, {w.shape}")
  if x.dtype != jnp.float32 or w.dtype != jnp.bfloat16:
    raise ValueError(f"bf16_matvec: expected x float32 and w bfloat16, got {x.dtype}, {w.dtype}")


def reference(x, w):
  """XLA's float32 product of x [..., K] with the widened weights w [K, N]: [..., N]."""
  _check(x, w)
  return x @ w.astype(jnp.float32)


def _cpu(x, w):
  try:
    ensure_registered()
  except errors.UserError:
    # `platform_dependent` traces this branch on every backend; a GPU run lowers `reference`
    # and needs neither the compiler nor the handler.
    if jax.default_backend() == "cpu":
      raise
  # vmap adds a unit leading axis to w (never a copy per batch element): the handler reads
  # W [1, ..., K, N] as [K, N] and every leading axis of x as rows.
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[1:], jnp.float32),
                          vmap_method="expand_dims")(x, w)


def matvec(x, w):
  """x [..., K] float32 @ w [K, N] bfloat16 -> [..., N] float32 (see the module's text)."""
  _check(x, w)
  return jax.lax.platform_dependent(x, w, cpu=_cpu, default=reference)
