"""experiments/speed/benchmark.py's comparison with the official code's JSON, and the host probes
it reports (CPU kind, per-row peak memory)."""

import ctypes.util
import gc
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.platform import errors
from diffmic_jax.platform import host
from diffmic_jax.platform import sharding
from diffmic_jax.run import train_state
from tests import conftest

sys.path.insert(0, os.path.join(conftest.REPO, "experiments", "speed"))
with warnings.catch_warnings():  # ml_collections loads the default --config with load_module()
  warnings.simplefilter("ignore", DeprecationWarning)
  import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

_OFFICIAL = {
    "cpu": {"model": "Some CPU"},
    "inference": [{"sampler": "official_truncated", "steps": 100, "batch": 32,
                   "images_per_s": 0.5, "peak_memory_bytes": 4e9},
                  {"sampler": "official_truncated", "steps": 100, "batch": 1,
                   "images_per_s": 0.2}],
    "training": [{"stage": "joint", "batch": 32, "images_per_s": 2.0,
                  "peak_memory_bytes": 10e9}],
}


def _ours():
  return {"inference": [
      {"sampler": "official_truncated", "steps": 100, "batch": 32, "images_per_s": 7.5,
       "peak_memory_bytes": 3e9},
      {"sampler": "official_truncated", "steps": 60, "batch": 32, "images_per_s": 9.0,
       "peak_memory_bytes": 3e9}],
      "training": [{"stage": "joint", "batch": 32, "images_per_s": 3.0,
                    "peak_memory_bytes": 8e9},
                   {"stage": "warmup", "batch": 32, "images_per_s": 5.0,
                    "peak_memory_bytes": 6e9}]}


def test_speedups_are_computed_for_matching_rows_only(tmp_path):
  path = tmp_path / "official.json"
  path.write_text(json.dumps(_OFFICIAL))
  result = _ours()
  benchmark.add_comparison(result, benchmark.load_official(str(path)))
  inference, training = result["inference"], result["training"]
  assert inference[0]["speedup"] == pytest.approx(15.0)
  assert inference[0]["memory_ratio"] == pytest.approx(0.75)
  assert "speedup" not in inference[1]  # the official JSON has no 60-step row
  assert training[0]["speedup"] == pytest.approx(1.5)
  assert training[0]["memory_ratio"] == pytest.approx(0.8)
  assert "speedup" not in training[1]
  table = benchmark.format_table({"matmul_peak_gflops": 100.0, **_with_times(result)})
  assert "| 15.00× | 0.75 |" in table and "| 1.50× | 0.80 |" in table


def _with_times(result):
  for row in result["inference"]:
    row.update(compile_s=1.0, seconds_per_batch=row["batch"] / row["images_per_s"])
  for row in result["training"]:
    row.update(compile_s=1.0, seconds_per_step=row["batch"] / row["images_per_s"])
  return result


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "not valid JSON"),
    (json.dumps({"inference": [{"sampler": "official_truncated", "batch": 32,
                                "images_per_s": 1.0}]}), "KeyError: 'steps'"),
    (json.dumps({"training": [{"stage": "joint", "batch": 32, "images_per_s": 0}]}),
     "images_per_s=0"),
    (json.dumps({"device": "cpu"}), "no 'inference' or 'training' rows"),
])
def test_a_bad_official_json_is_refused_naming_the_file(tmp_path, content, message):
  path = tmp_path / "official.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(errors.UserError, match=message) as raised:
    benchmark.load_official(str(path))
  assert str(path) in str(raised.value)


def test_the_cli_refuses_a_bad_official_json_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "experiments/speed/benchmark.py", "--compare-official",
                         str(tmp_path / "missing.json")], cwd=conftest.REPO,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: --compare-official {tmp_path / 'missing.json'}: cannot read it "
      "(No such file or directory)"]


def test_cpu_description_reads_model_and_vector_extensions():
  cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
             "model name\t: Intel(R) Xeon(R) Platinum 8481C\n"
             "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_tile\n\n"
             "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n")
  cpu = host.cpu_description(cpuinfo)
  assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8481C (family 6, model 143)"
  assert cpu["vector_extensions"] == ["amx_tile", "avx", "avx2", "avx512_bf16", "avx512bw",
                                      "avx512f", "fma", "sse4_2"]
  assert cpu["vendor"] == "GenuineIntel"      # fast_conv's 'auto' rules differ by vendor
  assert host.cpu_description("")["vector_extensions"] == []
  assert host.cpu_description("")["vendor"] == ""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_peak_memory_is_reset_per_row():
  host.reset_peak_rss()
  before = host.peak_rss_bytes()
  block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
  grown = host.peak_rss_bytes()
  del block
  host.release_free_memory()  # an allocator that keeps freed blocks (TCMalloc) gives it back
  assert grown - before > 48 * 2**20
  assert host.reset_peak_rss()
  assert host.peak_rss_bytes() < grown - 48 * 2**20


