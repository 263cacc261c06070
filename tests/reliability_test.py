"""Reliability: resume from any interruption, the workdir's records, the lock, config changes,
bad inputs answered with one line, and diverged predictions that never crash a run."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffmic_jax.evaluation import evaluate
from diffmic_jax.platform import errors
from diffmic_jax.run import checkpointing
from diffmic_jax.run import metrics
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import workdir as workdir_lib
from diffmic_jax.training import train

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


def _snapshot(workdir, names=("config.json", "split.json", "metrics.jsonl")):
  return {name: open(os.path.join(workdir, name), "rb").read() for name in names}


def test_refused_resume_leaves_the_records_untouched(reference, tiny_config, tmp_path):
  workdir = _fresh_copy(reference, tmp_path)
  before = _snapshot(workdir)
  config = tiny_config()
  config.training.keep_checkpoints = 10
  config.optim.lr = 5e-4
  config.ablation = "c2"
  config.training.log_every_steps = 3  # safe: listed as accepted, not refused
  with pytest.raises(errors.UserError) as refused:
    train.train_and_evaluate(config, workdir)
  message = str(refused.value)
  assert "ablation ('full' -> 'c2')" in message and "optim.lr (0.001 -> 0.0005)" in message
  assert "safe changes: training.log_every_steps (2 -> 3)" in message
  assert "allow_config_change" in message and "\n" not in message
  assert _snapshot(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "config_changes.jsonl"))
  # Safe changes only: accepted and listed; an override is accepted and recorded.
  config = tiny_config()
  config.training.keep_checkpoints = 10
  config.training.eval_every_epochs = 2
  assert workdir_lib.check_resume_config(config, workdir)["accepted"] == [
      "training.eval_every_epochs (1 -> 2)"]
  config.seed = 7
  config.training.allow_config_change = True
  changes = workdir_lib.check_resume_config(config, workdir)
  assert changes["overridden"] == ["seed (0 -> 7)"]
  workdir_lib.write_records(config, workdir, changes)
  recorded = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
  assert recorded[0]["overridden"] == ["seed (0 -> 7)"]
  assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 7


def test_eval_with_a_foreign_split_file_never_writes_split_json(reference, tiny_config,
                                                               tmp_path):
  workdir = _fresh_copy(reference, tmp_path)
  before = _snapshot(workdir)
  saved = json.load(open(os.path.join(workdir, "split.json")))
  foreign = {"train": saved["train"] + saved["val"][:4], "val": saved["val"][4:],
             "test": saved["test"]}
  path = tmp_path / "foreign.json"
  path.write_text(json.dumps(foreign))
  config = tiny_config()
  config.data.split_file = str(path)
  evaluate.evaluate_checkpoint(config, workdir, split="val", checkpoint="best")
  assert _snapshot(workdir) == before
  report = json.load(open(os.path.join(workdir, "eval", "val_metrics.json")))
  assert report["heads"]["diffusion"]["num_examples"] == len(foreign["val"])


def test_workdir_lock_is_exclusive_and_a_dead_holder_is_taken_over(tmp_path):
  held = workdir_lib.lock(str(tmp_path))
  try:
    with pytest.raises(errors.UserError, match=f"lock is held by pid {os.getpid()}"):
      workdir_lib.lock(str(tmp_path))
    proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert f"{tmp_path}/.lock is held by pid {os.getpid()}" in proc.stderr
  finally:
    held.close()
  # A lock file left by a killed process: flock died with it, so the next run takes over.
  (tmp_path / ".lock").write_text("999999\n")
  again = workdir_lib.lock(str(tmp_path))
  assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
  again.close()
  # A workdir that cannot be written (here: a file in its place) is one line naming it.
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.UserError, match=r"--workdir .*/file: cannot create .*/file/\.lock"):
    workdir_lib.lock(str(tmp_path / "file"))


def test_truncate_metrics_keeps_one_row_per_step(tmp_path):
  rows = [{"step": s, "loss": 1.0} for s in range(6)] + [{"step": 6, "split": "val"}]
  rows += [{"step": s, "loss": 2.0} for s in range(4, 8)] + ["not json"]
  (tmp_path / "metrics.jsonl").write_text(
      "".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
  assert workdir_lib.truncate_metrics(str(tmp_path), 6) == {6}
  kept = _rows(str(tmp_path))
  assert [(r["step"], "split" in r) for r in kept] == [(s, False) for s in range(6)] + [
      (6, True)]
  assert all(r.get("loss", 1.0) == 1.0 for r in kept)  # the first row of each step


@pytest.mark.parametrize("override,expected", [
    ("--config.training.batch_sise=3", "batch_sise"),
    ("--config.optim.lr=0", "config.optim.lr=0"),
    ("--config.data.val_fraction=0", "config.data.val_fraction=0"),
    ("--config.data.test_fraction=1.0", "config.data.test_fraction=1.0"),
    ("--config.diffusion.mmd_kernel=laplace", "config.diffusion.mmd_kernel='laplace'"),
    # A deprecated name still works: its value moves onto the new field, then is checked.
    ("--config.diffusion.test_timesteps=0", "config.diffusion.test_steps must be >= 1, got 0"),
])
def test_bad_config_values_are_refused_up_front(tmp_path, override, expected):
  # data.name=image_folder with a missing folder: the config check must come before the build.
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path / "run"), override,
               "--config.data.name=image_folder",
               f"--config.data.manual_dir={tmp_path / 'absent'}", timeout=120)
  assert proc.returncode == 1
  assert expected in proc.stderr
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("stray", [
    ["[--output", "runs/demo/predict]"],  # a usage line copied with its [optional] brackets
    ["latest"],                           # `--checkpoint` forgotten before its value
    ["--overlays", "False"],              # a boolean given a value: absl sets it, keeps 'False'
])
def test_stray_command_line_words_are_refused_before_anything_runs(tmp_path, stray):
  """First-hour round: absl keeps words that are no flag as positional arguments, which main
  ignored, so a mistyped command ran with other settings than the ones typed."""
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path / "run"), *stray,
               "--config.data.name=image_folder", f"--config.data.manual_dir={tmp_path / 'no'}",
               timeout=120)
  assert proc.returncode == 1
  words = [w for w in stray if not w.startswith("--")]
  assert f"error: unexpected argument(s) {' '.join(words)}" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_a_misspelled_field_is_one_line_with_the_suggestion(tmp_path):
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path / "run"),
               "--config.training.num_epoch=3", timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1] == (
      "error: unknown config field in ['--config.training.num_epoch']: 'num_epoch'; did you "
      "mean \"num_epochs\" instead of \"num_epoch\"?"), proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("asked", ["--help", "--helpfull", "-h"])
def test_help_lists_the_flags_without_a_config(asked):
  """First-hour round: `python -m diffmic_jax.main --help` answered 'error: --config is
  required for --mode train' instead of the help."""
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  proc = subprocess.run([sys.executable, "-m", "diffmic_jax.main", asked], cwd=conftest.REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert "error:" not in proc.stderr, proc.stderr[-2000:]
  for flag in ("--workdir", "--mode", "--checkpoint", "--input", "--overlays"):
    assert flag in proc.stdout, flag


def _image(path, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def _folder(root, counts):
  for c, count in counts.items():
    for i in range(count):
      _image(os.path.join(root, c, f"{i}.png"), hash((c, i)) % 1000)
  return root


def test_class_too_small_for_the_split_and_broken_link_are_one_line(tmp_path):
  root = _folder(str(tmp_path / "images"), {"a": 10, "b": 10, "c": 1})
  args = ["--config", "configs/test.py", "--config.data.name=image_folder",
          f"--config.data.manual_dir={root}", "--config.data.num_classes=3",
          f"--config.data.data_dir={tmp_path / 'tfds'}"]
  proc = _main(*args, "--workdir", str(tmp_path / "run1"), timeout=120)
  assert proc.returncode == 1
  assert "class 'c' has 1 example(s), too few for the split" in proc.stderr
  os.remove(os.path.join(root, "c", "0.png"))
  os.rmdir(os.path.join(root, "c"))
  os.symlink(os.path.join(root, "missing.png"), os.path.join(root, "a", "broken.png"))
  proc = _main(*args, "--config.data.num_classes=2", "--workdir", str(tmp_path / "run2"),
               timeout=120)
  assert proc.returncode == 1
  assert f"{root}/a/broken.png: broken link or not a regular file" in proc.stderr


def test_stable_probs_of_exploded_and_non_finite_chains():
  y0 = np.array([[[8e17, -8e17, 0.0]],            # exploded but finite: softmax is one-hot
                 [[np.inf, 0.0, 0.0]],             # non-finite: no prediction
                 [[np.log(2.0), 0.0, np.nan]],     # non-finite
                 [[np.log(2.0), 0.0, 0.0]]])       # ordinary: (2, 1, 1) / 4
  probs, diverged, non_finite = evaluate.stable_probs(y0)
  np.testing.assert_array_equal(probs[0], [1.0, 0.0, 0.0])
  assert np.isnan(probs[1]).all() and np.isnan(probs[2]).all()
  np.testing.assert_allclose(probs[3], [0.5, 0.25, 0.25], rtol=1e-15)
  assert diverged.tolist() == [1, 1, 1, 0] and non_finite.tolist() == [0, 1, 1, 0]
  # Two chains, one diverged: the example keeps the finite chain's probabilities.
  probs, diverged, _ = evaluate.stable_probs(np.array([[[0.0, np.log(3.0)], [np.nan, 0.0]]]))
  np.testing.assert_allclose(probs[0], [0.25, 0.75], rtol=1e-15)
  assert diverged.tolist() == [1]


def test_non_finite_predictions_count_as_wrong():
  labels = np.array([0, 1, 2, 0])
  probs = np.array([[0.8, 0.1, 0.1], [np.nan] * 3, [0.1, 0.1, 0.8], [np.inf, 0.0, 0.0]])
  m = metrics.classification_metrics(probs, labels, 3)
  assert m["accuracy"] == 0.5 and m["num_nonfinite"] == 2
  # Hand-computed: rows 1 and 3 are predicted as another class than their label.
  assert np.trace(np.asarray(m["confusion_matrix"])) == 2
  assert np.asarray(m["confusion_matrix"]).sum() == 4
  lines = evaluate.divergence_lines({"dcg_fused": m}, "val")
  assert lines == ["dcg_fused head on val: 2 of 4 examples without a finite prediction "
                   "(counted as wrong)"]


def test_diverged_validation_never_stops_training(reference, tiny_config, tmp_path,
                                                  monkeypatch):
  workdir = _fresh_copy(reference, tmp_path)
  for step in (16, 18):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  make = evaluate._sample_fn

  def exploding(models, sampler_name, num_steps, num_samples):
    fn = make(models, sampler_name, num_steps, num_samples)

    def sample(variables, images, key):
      out = dict(fn(variables, images, key))
      y0 = np.array(out["y0"])
      y0[::2] = np.inf  # every other example's chain diverges
      y0[1::4] *= 1e17  # and some explode while staying finite
      return {**out, "y0": y0}
    return sample

  monkeypatch.setattr(evaluate, "_sample_fn", exploding)
  config = tiny_config()
  config.training.keep_checkpoints = 10
  results = train.train_and_evaluate(config, workdir)
  assert results["diffusion"]["num_nonfinite"] == (results["diffusion"]["num_examples"] + 1) // 2
  assert results["diffusion"]["num_diverged"] > results["diffusion"]["num_nonfinite"]
  val_rows = [r for r in _rows(workdir) if "split" in r]
  assert val_rows[-1]["step"] == 18 and val_rows[-1]["val_diffusion_diverged"] > 0
  report = json.load(open(os.path.join(workdir, "eval", "test_metrics.json")))
  assert report["heads"]["diffusion"]["num_diverged"] == results["diffusion"]["num_diverged"]


def test_resume_names_the_stage_it_resumes_in(reference, tiny_config):
  run = run_lib.prepare(tiny_config(), reference[0])
  plan = train.stage_plan(run.models, run.config, run.steps_per_epoch)
  assert [train._stage_at(plan, s, run) for s in (0, 5, 6, 17, 18)] == [
      "warmup", "warmup", "joint", "joint", "done"]
  run.checkpointer.close()


def test_refused_pickle_is_one_line(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  evil = tmp_path / "train.pkl"
  evil.write_bytes(pickle.dumps([{"img_root": os.path.join, "label": 0}]))
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path / "run"),
               "--config.data.name=official_pickle", f"--config.data.train_pickle={evil}",
               f"--config.data.test_pickle={evil}", f"--config.data.data_dir={tmp_path}",
               timeout=120)
  assert proc.returncode == 1
  assert f"{evil}: refusing to load posixpath.join" in proc.stderr


def test_damaged_official_checkpoint_is_one_line(tmp_path):
  torch = pytest.importorskip("torch")
  good = tmp_path / "ckpt.pth"
  torch.save([{"encoder_x.f.0.weight": torch.zeros(2)}, {}, 0, 0], good)  # parses as a ckpt.pth
  truncated = tmp_path / "aux_ckpt.pth"
  truncated.write_bytes(good.read_bytes()[:100])
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  for ckpt, aux, name in ((truncated, good, truncated), (good, tmp_path / "x.pth", None)):
    if name is None:
      (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
      name = tmp_path / "x.pth"
    args = ["official", "--config", "configs/test.py", f"--ckpt={ckpt}", f"--aux-ckpt={aux}",
            f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "diffmic_jax.convert", *args],
                          cwd=conftest.REPO, env=env, capture_output=True, text=True, timeout=120)
    USER_ERROR_OUTPUTS.append((args, proc.stdout + proc.stderr))
    assert proc.returncode == 1
    assert f"error: {name}: " in proc.stderr and "PyTorch checkpoint" in proc.stderr


def _bad_weight_file(kind, folder):
  """Writes a file that is not a checkpoint of the expected kind into `folder`; returns its path
  (a path that does not exist for 'missing')."""
  if kind in ("tensor", "torch_list", "lightning"):
    torch = pytest.importorskip("torch")
    obj = {"tensor": torch.zeros(3, 4), "torch_list": [1, 2, 3],
           # PyTorch Lightning's layout, its state_dict of another model (keys 'model.*').
           "lightning": {"state_dict": {"model.w": torch.zeros(2)}, "epoch": 3,
                         "global_step": 100, "optimizer_states": [],
                         "pytorch-lightning_version": "2.0.0"}}[kind]
    path = folder / ("model.ckpt" if kind == "lightning" else f"{kind}.pth")
    torch.save(obj, path)
  elif kind == "pickled_list":
    import pickle  # pylint: disable=g-import-not-at-top
    path = folder / "list.pth"
    path.write_bytes(pickle.dumps([1, 2, 3]))
  elif kind == "npz":
    path = folder / "weights.npz"
    np.savez(path, x=np.ones((3, 4)), y=np.arange(5))
  elif kind == "missing":
    path = folder / "missing.pth"
  else:  # random bytes
    path = folder / "random.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  return path


@pytest.mark.parametrize("command", ["official", "torchvision"])
@pytest.mark.parametrize("kind, official, torchvision", [
    ("tensor", "got Tensor", "got Tensor"),
    ("torch_list", "got list", "got list"),
    ("pickled_list", "(a Python pickle); expected a file written by torch.save",
     "(a Python pickle); expected a file written by torch.save"),
    ("lightning", "the state_dict holds no tensor of the official ConditionalModel",
     "no 'conv1.weight'; expected a torchvision ResNet state_dict"),
    ("npz", "a zip archive without the data.pkl of a PyTorch checkpoint", "no 'conv1.weight'"),
    ("missing", "no such file; expected an official", "no such file; expected a torchvision"),
    ("random_bytes", "not a PyTorch checkpoint", "not a PyTorch checkpoint"),
])
def test_convert_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, command, kind, official,
                                                              torchvision):
  """Hostile round: convert given a plain tensor, a list, a Lightning .ckpt of another model, a
  random .npz, random bytes or no file at all: one `error:` line naming the file and what was
  expected, exit status 1, nothing written (the official workdir stays empty)."""
  bad = _bad_weight_file(kind, tmp_path)
  workdir, output = tmp_path / "run", tmp_path / "out" / "trunk.npz"
  workdir.mkdir()
  if command == "official":
    args = ["official", "--config", "configs/test.py", f"--ckpt={bad}", f"--aux-ckpt={bad}",
            f"--workdir={workdir}"]
  else:
    args = ["torchvision", "--arch=resnet18", f"--input={bad}", f"--output={output}"]
  proc = subprocess.run([sys.executable, "-m", "diffmic_jax.convert", *args], cwd=conftest.REPO,
                        env={**os.environ, "PYTHONPATH": conftest.REPO}, capture_output=True,
                        text=True, timeout=120)
  USER_ERROR_OUTPUTS.append((args, proc.stdout + proc.stderr))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and not proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:], proc.stderr
  assert lines[-1].startswith(f"error: {bad}: ")
  assert (official if command == "official" else torchvision) in lines[-1]
  assert not os.listdir(workdir) and not output.parent.exists()


