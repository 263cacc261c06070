"""Multi-process runs on this CPU (jax.distributed with gloo collectives, started by
diffmic_jax.launch): the same results as one process with the same number of devices, resume
after every process is killed, a rerun of a finished run, a locked workdir refused by every
process, and a failing process stopping the whole run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffmic_jax import launch
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.platform import distributed
from diffmic_jax.run import checkpointing
from diffmic_jax.run import train_state
from diffmic_jax.run import workdir as workdir_lib

from tests import conftest
from tests import tensorboard_test

# The tiny config with two explanation PNGs (computed by process 0 alone).
_FLAGS = ["--config", os.path.join(conftest.REPO, "configs", "test.py"),
          "--config.training.eval_overlays=2"]
_LAST_STEP = 18  # (1 warm-up + 2 joint epochs) x 6 steps


def _env(**extra):
  """This environment without forced devices, importing this checkout first, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = os.pathsep.join(p for p in (conftest.REPO, env.get("PYTHONPATH")) if p)
  return {**env, "PYTHONPATH": path, **extra}


def _launch(workdir, **kwargs):
  command = [sys.executable, "-m", "diffmic_jax.launch", "--num_processes", "2", "--",
             *_FLAGS, "--workdir", str(workdir)]
  return subprocess.Popen(command, env=_env(), cwd=conftest.REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def _metric_rows(workdir):
  """{step: last training row of that step}, {step: last validation row} of metrics.jsonl."""
  train_rows, val_rows = {}, {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    (val_rows if "split" in row else train_rows)[row["step"]] = row
  return train_rows, val_rows


def _final_state(workdir):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  abstract = train_state.abstract_train_state(models_lib.create_models(config), config)
  checkpointer = checkpointing.Checkpointer(str(workdir))
  try:
    state, _ = checkpointer.restore("latest", _LAST_STEP, abstract)
  finally:
    checkpointer.close()
  return jax.device_get(state)


# The denoiser's encoder projection feeds a BatchNorm, so the gradient of its bias is zero up to
# round-off, which Adam scales to steps of about the learning rate: that bias (its EMA copy too)
# and the running mean that absorbs it follow the round-off of the device layout, not the data.
_ROUNDOFF_ONLY = ("['encoder_proj']['dense']['bias']", ".denoiser['batch_stats']['norm']['mean']")


def _assert_states_close(ref, got):
  """Every leaf of two train states agrees, but those driven by round-off alone."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
    name = jax.tree_util.keystr(path)
    if not name.endswith(_ROUNDOFF_ONLY):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def one_process_two_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_process")
  # Also traces two steps, to check the training loop's profiler hook.
  done = subprocess.run([sys.executable, "-m", "diffmic_jax.main", *_FLAGS, "--workdir",
                         str(workdir), "--config.training.profile_steps=7,8"],
                        cwd=conftest.REPO, capture_output=True, text=True,
                        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_two_processes_killed_and_resumed_match_one_process_with_two_devices(
    one_process_two_devices, tmp_path):
  # Preempt the run (SIGTERM to the launcher, as a scheduler does) once the step-8 checkpoint
  # exists, in the middle of the first joint epoch: both processes save the step they agree
  # on and stop with 128 + SIGTERM.
  proc = _launch(tmp_path, start_new_session=True)
  checkpoint = tmp_path / "checkpoints" / "8"
  deadline = time.monotonic() + 600
  while not checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert "launcher received SIGTERM" in output and "Traceback" not in output, output[-3000:]
  stopped_at = checkpointing.Checkpointer(str(tmp_path)).all_steps()
  assert 8 in stopped_at and _LAST_STEP not in stopped_at, stopped_at  # stopped mid-training
  # One line, from process 0, naming the step saved last.
  assert output.count("preempted: stopped by SIGTERM") == 1, output[-3000:]
  assert f"after step {max(stopped_at)}: checkpoint saved" in output, (stopped_at, output[-3000:])
  workdir_lib.lock(str(tmp_path)).close()  # released

  proc = _launch(tmp_path)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-3000:]
  assert "Resuming from checkpoint at step" in output
  assert output.count("Resuming from checkpoint") == 1  # printed by process 0 only

  # Losses of every step, validation results, final parameters and test predictions agree.
  ref_train, ref_val = _metric_rows(one_process_two_devices)
  got_train, got_val = _metric_rows(tmp_path)
  assert sorted(got_train) == sorted(ref_train) == list(range(_LAST_STEP))
  for step, row in ref_train.items():
    np.testing.assert_allclose([got_train[step][k] for k in row], list(row.values()),
                               rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
  assert got_val == ref_val
  scalars, images = tensorboard_test.read_events(str(tmp_path / "tensorboard"))
  assert sorted(scalars["train/loss"]) == list(range(6, _LAST_STEP))  # joint steps
  assert sorted(scalars["val/diffusion/accuracy"]) == sorted(ref_val)
  assert "eval_test/test_confusion" in images
  assert len(glob.glob(str(tmp_path / "eval" / "overlays" / "*.png"))) == 2
  assert glob.glob(str(one_process_two_devices / "profile" / "**" / "*.xplane.pb"),
                   recursive=True)
  ref_state, got_state = _final_state(one_process_two_devices), _final_state(tmp_path)
  _assert_states_close(ref_state, got_state)
  ref_csv = open(os.path.join(one_process_two_devices, "eval", "test_predictions.csv")).read()
  got_csv = open(tmp_path / "eval" / "test_predictions.csv").read()
  assert got_csv.splitlines()[0] == ref_csv.splitlines()[0]
  assert len(got_csv.splitlines()) == len(ref_csv.splitlines()) > 1
  for ref_row, got_row in zip(ref_csv.splitlines()[1:], got_csv.splitlines()[1:]):
    ref_cells, got_cells = ref_row.split(","), got_row.split(",")
    assert got_cells[:4] == ref_cells[:4]  # id, label, prediction, DCG prediction
    np.testing.assert_allclose(np.float64(got_cells[4:]), np.float64(ref_cells[4:]), atol=2e-6)

  # Rerunning the finished run: every process agrees that the last validation is done (process
  # 0 decides from metrics.jsonl), nothing is trained or validated again, no row is rewritten.
  rows = open(tmp_path / "metrics.jsonl").read()
  proc = _launch(tmp_path)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-3000:]
  assert f"Resuming from checkpoint at step {_LAST_STEP} (training finished" in output
  assert "epoch" not in output.split("Resuming from checkpoint")[1]  # no validation line
  assert open(tmp_path / "metrics.jsonl").read() == rows
  assert open(tmp_path / "eval" / "test_predictions.csv").read() == got_csv


def test_a_locked_workdir_is_refused_by_every_process(tmp_path):
  lock = workdir_lib.lock(str(tmp_path))  # a training run of this pid holds the workdir
  try:
    proc = _launch(tmp_path)
    output, _ = proc.communicate(timeout=300)
  finally:
    lock.close()
  assert proc.returncode == 1, output[-3000:]
  # Process 0 took no lock, and tells process 1, which refuses with the same line.
  assert output.count(f"error: {tmp_path / '.lock'} is held by pid {os.getpid()}") == 2, output
  assert "Traceback" not in output
  assert sorted(os.listdir(tmp_path)) == [".lock"]  # no record written


def test_a_failing_process_stops_the_run():
  start = time.monotonic()
  done = subprocess.run([sys.executable, "-m", "diffmic_jax.launch", "--num_processes", "2",
                         "--module", "tests.multiprocess_worker"], cwd=conftest.REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "process 1 fails on purpose" in done.stderr
  assert "error: process 1 (pid" in done.stderr and "exited with status 1" in done.stderr
  # Process 1 exited at once, and process 0, blocked in a collective, was stopped (SIGKILL after
  # the launcher's 5 s grace). Without either, process 0 waits for gloo's 30 s timeout.
  assert time.monotonic() - start < 28


def test_checkpoint_barriers_never_go_through_the_devices(tmp_path):
  # Issue 32: two-process runs aborted in a gloo collective mismatch at a checkpoint save once
  # the compilation cache was warm (process 0 loads each program, the others compile it). Orbax's
  # default barrier is a compiled all-reduce between the training step's collectives; the
  # coordination service's barrier sends nothing through the devices.
  done = subprocess.run([sys.executable, "-m", "diffmic_jax.launch", "--num_processes", "2",
                         "--module", "tests.checkpoint_barrier_worker", "--", str(tmp_path)],
                        cwd=conftest.REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  reports = [line for line in done.stdout.splitlines() if "device barriers:" in line]
  assert sorted(line.split(" device")[0] for line in reports) == ["process 0", "process 1"]
  for line in reports:
    assert json.loads(line.split("device barriers: ")[1]) == [], line
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def test_process_env_gives_each_process_its_index_and_gpus():
  env = launch.process_env({"PATH": "/bin"}, 2, 4, "127.0.0.1:1234", gpus_per_process=2)
  assert env == {"PATH": "/bin", distributed.COORDINATOR_ENV: "127.0.0.1:1234",
                 distributed.NUM_PROCESSES_ENV: "4", distributed.PROCESS_ID_ENV: "2",
                 "CUDA_VISIBLE_DEVICES": "4,5"}
  assert "CUDA_VISIBLE_DEVICES" not in launch.process_env({}, 0, 2, "h:1", gpus_per_process=0)


def test_partial_environment_is_refused(monkeypatch):
  monkeypatch.setenv(distributed.COORDINATOR_ENV, "127.0.0.1:1234")
  monkeypatch.delenv(distributed.NUM_PROCESSES_ENV, raising=False)
  monkeypatch.delenv(distributed.PROCESS_ID_ENV, raising=False)
  with pytest.raises(ValueError, match=distributed.NUM_PROCESSES_ENV):
    distributed.initialize(True)
  distributed.initialize(False)  # off: nothing is read