# A fresh process (mallopt only affects arenas made later) with the process's malloc and free:
# glibc's, or a preloaded allocator's (LD_PRELOAD puts it first in the global scope).
_PROBE_PRELUDE = """
import ctypes, os, resource
from diffmic_jax.platform import host
assert host.tune_cpu_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""
_REUSE_PROBE = _PROBE_PRELUDE + """
size = 5 << 29  # 2.5 GiB: above any mmap threshold an int can set (a paper step's temp block is 3.3 GB)
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
print(*faults, resident)
"""
_BLOCK = 5 << 29


def _run_probe(script, **env):
  """Runs a probe with glibc's malloc unless `env` says otherwise: a GLIBC_TUNABLES or a
  preloaded allocator (README's TCMalloc) of the calling shell is dropped."""
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True, cwd=conftest.REPO, env={**environ, **env}).stdout
  return (int(v) for v in out.split())


def _reuse_probe(**env):
  return _run_probe(_REUSE_PROBE, **env)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_tune_cpu_malloc_reuses_a_freed_multi_gigabyte_block():
  """XLA allocates a call's temporaries as one block of gigabytes; page-faulting it afresh on
  every call cost 4 s of a 10.6 s paper warm-up step. In a fresh process (mallopt only affects
  arenas made later): the second allocation of a 2.5 GiB block must touch pages already mapped."""
  first, second, resident = _reuse_probe()
  assert first >= _BLOCK // (2 << 20)  # the first touch maps the pages (4 KiB or 2 MiB)...
  assert second < first // 100  # ...and the second reuses them
  assert resident > _BLOCK * 3 // 4  # kept by the process after free


_RELEASE_PROBE = _PROBE_PRELUDE + """
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size = 1 << 29  # 512 MiB, freed in the middle of the heap: a later block keeps it off the top
block = libc.malloc(size)
ctypes.memset(block, 1, size)
later = libc.malloc(1 << 20)
ctypes.memset(later, 1, 1 << 20)
libc.free(block)
kept = resident()
released = host.release_free_memory()
print(kept, resident(), int(released), int(host.malloc_in_use() == "tcmalloc"))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_release_free_memory_returns_a_freed_block_from_the_middle_of_the_heap():
  """Under tune_cpu_malloc nothing is trimmed, so memory freed once (the compiler's working
  memory) stays resident until release_free_memory gives it back, also when it is not at the
  heap's top; train.run_stage calls it between compiling a step and running it."""
  kept, after, released, tcmalloc = _run_probe(_RELEASE_PROBE)
  assert kept - after > (1 << 29) * 3 // 4
  assert released == 1
  assert tcmalloc == 0


_TCMALLOC = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


@pytest.mark.skipif(sys.platform != "linux" or not _TCMALLOC,
                    reason="needs gperftools' TCMalloc (Debian: libtcmalloc-minimal4)")
def test_release_free_memory_returns_tcmalloc_free_memory():
  """Started with LD_PRELOAD=libtcmalloc_minimal.so.4 (docs/cpu_speed.md) malloc is
  TCMalloc's, which glibc's malloc_trim cannot see: release_free_memory must ask TCMalloc to give
  a freed block back, and malloc_in_use must say which allocator the benchmark ran with."""
  kept, after, released, tcmalloc = _run_probe(_RELEASE_PROBE, LD_PRELOAD=_TCMALLOC)
  assert tcmalloc == 1
  assert kept - after > (1 << 29) * 3 // 4
  assert released == 1


_HINT_PROBE = "from diffmic_jax import host; print(int(host.tcmalloc_hint() is not None))"


@pytest.mark.skipif(sys.platform != "linux" or not _TCMALLOC,
                    reason="needs gperftools' TCMalloc (Debian: libtcmalloc-minimal4)")
