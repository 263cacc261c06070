"""Process-level settings of the host platform, applied by the entry points before JAX starts.

A CPU cost on the 2-core dev VM is glibc's allocator: XLA frees and re-allocates every large
intermediate (and each call's one block of temporaries) per call through mmap/munmap, so every
call page-faults all its big buffers again. `tune_cpu_malloc` turns that off (it must run
before the first JAX computation); `main.py` and the benchmarks call it (paper-config DCG
warm-up step: 10.6 -> 8.0 s; see its docstring).
"""

import ctypes
import ctypes.util
import os
import platform
import resource


def hugetlb_requested(environ=None) -> bool:
  """Whether glibc was started with transparent huge pages for malloc
  (GLIBC_TUNABLES containing glibc.malloc.hugetlb=1 or 2; read by glibc at process start)."""
  tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
  for item in tunables.split(":"):
    name, _, value = item.partition("=")
    if name.strip() == "glibc.malloc.hugetlb" and value.strip() in ("1", "2"):
      return True
  return False


def tune_cpu_malloc():
  """Stops glibc from page-faulting big XLA buffers afresh on every call.

  XLA's CPU runtime allocates its intermediates from worker threads, and an
  executable's temporaries as one block (3.3 GB for the paper configuration's
  DCG warm-up step). By default glibc serves big requests with a fresh mmap
  and unmaps them on free, and trims the heap's free top, so every call pays
  one page fault per 4 KB of those buffers: 830,000 faults and 4 s of kernel
  time per warm-up step on the dev VM (10.6 s per step against 8.0 s without).

  Default (fastest): one arena, no mmap for large blocks (M_MMAP_MAX=0) and no
  trimming (M_TRIM_THRESHOLD=-1, which mallopt(3) documents as "disables
  trimming completely"), so freed blocks are reused. An mmap *threshold* alone
  cannot do it: mallopt takes an int, so no threshold reaches a 3.3 GB block.
  The price is memory: the heap keeps its high-water mark and fragments (paper
  joint step: 12.8 GB peak instead of 9.0 GB).

  Lower-memory mode, when the process was started with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see `hugetlb_requested`): blocks of
  1 GiB and more keep their own mmap, returned on free, but glibc maps them
  with transparent huge pages, so a 3.3 GB block costs about 1,600 faults
  instead of 830,000 (paper joint step: 9.0 GB peak, 12.7 s instead of 12.0 s
  per step; experiments/speed/README.md, "Speed on an AVX-512 CPU").

  Under gperftools' TCMalloc (LD_PRELOAD=libtcmalloc_minimal.so.4, see `malloc_in_use`) these
  glibc settings do nothing and TCMalloc's own page heap reuses freed blocks; on the Zen 5 dev
  VM that was faster still (training as main.py runs it, five rounds: warm-up 3.75-4.02 ->
  3.36-3.67 s, joint 6.49-7.04 -> 5.89-6.25 s per step; joint peak 10.0-10.1 -> 9.9 GB) but
  with more slow calls that grow the heap (4 of 17 rows, glibc 0 of 10 that day;
  experiments/speed/README.md, "AMD Zen 5"). What glibc loses there, `perf` showed: 9 % of the joint
  step's samples in `_int_malloc`, serving YNNPACK's per-call scratch buffers (100 KB-1.5 MB,
  about 20,000 per step) by walking large bins of a heap with some 220,000 free chunks; glibc
  2.36's per-thread cache stops at 1,032 bytes, so no setting here removes it.

  Must be called before JAX starts its backend (before the first array is
  created); later calls have no effect on arenas that already exist. The
  default's equivalent environment settings are MALLOC_ARENA_MAX=1,
  MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=-1.

  Returns:
    True if all three mallopt calls succeeded (glibc only), else False.
  """
  libc = _glibc()
  if libc is None:
    return False
  m_trim_threshold, m_mmap_threshold, m_mmap_max, m_arena_max = -1, -3, -4, -8
  ok = libc.mallopt(m_arena_max, 1)
  if hugetlb_requested():
    ok &= libc.mallopt(m_mmap_threshold, 1 << 30)
  else:
    ok &= libc.mallopt(m_mmap_max, 0)
  ok &= libc.mallopt(m_trim_threshold, -1)
  return bool(ok)


