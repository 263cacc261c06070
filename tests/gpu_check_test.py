"""experiments/speed/gpu_check.py: its dry run (the GPU check's stages on the CPU at tiny
sizes), the stage budget that stops a stage and keeps its finished rows, and its refusals."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import conftest

sys.path.insert(0, os.path.join(conftest.REPO, "experiments", "speed"))
import gpu_check  # pylint: disable=g-import-not-at-top,wrong-import-position

_SCRIPT = os.path.join(conftest.REPO, "experiments", "speed", "gpu_check.py")


def _table_rows(text: str) -> list[tuple[str, str, int]]:
  """(dtype, what, batch) of every row of the report's table."""
  rows = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] in ("float32", "bfloat16"):
      rows.append((cells[0], cells[1], int(cells[2])))
  return rows


def test_the_dry_run_runs_every_stage_and_prints_one_table(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ,  # the tests' compilation cache: a second run compiles nothing
             JAX_COMPILATION_CACHE_DIR=os.environ["DIFFMIC_COMPILATION_CACHE"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  # A budget far above the stages' own: a busy machine slows every stage, and the budgets'
  # arithmetic has its own test below.
  proc = subprocess.run([sys.executable, _SCRIPT, "--dry-run", "--out", str(out),
                         "--budget-s", "3000"], cwd=conftest.REPO, env=env, capture_output=True,
                        text=True, timeout=3300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(_table_rows(proc.stdout)) == sorted(
      (dtype, what, 2) for dtype in ("float32", "bfloat16")
      for what in ("official_truncated 5 steps", "warmup step", "joint step"))
  # Within what the device tool brings back from $OUT: 8 files at most, none in a sub-folder.
  assert sorted(os.listdir(out)) == sorted(
      ["gpu_check.md", "gpu_check.json", "gpu_check.log"]
      + [f"{k}_{d}.json" for k in ("inference", "training") for d in ("float32", "bfloat16")])
  stages = json.loads((out / "gpu_check.json").read_text())["stages"]
  assert list(stages) == ["environment", "inference_float32", "training_float32",
                          "inference_bfloat16", "training_bfloat16", "tests"]
  assert all(s["status"] == "ok" for s in stages.values())
  collected = re.match(r"(\d+)/(\d+) tests collected", stages["tests"]["last_line"])
  assert collected and 0 < int(collected[1]) < int(collected[2])  # the `device` tests only
  for name in ("inference_float32", "training_bfloat16"):
    assert json.loads((out / f"{name}.json").read_text())["complete"] is True
  assert (out / "gpu_check.md").read_text().strip() in proc.stdout


_PARTIAL = {"device": "1x gpu:Some GPU", "config": {"dtype": "bfloat16"}, "complete": False,
            "matmul_peak_gflops": 5e5, "training": [
                {"stage": "warmup", "batch": 64, "compile_s": 20.0, "seconds_per_step": 0.5,
                 "images_per_s": 128.0, "peak_memory_bytes": 3e9, "xla_memory_bytes": 2e9}]}


def test_a_stage_past_its_budget_is_stopped_and_its_finished_rows_are_kept(tmp_path):
  """The stage writes one row, then would run for a minute: it is stopped at its 2 s and the
  table still shows its row, marked partial."""
  path = tmp_path / "training_bfloat16.json"
  child = (f"import json, os, time; json.dump({_PARTIAL!r}, open({str(path)!r}, 'w')); "
           "print('row written by', os.getpid(), flush=True); time.sleep(60)")
  with open(tmp_path / "log", "w") as log:
    stage = gpu_check.run_stage([sys.executable, "-c", child], dict(os.environ), 2, log)
  assert stage["status"] == "timed out after 2 s" and stage["seconds"] < 30
  assert stage["last_line"].startswith("row written by ")
  with pytest.raises(ProcessLookupError):  # stopped, not left running
    os.kill(int(stage["last_line"].split()[-1]), 0)
  text = gpu_check.report({}, {"training_bfloat16": stage},
                          {"training_bfloat16": gpu_check.read_result(str(path))}, False)
  assert "- training_bfloat16: timed out after 2 s in 2 s, 1 rows (partial)" in text
  assert "| bfloat16 | warmup step | 64 | 20.0 | 0.5 | 128 | 7.81 |  | 3.00 | 2.00 |" in text


def test_the_environment_must_have_a_gpu_and_every_module_unless_dry_run():
  cpu = {"missing": [], "backend": "cpu", "versions": {"jax": "0.11.2"}, "cuda_plugins": [],
         "status": "ok", "last_line": ""}
  gpu_check.check_environment(cpu, dry_run=True)
  gpu_check.check_environment({**cpu, "backend": "gpu"}, dry_run=False)
  with pytest.raises(gpu_check.UserError, match=r"JAX sees no GPU \(backend 'cpu', jax 0.11.2, "
                     r"CUDA plugins: none"):
    gpu_check.check_environment(cpu, dry_run=False)
  with pytest.raises(gpu_check.UserError, match="missing Python modules there: grain, "
                     "ml_collections .*--prepare-wheels"):
    gpu_check.check_environment({**cpu, "missing": ["grain", "ml_collections"]}, dry_run=True)


def test_a_used_output_folder_is_refused_in_one_line_and_left_alone(tmp_path):
  (tmp_path / "keep.json").write_text("{}")
  proc = subprocess.run([sys.executable, _SCRIPT, "--dry-run", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: --out {tmp_path}: not empty; give an empty or new folder (nothing is "
      "overwritten)"]
  assert os.listdir(tmp_path) == ["keep.json"]


def test_every_device_test_module_exists():
  for name in conftest.DEVICE_MODULES:
    assert os.path.exists(os.path.join(conftest.REPO, "tests", f"{name}.py")), name