def test_tcmalloc_hint_is_logged_under_glibc_and_not_once_tcmalloc_runs():
  """main.py logs the hint when TCMalloc is installed but glibc serves malloc; started with the
  preload the README gives, there is nothing to say."""
  assert list(_run_probe(_HINT_PROBE)) == [1]
  assert list(_run_probe(_HINT_PROBE, LD_PRELOAD=_TCMALLOC)) == [0]


def test_tcmalloc_hint_names_the_installed_library(monkeypatch):
  monkeypatch.setattr(host, "malloc_in_use", lambda: "glibc")
  monkeypatch.setattr(ctypes.util, "find_library",
                      lambda name: "libtcmalloc_minimal.so.4" if name == "tcmalloc_minimal" else None)
  assert "LD_PRELOAD=libtcmalloc_minimal.so.4 " in host.tcmalloc_hint()
  monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
  assert host.tcmalloc_hint() is None  # not installed: nothing to suggest


def _thp_never() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" in f.read()
  except OSError:
    return True


@pytest.mark.skipif(sys.platform != "linux" or _thp_never(),
                    reason="needs glibc and transparent huge pages (madvise or always)")
def test_tune_cpu_malloc_lower_memory_mode_returns_blocks_in_huge_pages():
  """Started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, a freed multi-gigabyte block goes back
  to the kernel (peak memory stays low) and is faulted in 2 MiB pages (cheap to map again)."""
  first, second, resident = _reuse_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  assert resident < _BLOCK // 4
  assert first < _BLOCK // 4096 // 10 and second < _BLOCK // 4096 // 10


def test_hugetlb_requested_reads_glibc_tunables():
  assert host.hugetlb_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert host.hugetlb_requested({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"})
  assert not host.hugetlb_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert not host.hugetlb_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"})
  assert not host.hugetlb_requested({})


def test_a_training_row_frees_its_train_state_before_the_next_row(tiny_config, monkeypatch):
  """Each row's peak memory must be its own: the paper joint step measured 12.2 GB after the
  warm-up row against 9.6 GB alone while the warm-up row's train state (2.5 GB) was still held."""
  config = tiny_config()
  models = models_lib.create_models(config)
  live_bytes, state_bytes = [], []
  create = train_state.create_train_state

  def recording_create(*args, **kwargs):
    gc.collect()
    live_bytes.append(sum(a.nbytes for a in jax.live_arrays()))
    state = create(*args, **kwargs)
    state_bytes.append(sum(a.nbytes for a in jax.tree.leaves(state)))
    return state

  monkeypatch.setattr(benchmark.train_state, "create_train_state", recording_create)
  rows = benchmark.benchmark_training(models, config, sharding.make_mesh(), ["warmup", "joint"],
                                      [2], repeats=1, want_flops=False)
  assert [(r["stage"], r["batch"]) for r in rows] == [("warmup", 2), ("joint", 2)]
  assert live_bytes[1] - live_bytes[0] < state_bytes[0] // 2


def test_the_joint_step_at_the_training_batch_is_lowered_once_for_its_flops(tiny_config,
                                                                             monkeypatch):
  """The joint iteration at training.batch_size is counted for the inference rows' FLOP parts;
  the training row reuses that count instead of lowering the step again."""
  config = tiny_config()
  counted = []
  count = benchmark.summary.training_flops_per_image

  def recording_count(config_, stage, batch):
    counted.append((stage, batch))
    return count(config_, stage, batch)

  monkeypatch.setattr(benchmark.summary, "training_flops_per_image", recording_count)
  batch = config.training.batch_size
  seen = []  # on_row: after every row, the result so far (a stopped run keeps these rows)
  result = benchmark.run(config, batches=[2], train_batches=[batch], only=None,
                         sampler_entries=["official_truncated:2"], stages=["joint", "warmup"],
                         repeats=1, matmul_size=64, matmul_repeats=1,
                         on_row=lambda partial: seen.append(
                             [r.get("sampler") or r["stage"] for r in
                              partial["inference"] + partial["training"]]))
  assert seen == [["official_truncated"], ["official_truncated", "joint"],
                  ["official_truncated", "joint", "warmup"]]
  assert counted == [("joint", batch), ("warmup", batch)]
  joint = next(r for r in result["training"] if r["stage"] == "joint")
  assert joint["gflop_per_image"] * 1e9 == result["flops_per_image"]["training_joint_iteration"]
  assert all(r["gflop_per_image"] > 0 for r in result["training"])