def test_diverging_training_stops_with_one_line_and_keeps_its_checkpoint(tmp_path):
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path),
               "--config.optim.lr=1e30", timeout=300)
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]  # the error is the last line, after the bar
  assert line.startswith("error: non-finite") and "the last good checkpoint is kept" in line
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  # Every checkpoint precedes the first non-finite step, and nothing was validated after it.
  steps = checkpointing.Checkpointer(str(tmp_path)).all_steps()
  assert steps and max(steps) <= bad_step


def test_no_traceback_in_user_errors():
  """Every user error provoked above: exit 1 with one `error:` line, never a traceback."""
  if not USER_ERROR_OUTPUTS:
    pytest.skip("run with the command-line tests of this module, which collect the outputs")
  assert len(USER_ERROR_OUTPUTS) >= 10
  for args, output in USER_ERROR_OUTPUTS:
    assert "Traceback" not in output, (args, output[-3000:])
    errors_printed = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors_printed) == 1, (args, output[-3000:])


def _listing(folder):
  """{relative path: size} of every file under `folder` but the workdir lock, which every command
  that takes it rewrites with its own pid (a number of another length, now and then)."""
  return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
          for d, _, names in os.walk(folder) for f in names
          if os.path.relpath(os.path.join(d, f), folder) != workdir_lib.LOCK_FILE}


