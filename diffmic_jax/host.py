"""Process-level settings of the host platform, applied by the entry points before JAX starts.

A CPU cost on the 2-core dev VM is glibc's allocator: XLA frees and re-allocates every large
(>32 MB) intermediate per call through mmap/munmap, so every call page-faults all its big
buffers again. `tune_cpu_malloc` turns that off (it must run before the first JAX
computation). It made a 64 MB elementwise op 3x faster but did not speed up a whole ResNet-18
train step in our (noisy) measurements, so only `main.py` and the benchmark call it
(paper-config inference: 3.52 -> 3.78 img/s).
"""

import ctypes


def tune_cpu_malloc():
  """Stops glibc from returning big XLA buffers to the kernel after each step.

  XLA's CPU runtime allocates its intermediates from worker threads. glibc
  serves requests above 32 MB (and anything that does not fit a 64 MB thread
  arena) with a fresh mmap and unmaps it on free, so each training step pays
  one page fault per 4 KB of every large activation; on the dev VM that made a
  64 MB elementwise op 3x slower (28 ms vs 9 ms). Forcing one arena with an
  effectively unlimited mmap/trim threshold lets freed blocks be reused.

  Must be called before JAX starts its backend (before the first array is
  created); later calls have no effect on arenas that already exist. The
  equivalent environment settings are MALLOC_ARENA_MAX=1,
  MALLOC_MMAP_THRESHOLD_=1073741824, MALLOC_TRIM_THRESHOLD_=2147483647.
  Peak RSS is unchanged, but freed memory is kept by the process.

  Returns:
    True if all three mallopt calls succeeded (glibc only), else False.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
  ok = libc.mallopt(m_arena_max, 1)
  ok &= libc.mallopt(m_mmap_threshold, 1 << 30)
  ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
  return bool(ok)