def _glibc():
  """glibc as a ctypes library, or None where there is none (macOS, musl)."""
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def malloc_in_use() -> str:
  """'tcmalloc' when gperftools' TCMalloc serves malloc (started with LD_PRELOAD, see
  `tune_cpu_malloc`), else 'glibc' (or 'unknown' where there is no glibc)."""
  if _tcmalloc() is not None:
    return "tcmalloc"
  return "glibc" if _glibc() is not None else "unknown"


def tcmalloc_hint():
  """A line for the log when glibc serves malloc and gperftools' TCMalloc is installed, else None.

  A package cannot swap its own process's allocator (LD_PRELOAD is read when the process
  starts), so `main.py` says so instead: training with TCMalloc was 10-15 % faster on the Zen 5
  dev VM, because glibc's malloc spent 9 % of the joint step's CPU time serving YNNPACK's
  scratch buffers (`tune_cpu_malloc`; experiments/speed/README.md, "AMD Zen 5").
  """
  if malloc_in_use() != "glibc":
    return None
  library = ctypes.util.find_library("tcmalloc_minimal")
  if not library:
    return None
  return (f"{library} is installed but not in use: with LD_PRELOAD={library} training ran "
          "10-15 % faster on an AMD Zen 5 CPU (docs/cpu_speed.md)")


def _tcmalloc():
  """TCMalloc's C extension interface when it is loaded into this process, else None."""
  try:
    process = ctypes.CDLL(None)
  except OSError:
    return None
  return process if hasattr(process, "MallocExtension_ReleaseFreeMemory") else None


def release_free_memory() -> bool:
  """Gives the heap's free pages back to the kernel (glibc `malloc_trim(0)`).

  With `tune_cpu_malloc`'s default nothing is ever trimmed, so memory freed once stays
  resident: XLA's compiler leaves about 1 GB of freed working memory behind when it compiles
  the paper joint step, and the first call's block of temporaries (5.0 GB) cannot reuse it
  because it is scattered. Calling this between compiling a step and running it keeps that
  gigabyte out of the peak (paper joint step alone on 2 Zen 5 cores: 10.57 -> 9.62 GB, same
  speed; experiments/speed/README.md). Not for every step: the pages of a freed block of
  temporaries would be faulted in again by the next call, the cost `tune_cpu_malloc` removes.

  Under TCMalloc (`malloc_in_use`) it asks TCMalloc to release its free pages instead.

  Returns:
    True if memory was released (always under TCMalloc), False where nothing was released or
    there is no glibc.
  """
  tcmalloc = _tcmalloc()
  if tcmalloc is not None:  # its own free lists; glibc's malloc_trim would see an empty heap
    tcmalloc.MallocExtension_ReleaseFreeMemory()
    return True
  libc = _glibc()
  return libc is not None and bool(libc.malloc_trim(0))


# Vector instruction sets that decide CPU matmul/convolution speed (x86 and Arm names as
# /proc/cpuinfo spells them).
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                     "amx_int8", "asimd", "sve", "sve2")


def cpu_description(cpuinfo: str | None = None) -> dict:
  """{'model': CPU model name, 'vendor': e.g. 'GenuineIntel' or 'AuthenticAMD' ('' where not
  known), 'vector_extensions': sorted list, 'cores': logical CPUs}.

  Args:
    cpuinfo: the text of /proc/cpuinfo; None reads it (Linux), else falls back to `platform`.
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  fields, flags = {}, set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key in ("flags", "Features") and not flags:
      flags = set(value.split())
    elif key and key not in fields:
      fields[key] = value.strip()
  model = fields.get("model name", "") or platform.processor() or platform.machine()
  if "cpu family" in fields:  # x86: the family and model tell generations of one brand apart
    model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
  return {"model": model, "vendor": fields.get("vendor_id", ""),
          "vector_extensions": sorted(flags & set(VECTOR_EXTENSIONS)),
          "cores": os.cpu_count()}


def reset_peak_rss() -> bool:
  """Resets this process's resident-memory high-water mark (Linux: /proc/self/clear_refs).

  Returns:
    False where that is not possible; `peak_rss_bytes` then reports the process-wide peak.
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """Peak resident memory since the last `reset_peak_rss` (VmHWM), or of the whole process."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.