def test_convert_never_deletes_or_replaces_a_runs_checkpoints(tiny_config, tmp_path):
  """Hostile round, finding 1: `convert official --workdir W` into an existing run deleted its
  checkpoints_best/<step> and older latest checkpoints."""
  pytest.importorskip("torch")
  from diffmic_jax import convert  # pylint: disable=g-import-not-at-top
  from tests import pretrained_test  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  model, dcg = pretrained_test.official_models(cfg)
  files_at = {}  # step -> (ckpt.pth, aux_ckpt.pth) of official files at that step
  for step in (100, 200):
    (tmp_path / str(step)).mkdir()
    files_at[step] = pretrained_test._official_files(tmp_path / str(step), model, dcg, step=step)  # pylint: disable=protected-access
  workdir = tmp_path / "run"
  convert.convert_official(cfg, *files_at[100], str(workdir))  # the run's own checkpoints
  before = _listing(workdir)
  assert {"checkpoints/100/meta/metadata", "checkpoints_best/100/meta/metadata"} <= set(before)

  # Without --force: refused from the command line in one line, nothing changed.
  args = ["official", "--config", "configs/test.py", f"--ckpt={files_at[200][0]}",
          f"--aux-ckpt={files_at[200][1]}", f"--workdir={workdir}"]
  proc = subprocess.run([sys.executable, "-m", "diffmic_jax.convert", *args], cwd=conftest.REPO,
                        env={**os.environ, "PYTHONPATH": conftest.REPO}, capture_output=True,
                        text=True, timeout=300)
  USER_ERROR_OUTPUTS.append((args, proc.stdout + proc.stderr))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: --workdir {workdir} is not empty" in proc.stderr and "--force" in proc.stderr
  assert _listing(workdir) == before

  # With force: the new step is added beside the old ones; the best checkpoint is untouched.
  meta = convert.convert_official(cfg, *files_at[200], str(workdir), force=True)
  assert meta["kinds"] == ["latest"]
  after = _listing(workdir)
  assert {k: v for k, v in after.items() if k in before} == before
  assert checkpointing.Checkpointer(str(workdir)).all_steps() == [100, 200]
  assert checkpointing.Checkpointer(str(workdir)).all_steps("best") == [100]
  # The same step again would replace a checkpoint: refused, even with force.
  with pytest.raises(errors.UserError, match="checkpoints/200 exists"):
    convert.convert_official(cfg, *files_at[200], str(workdir), force=True)
  # A training run holds the workdir: refused.
  lock = workdir_lib.lock(str(tmp_path / "held"))
  try:
    with pytest.raises(errors.UserError, match="is held by pid"):
      convert.convert_official(cfg, *files_at[200], str(tmp_path / "held"))
  finally:
    lock.close()
  assert _listing(workdir) == after


