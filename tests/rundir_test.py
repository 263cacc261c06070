"""The run directory is the unit: eval and predict from --workdir alone (from any directory),
refusal of a config that changes the model, configs loadable from anywhere, and
`diffmic_jax.load_run` reproducing `--mode eval`."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffmic_jax
from diffmic_jax.data import demo
from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import predict
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import workdir as workdir_lib
from diffmic_jax.training import train

from tests import conftest

IMAGE_SIZE = 48  # trained with this override; configs/test.py says 32


@pytest.fixture(scope="module")
def run48(tiny_config, tmp_path_factory):
  """A tiny run trained with overrides (image size, samples per prediction) and the
  test-split predictions of its own final test."""
  workdir = str(tmp_path_factory.mktemp("run48"))
  config = tiny_config()
  config.data.image_size = IMAGE_SIZE
  config.diffusion.predict_num_samples = 3
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "test_predictions.csv"), newline="") as f:
    final_test = list(csv.DictReader(f))
  return workdir, final_test


def _main(*args, cwd, pythonpath=conftest.REPO):
  env = {**os.environ, "PYTHONPATH": pythonpath}
  return subprocess.run([sys.executable, "-m", "diffmic_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _snapshot(workdir):
  """{relative path: bytes} of every file of a workdir."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = f.read()
  return found


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_eval_and_predict_from_the_workdir_alone_in_another_directory(run48, tmp_path):
  workdir, final_test = run48
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  config_before = open(os.path.join(workdir, "config.json"), "rb").read()
  proc = _main("--workdir", workdir, "--mode", "eval", cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The run's own config: the test split at 48 px and 3 samples, exactly its final test.
  assert _read(os.path.join(workdir, "eval", "test_predictions.csv")) == final_test
  used = json.load(open(os.path.join(workdir, "eval_config.json")))
  assert used["data"]["image_size"] == IMAGE_SIZE
  # Predict into the run's own workdir: its config.json stays the training record.
  images, _ = demo.make_demo(80, IMAGE_SIZE, 0)
  split = json.load(open(os.path.join(workdir, "split.json")))
  inputs = elsewhere / "in"
  inputs.mkdir()
  for n, example_id in enumerate(split["test"][:5]):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(images[int(example_id.split("_")[1])]).save(inputs / f"{n}.png")
  proc = _main("--workdir", workdir, "--mode", "predict", "--input", "in", "--output", workdir,
               cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert open(os.path.join(workdir, "config.json"), "rb").read() == config_before
  rows = _read(os.path.join(workdir, "predictions.csv"))
  names = split["class_names"]
  assert len(rows) == 5
  for row, theirs in zip(rows, final_test):
    assert row["prediction"] == names[int(theirs["prediction"])]  # the same first batch
    votes = {n: float(row[f"vote_{n}"]) for n in names}
    # The shown class is the vote's winner and the shown share is its own.
    assert votes[row["prediction"]] == max(votes.values())
    assert float(row["vote_share"]) == votes[row["prediction"]]


def test_a_config_that_changes_the_model_is_refused_listing_the_fields(run48, tmp_path):
  workdir, _ = run48
  before = _snapshot(workdir)
  plain = _main("--config", os.path.join(conftest.REPO, "configs", "test.py"), "--workdir",
                workdir, "--mode", "eval", cwd=tmp_path)
  override = _main("--workdir", workdir, "--mode", "predict", "--input", str(tmp_path),
                   "--config.model.feature_dim=16", cwd=tmp_path)
  for proc, field in ((plain, "data.image_size (48 -> 32)"),
                      (override, "model.feature_dim (32 -> 16)")):
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and field in errors[0] and "Traceback" not in proc.stderr
  assert "diffusion.predict_num_samples" not in plain.stderr  # may differ: not listed
  assert _snapshot(workdir) == before


def test_a_run_trained_by_several_processes_evaluates_from_its_workdir_alone(run48, tmp_path):
  """First-hour round: a run trained with `diffmic_jax.launch` records training.distributed=True,
  and `--mode eval --workdir W` then waited for a coordinator ('error: coordinator_address
  should be defined'). How a run was launched is no part of the model: one process evaluates."""
  workdir, final_test = run48
  launched = str(tmp_path / "launched")
  shutil.copytree(workdir, launched)
  config_path = os.path.join(launched, "config.json")
  saved = json.load(open(config_path))
  saved["training"]["distributed"] = True  # as the launcher's --config.training.distributed=True
  with open(config_path, "w") as f:
    json.dump(saved, f)
  proc = _main("--workdir", launched, "--mode", "eval", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _read(os.path.join(launched, "eval", "test_predictions.csv")) == final_test
  assert json.load(open(config_path))["training"]["distributed"] is True  # the record is kept
  # Said on the command line (the launcher, SLURM), it is honoured: here no job to join.
  proc = _main("--workdir", launched, "--mode", "eval", "--config.training.distributed=True",
               cwd=tmp_path)
  assert proc.returncode == 1 and "coordinator" in proc.stderr, proc.stderr[-3000:]


def test_eval_config_check_lets_sampling_fields_differ(run48, tiny_config):
  workdir, _ = run48
  config = workdir_lib.read_config(os.path.join(workdir, "config.json"))
  config.training.eval_batch_size = 4
  config.diffusion.sampler, config.diffusion.predict_num_samples = "respaced", 7
  config.diffusion.sampler_weights = "bfloat16"
  config.seed = 3
  workdir_lib.check_eval_config(config, workdir)  # accepted
  config.data.image_size = 32
  config.diffusion.timesteps = 20
  with pytest.raises(ValueError, match=r"data\.image_size \(48 -> 32\), diffusion\.timesteps"):
    workdir_lib.check_eval_config(config, workdir)


def test_read_config_restores_json_values_and_tuples(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"a": false, "b": null, "c": [1, [2, 3]], "d": {"e": 1.5}}')
  config = workdir_lib.read_config(str(path))
  assert config.a is False and config.b is None and config.d.e == 1.5
  assert config.c == (1, (2, 3))
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="config.json: expected a JSON object"):
    workdir_lib.read_config(str(path))


def test_load_run_reproduces_eval_mode(run48):
  workdir, final_test = run48
  config, models, variables = diffmic_jax.load_run(workdir)
  assert config.data.image_size == IMAGE_SIZE
  d = config.diffusion
  sample_fn = sampler.make_sample_fn(models, d.sampler, d.test_steps, d.predict_num_samples)
  split = json.load(open(os.path.join(workdir, "split.json")))
  images, _ = demo.make_demo(80, IMAGE_SIZE, 0)
  test_images = images[[int(i.split("_")[1]) for i in split["test"]]]
  batch = config.training.eval_batch_size
  key = run_lib.eval_key(config)
  for i, start in enumerate(range(0, len(test_images), batch)):
    chunk = test_images[start:start + batch]
    padded = np.zeros((batch,) + chunk.shape[1:], np.float32)
    padded[:len(chunk)] = input_pipeline.normalise(chunk)
    out = jax.device_get(sample_fn(variables, padded, jax.random.fold_in(key, i)))
    for j, row in enumerate(final_test[start:start + len(chunk)]):
      assert int(out["prediction"][j]) == int(row["prediction"])
      assert float(row["vote_share"]) == pytest.approx(out["agreement"][j], abs=1e-6)
      probs = [float(row[f"p_{n}"]) for n in split["class_names"]]
      np.testing.assert_allclose(out["probs"][j], probs, atol=2e-6)


def test_configs_load_from_any_directory(tmp_path):
  # As an installed package: diffmic_jax importable, the repository root not on the path (a
  # bare `import configs` fails), run from another directory.
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(conftest.REPO, "diffmic_jax"), site / "diffmic_jax")
  copy = tmp_path / "mine.py"
  shutil.copy(os.path.join(conftest.REPO, "configs", "test.py"), copy)
  for config in (os.path.join(conftest.REPO, "configs", "test.py"), str(copy)):
    # The config loads (its `from configs import default` resolves); the command then stops at
    # the first check after loading, the missing workdir.
    proc = _main("--config", config, "--mode", "eval", "--workdir", "nowhere", cwd=tmp_path,
                 pythonpath=str(site))
    assert proc.returncode == 1 and "error: --workdir nowhere: no such directory" in proc.stderr, \
        proc.stderr[-3000:]
  for args, expected in (
      (["--config", "missing.py", "--mode", "summary"], "--config missing.py: no such file"),
      (["--mode", "summary"], "--config is required for --mode summary"),
      (["--mode", "eval", "--workdir", str(tmp_path)], "config.json: no such file")):
    proc = _main(*args, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ")
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

