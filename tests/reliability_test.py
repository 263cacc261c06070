"""Reliability: resume from any interruption, the workdir's records, the lock, config changes,
bad inputs answered with one line, and diverged predictions that never crash a run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffmic_jax import checkpointing
from diffmic_jax import errors
from diffmic_jax import evaluate
from diffmic_jax import metrics
from diffmic_jax import train
from diffmic_jax import workdir as workdir_lib

from tests import conftest

# Every user error the CLI tests provoke; test_no_traceback_in_user_errors scans them all.
USER_ERROR_OUTPUTS = []


def _main(*args, timeout=300):
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  proc = subprocess.run([sys.executable, "-m", "diffmic_jax.main", *args], cwd=conftest.REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode == 1:
    USER_ERROR_OUTPUTS.append((args, proc.stdout + proc.stderr))
  return proc


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_one_row_per_step(workdir, last_step=18):
  rows = _rows(workdir)
  train_steps = [r["step"] for r in rows if "split" not in r]
  assert train_steps == list(range(last_step))
  val_steps = [r["step"] for r in rows if "split" in r]
  assert val_steps == [12, 18]


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
  """An uninterrupted run keeping every checkpoint (steps 4, 6, 8, 12, 16, 18)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config()
  config.training.keep_checkpoints = 10
  results = train.train_and_evaluate(config, workdir)
  return workdir, results


def _fresh_copy(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  return workdir


def test_stuck_resume_best_ahead_of_latest(reference, tiny_config, tmp_path):
  """The issue's reproduction: best checkpoints exist after the latest one (a kill between the
  two managers' saves); the rerun must neither stop nor change the final metrics."""
  workdir = _fresh_copy(reference, tmp_path)
  config = tiny_config()
  config.training.keep_checkpoints = 10
  assert checkpointing.Checkpointer(workdir, 10).all_steps() == [4, 6, 8, 12, 16, 18]
  for step in (12, 16, 18):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed == reference[1]
  _assert_one_row_per_step(workdir)
  # Killed after the latest save of a validation step, before its validation finished: the
  # rerun resumes at 12 and validates it again (the best checkpoint at 12 may already exist).
  for step in (16, 18):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  rows = [r for r in _rows(workdir) if not ("split" in r and r["step"] >= 12)]
  workdir_lib.write_text(os.path.join(workdir, "metrics.jsonl"),
                         "".join(json.dumps(r) + "\n" for r in rows))
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed == reference[1]
  _assert_one_row_per_step(workdir)
  ckpt = checkpointing.Checkpointer(workdir, 10)
  assert ckpt.all_steps("best") == checkpointing.Checkpointer(reference[0]).all_steps("best")