def test_sigterm_mid_epoch_saves_stops_and_resumes_to_the_uninterrupted_metrics(
    reference, tiny_config, tmp_path, monkeypatch):
  """Preemption: SIGTERM while step 10 is logged (mid-epoch, between the scheduled checkpoints
  8 and 12) saves step 11 and stops; a second SIGTERM during that save changes nothing; the rerun
  ends with the metrics of the uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = tiny_config()
  config.training.keep_checkpoints = 10
  log_interval, save = train._log_interval, train._save  # pylint: disable=protected-access

  def log_and_signal(pending, writer, bar):
    rows = log_interval(pending, writer, bar)
    if rows[-1][0] == 9:  # the row of step index 9: 10 steps done
      os.kill(os.getpid(), signal.SIGTERM)
    return rows

  def save_and_signal_again(run, kind, state, meta):
    if int(state.step) == 11:
      os.kill(os.getpid(), signal.SIGTERM)
    save(run, kind, state, meta)

  monkeypatch.setattr(train, "_log_interval", log_and_signal)
  monkeypatch.setattr(train, "_save", save_and_signal_again)
  with pytest.raises(errors.Preempted, match=r"SIGTERM after step 11: checkpoint saved") as e:
    train.train_and_evaluate(config, workdir)
  assert e.value.exit_status == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
  assert checkpointing.Checkpointer(workdir, 10).all_steps() == [4, 6, 8, 11]
  assert [r["step"] for r in _rows(workdir) if "split" not in r] == list(range(11))
  workdir_lib.lock(workdir).close()  # released
  monkeypatch.undo()

  assert train.train_and_evaluate(config, workdir) == reference[1]
  _assert_one_row_per_step(workdir)


def test_damaged_latest_checkpoints_fall_back_to_the_newest_intact_one(reference, tiny_config,
                                                                        tmp_path, caplog):
  """Hostile round: a damaged latest checkpoint (cut data files, no meta/, no _METADATA) gave a
  157-line traceback, a KeyError or a message blaming the config, never the earlier one."""
  workdir = _fresh_copy(reference, tmp_path)
  folder = os.path.join(workdir, "checkpoints")
  for name in os.listdir(os.path.join(folder, "18", "state", "d")):  # data files gone
    os.remove(os.path.join(folder, "18", "state", "d", name))
  shutil.rmtree(os.path.join(folder, "16", "meta"))
  os.remove(os.path.join(folder, "12", "state", "_METADATA"))
  config = tiny_config()
  config.training.keep_checkpoints = 10
  with caplog.at_level("WARNING"):
    resumed = train.train_and_evaluate(config, workdir)
  assert resumed == reference[1]  # replayed from step 8
  _assert_one_row_per_step(workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  for step in (18, 16, 12):
    assert any(f"checkpoint {folder}/{step} is damaged" in w for w in warnings), warnings
  assert any("skipped the damaged checkpoints of steps [18, 16, 12]" in w for w in warnings)
  # Kept for the user, out of the way of the replay, which saved those steps again.
  assert sorted(os.listdir(os.path.join(workdir, checkpointing.DAMAGED_FOLDER))) == [
      "latest-12", "latest-16", "latest-18"]
  assert checkpointing.Checkpointer(workdir, 10).all_steps() == [4, 6, 8, 12, 16, 18]

  for step in (4, 6, 8, 12, 16, 18):  # nothing intact left: one line naming the folder
    shutil.rmtree(os.path.join(folder, str(step), "meta"))
  with pytest.raises(errors.UserError, match=f"every checkpoint in {folder} is damaged"):
    train.train_and_evaluate(config, workdir)


def test_an_immutable_checkpoints_folder_is_one_line_not_a_hang(tmp_path):
  """Hostile round: `chattr +i checkpoints/` hung 5 minutes (Orbax's timeout), 8 tracebacks."""
  folder = tmp_path / "checkpoints"
  folder.mkdir()
  if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
    pytest.skip("chattr +i needs CAP_LINUX_IMMUTABLE")
  try:
    proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path), timeout=240)
  finally:
    subprocess.run(["chattr", "-i", str(folder)], check=True)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: {folder}: cannot write there (Operation not permitted)" in proc.stderr
  assert "config.json" not in os.listdir(tmp_path)  # refused before any record


def test_an_unreadable_subfolder_of_an_image_folder_is_refused_with_its_path(tmp_path,
                                                                             monkeypatch):
  """Hostile round: an unreadable subfolder was dropped without a word (36 of 42 examples)."""
  from diffmic_jax.data import layouts  # pylint: disable=g-import-not-at-top
  for name in ("a/1.png", "a/sub/2.png", "b/3.png"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  assert len(layouts.list_image_folder(str(tmp_path), (), layouts.Problems(False)).records) == 3
  unreadable = str(tmp_path / "a" / "sub")
  scandir = os.scandir

  def refusing_scandir(path="."):  # as for a folder without read permission (root reads all)
    if os.fspath(path) == unreadable:
      raise PermissionError(13, "Permission denied", unreadable)
    return scandir(path)

  monkeypatch.setattr(os, "scandir", refusing_scandir)
  with pytest.raises(layouts.BadInputError,
                     match=f"{unreadable}: cannot read the folder \\(Permission denied\\)"):
    layouts.list_image_folder(str(tmp_path), (), layouts.Problems(False))


@pytest.mark.parametrize("label, class_names, problem", [
    ("", (), "empty label; expected a class name"),
    ("", ("x", "y"), "empty label; expected a class name"),
    ("z", ("x", "y"), "unknown label 'z'; expected one of ['x', 'y']"),
])
def test_empty_or_unknown_manifest_labels_are_refused_naming_the_row(tmp_path, label,
                                                                      class_names, problem):
  """Hostile round: an empty label became a class '' that TFDS dropped from the names, shifting
  every class name (num_classes=3 passed with 4 labels), then a misleading NaN error."""
  from diffmic_jax.data import layouts  # pylint: disable=g-import-not-at-top
  for name in ("1.png", "2.png", "3.png"):
    (tmp_path / name).write_bytes(b"")
  manifest = tmp_path / "manifest.csv"
  manifest.write_text(f"path,label\n1.png,x\n2.png,{label}\n3.png,y\n")
  with pytest.raises(layouts.BadInputError) as e:
    layouts.list_manifest(str(manifest), "", class_names, layouts.Problems(False))
  assert str(e.value) == f"{manifest} (row 3, 2.png): {problem}"
  # With skip_bad_images the row is left out and listed; the class names stay x, y.
  problems = layouts.Problems(True)
  listing = layouts.list_manifest(str(manifest), "", class_names, problems)
  assert listing.class_names == ("x", "y") and len(listing.records) == 2
  assert problems.items == [{"file": f"{manifest} (row 3, 2.png)", "problem": problem}]


def test_checkpoints_without_config_json_are_refused_not_recreated(reference, tiny_config,
                                                                   tmp_path):
  """Hostile round: deleting config.json disabled the resume check (a changed lr was accepted
  silently and recorded as if original)."""
  workdir = _fresh_copy(reference, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  before = _snapshot(workdir, ("split.json", "metrics.jsonl"))
  config = tiny_config()
  config.optim.lr = 5e-4
  with pytest.raises(errors.UserError, match=r"config.json is missing, but .*checkpoints holds "
                                             r"checkpoints: nothing to check this config"):
    train.train_and_evaluate(config, workdir)
  assert _snapshot(workdir, ("split.json", "metrics.jsonl")) == before
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  config.training.allow_config_change = True  # accepted only when asked, and recorded
  assert workdir_lib.check_resume_config(config, workdir)["overridden"] == [
      "config.json was missing"]


def test_training_command_refuses_checkpoints_without_config_json_in_one_line(tmp_path):
  """The same from the command line: one `error:` line, exit status 1, and config.json is not
  re-created (a checkpoint folder is all the refusal looks at, so an empty one stands in)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 0}\n')
  proc = _main("--config", "configs/test.py", "--workdir", str(workdir), timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == (f"error: {workdir / 'config.json'} is missing, but "
                       f"{workdir / 'checkpoints'} holds checkpoints: nothing to check this config "
                       "against; restore config.json, use a new --workdir, or pass "
                       "--config.training.allow_config_change=True to resume with this config "
                       "(e.g. from converted official weights)")
  assert sorted(os.listdir(workdir)) == [".lock", "checkpoints", "metrics.jsonl"]
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_fields_of_the_final_test_only_are_accepted_on_resume(tiny_config, tmp_path):
  """Hostile round: diffusion.predict_num_samples was refused on resume, though it only changes
  the final test."""
  config = tiny_config()
  workdir_lib.write_records(config, str(tmp_path), None)  # a run with a checkpoint at step 4
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  config.diffusion.predict_num_samples = 3
  config.training.eval_overlays = 0
  assert workdir_lib.check_resume_config(config, str(tmp_path))["accepted"] == [
      "diffusion.predict_num_samples (8 -> 3)", "training.eval_overlays (16 -> 0)"]


@pytest.mark.parametrize("field, value, expected", [
    ("seed", -1, "config.seed=-1; expected a value in [0, 4294967296)"),
    ("data.split_seed", -1, "config.data.split_seed=-1; expected a value in [0, 4294967296)"),
    ("diffusion.timesteps", 1, "config.diffusion.test_steps=5; expected a value in [1, 1]"),
    ("guidance.crop_size", 64, "config.guidance / config.data.image_size=32: DCG: crop_size=64 "
                               "exceeds the image size"),
    ("guidance.num_rois", 100, "fewer cells than num_rois=100"),
])
def test_unclear_or_late_config_errors_name_the_field_before_any_record(tiny_config, tmp_path,
                                                                        field, value, expected):
  """Hostile round: these named no field (split_seed, timesteps) or were refused only after
  config.json, split.json and the checkpoint folders were written (crop_size, num_rois, seed)."""
  config = tiny_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(errors.UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert expected in str(e.value)
  assert not (tmp_path / "run").exists()


def test_deduplication_that_empties_a_class_names_the_field(tiny_config, tmp_path):
  """Hostile round: deduplication that removed a whole class did not name the field."""
  from diffmic_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / "images"), {"a": 6, "b": 6})
  os.makedirs(os.path.join(root, "c"))
  shutil.copy(os.path.join(root, "a", "0.png"), os.path.join(root, "c", "0.png"))  # a's copy
  config = tiny_config()
  config.data.name, config.data.manual_dir = "image_folder", root
  config.data.num_classes, config.data.data_dir = 3, str(tmp_path / "tfds")
  config.data.deduplicate, config.data.dedup_threshold = True, 0.0
  with pytest.raises(errors.UserError, match=r"data.deduplicate=True \(data.dedup_threshold="
                                             r"0.0\) removed every example of class\(es\) \['c'\]"):
    input_pipeline.create_splits(config.data, None)


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
  """Hostile round: .tmp files of killed writers stayed in the workdir."""
  from diffmic_jax.platform import files  # pylint: disable=g-import-not-at-top
  dead = subprocess.Popen(["true"])
  dead.wait()
  (tmp_path / "eval").mkdir()
  stale = [tmp_path / f"metrics.jsonl.tmp{dead.pid}", tmp_path / "eval" / f"x.csv.tmp{dead.pid}"]
  live = [tmp_path / f"config.json.tmp{os.getpid()}", tmp_path / f"notes.tmp{dead.pid}x"]
  for path in stale + live:
    path.write_text("partial")
  assert sorted(files.remove_stale_temporaries(str(tmp_path))) == sorted(map(str, stale))
  assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


def test_launcher_refuses_zero_processes_in_one_line_with_status_1(capsys):
  """Hostile round: the launcher exited 2 (argparse's usage error) for --num_processes 0."""
  from diffmic_jax import launch  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    launch.main(["--num_processes", "0", "--", "--config", "configs/test.py"])
  assert e.value.code == 1
  assert capsys.readouterr().err == "error: --num_processes=0; expected >= 1\n"


def test_launched_batch_that_does_not_split_over_the_processes_is_refused_before_they_connect(
    tmp_path):
  """Hostile round: `launch --num_processes 3` with the batch of 8 buried the right error in 40
  lines of gRPC logs. Every process refuses before the processes connect: the field's line, the
  launcher's line naming the process that ended first, exit status 1, nothing written."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "diffmic_jax.launch", "--num_processes", "3", "--", "--config",
       "configs/test.py", "--workdir", str(workdir)], cwd=conftest.REPO,
      env={**env, "PYTHONPATH": conftest.REPO}, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert not proc.stdout and not workdir.exists()
  field = ("error: config.training.batch_size=8 must be divisible by the number of processes "
           "(3)")
  lines = proc.stderr.strip().splitlines()
  launcher = [line for line in lines if line != field]
  assert field in lines and len(launcher) == 1, proc.stderr[-3000:]
  assert re.fullmatch(r"error: process \d \(pid \d+\) exited with status 1; stopping the other 2",
                      launcher[0]), proc.stderr[-3000:]


@pytest.mark.parametrize("error, status, line", [
    ('OSError(28, "No space left on device", "/w/config.json")', 1,
     "error: /w/config.json: No space left on device; expected free space"),
    ("KeyboardInterrupt()", 130, "interrupted (SIGINT)"),
])
def test_a_full_disk_and_ctrl_c_outside_training_are_one_line(error, status, line):
  """Hostile round: a full disk at start and Ctrl-C gave tracebacks. In a process of its own:
  main's absl flags clash with those of scripts other tests import (experiments' benchmark)."""
  code = ("from diffmic_jax import main as main_lib\n"
          f"def fail(argv):\n  raise {error}\n"
          "main_lib._run = fail\n"
          "main_lib.main(['diffmic_jax.main'])\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=conftest.REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == status, proc.stderr[-2000:]
  err = proc.stderr
  assert err.startswith(line) and err.count("\n") == 1, err
