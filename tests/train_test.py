"""End to end on the tiny config: train -> checkpoint -> restore -> evaluate, exact resume,
the EMA switch, and the command line's error handling."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import evaluate
from diffmic_jax.platform import sharding
from diffmic_jax.run import checkpointing
from diffmic_jax.run import run as run_lib
from diffmic_jax.run import train_state
from diffmic_jax.training import train

from tests import conftest


class _Interrupt(Exception):
  pass


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_train_writes_metrics_checkpoints_and_reports(trained, tiny_config):
  workdir, results = trained
  assert set(results) == {"diffusion", "dcg_fused", "dcg_global", "dcg_local"}
  report = json.load(open(os.path.join(workdir, "eval", "test_metrics.json")))
  assert report["heads"]["diffusion"]["accuracy"] == results["diffusion"]["accuracy"]
  assert report["split"] == "test" and report["checkpoint"] == "best"
  assert os.path.exists(os.path.join(workdir, "eval", "test_confusion.png"))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("loss" in r for r in rows) and any("val_diffusion_accuracy" in r for r in rows)
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  steps = checkpointing.Checkpointer(workdir).all_steps()
  assert max(steps) == 18  # (1 warm-up + 2 joint epochs) x 6 steps
  # Restoring the best checkpoint reproduces the final test metrics exactly.
  again = evaluate.evaluate_checkpoint(tiny_config(), workdir, split="test", checkpoint="best")
  assert again["diffusion"] == results["diffusion"]
  rows = open(os.path.join(workdir, "eval", "test_predictions.csv")).read().splitlines()
  assert len(rows) == 1 + results["diffusion"]["num_examples"]
  assert rows[0].startswith("id,label,prediction,vote_share,vote_entropy,dcg_fused_prediction,p_")
  with pytest.warns(DeprecationWarning, match="use evaluate.evaluate_checkpoint"):
    latest = train.evaluate_checkpoint(tiny_config(), workdir, split="val", checkpoint="18")
  split = json.load(open(os.path.join(workdir, "split.json")))
  assert latest["diffusion"]["num_examples"] == len(split["val"])


def test_resume_after_interruption_is_exact(trained, tiny_config, tmp_path, monkeypatch):
  workdir, results = trained
  save = train._save

  stops = [6, 8]  # at the end of the warm-up stage, then in the middle of a joint epoch

  def save_then_die(run, kind, state, meta):
    save(run, kind, state, meta)
    if kind == "latest" and stops and int(state.step) == stops[0]:
      stops.pop(0)
      run.checkpointer.wait()
      raise _Interrupt()

  monkeypatch.setattr(train, "_save", save_then_die)
  for _ in range(2):
    with pytest.raises(_Interrupt):
      train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not stops
  # A save interrupted by a crash leaves a temporary directory that must be ignored.
  os.makedirs(tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1234")
  resumed = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert resumed == results


def test_restore_is_strict_about_the_model_structure(trained, tiny_config):
  workdir, _ = trained
  config = tiny_config()
  config.model.feature_dim = 16
  with pytest.raises(ValueError, match="has shape .* the config expects"):
    evaluate.load_variables(config, workdir, checkpoint="best")
  config = tiny_config()
  config.ablation = "basic"
  with pytest.raises(ValueError, match="missing .*unexpected"):
    evaluate.load_variables(config, workdir, checkpoint="best")


def test_load_variables_for_the_library_sampler(trained, tiny_config):
  workdir, _ = trained
  bundle, variables = evaluate.load_variables(tiny_config(), workdir, checkpoint="best")
  out = sampler.make_sample_fn(bundle, "official_truncated", 5)(
      variables, np.zeros((2, 32, 32, 3), np.float32), jax.random.PRNGKey(0))
  assert out["probs"].shape == (2, 4) and out["entropy"].shape == (2,)
  with pytest.warns(DeprecationWarning, match="use evaluate.load_variables"):
    _, old = train.load_variables(tiny_config(), workdir, checkpoint="best")
  jax.tree.map(np.testing.assert_array_equal, old, variables)
  with pytest.raises(FileNotFoundError, match="no latest checkpoint at step 7"):
    evaluate.load_variables(tiny_config(), workdir, checkpoint="7")


def test_load_variables_reads_only_the_models_of_the_checkpoint(trained, tiny_config):
  """The models (and the EMA with optim.eval_with_ema), equal to those of the whole state."""
  workdir, _ = trained
  run = run_lib.prepare(tiny_config(), workdir)
  abstract = train_state.abstract_train_state(run.models, run.config)
  state, _ = run.checkpointer.restore("best", None, abstract)
  fields = run.checkpointer.restore_fields("best", None, abstract, ("guidance", "ema"))
  assert sorted(fields) == ["ema", "guidance"]
  jax.tree.map(np.testing.assert_array_equal, fields, {"guidance": state.guidance,
                                                       "ema": state.ema})
  _, variables = evaluate.load_variables(tiny_config(), workdir, checkpoint="best")
  jax.tree.map(np.testing.assert_array_equal, variables,
               {"guidance": state.guidance, "denoiser": state.denoiser})
  config = tiny_config()
  config.optim.eval_with_ema = True
  _, variables = evaluate.load_variables(config, workdir, checkpoint="best")
  jax.tree.map(np.testing.assert_array_equal, variables["denoiser"],
               {**state.denoiser, "params": state.ema})


def test_eval_with_ema_uses_the_ema_parameters(trained, tiny_config):
  workdir, _ = trained
  run = run_lib.prepare(tiny_config(), workdir)
  state, _ = run.checkpointer.restore("latest", None,
                                      train_state.abstract_train_state(run.models, run.config))
  raw = {"guidance": state.guidance, "denoiser": state.denoiser}
  with_ema = evaluate.eval_variables(raw, state.ema, True)
  assert with_ema["denoiser"]["params"] is state.ema
  assert evaluate.eval_variables(raw, state.ema, False) is raw
  batches = lambda: train.input_pipeline.eval_batches(run.splits.test, run.config.data,
                                                      batch_size=8)
  args = dict(sampler_name="official_truncated", num_steps=5)
  p_raw = evaluate.predict(run.models, raw, batches(), run.eval_key, run.mesh, **args)
  p_ema = evaluate.predict(run.models, with_ema, batches(), run.eval_key, run.mesh, **args)
  assert not np.allclose(p_raw["probs"], p_ema["probs"])
  np.testing.assert_array_equal(p_raw["fused"], p_ema["fused"])  # the DCG is unchanged


def _main(*args, timeout=600):
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  return subprocess.run([sys.executable, "-m", "diffmic_jax.main", *args], cwd=conftest.REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,field", [
    ("--config.guidance.backbone=vgg", "guidance.backbone"),
    ("--config.training.batch_size=0", "training.batch_size"),
    ("--config.diffusion.sampler=ddim", "official_truncated"),
    ("--config.training.num_epochs=1", "optim.warmup_epochs"),
])
def test_bad_config_value_exits_nonzero_naming_the_field(tmp_path, override, field):
  proc = _main("--config", "configs/test.py", "--workdir", str(tmp_path), override, timeout=120)
  assert proc.returncode == 1
  assert field in proc.stderr and "Traceback" not in proc.stderr


def _run_until(args, path, deadline_s=400):
  """Starts a training CLI run and kill -9s it as soon as `path` exists; asserts that the child
  was alive and mid-training (no test report yet) at the kill."""
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  proc = subprocess.Popen([sys.executable, "-m", "diffmic_jax.main", *args], cwd=conftest.REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + deadline_s
  while time.time() < deadline and proc.poll() is None and not path.exists():
    time.sleep(0.02)
  alive = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert alive and path.exists(), f"the run ended (rc {proc.returncode}) before {path} appeared"
  assert not (path.parents[1] / "eval" / "test_metrics.json").exists()


def test_kill_9_between_latest_and_best_saves_then_rerun_is_exact(trained, tmp_path):
  """kill -9 right after the latest checkpoint of a validation step (before or during its
  validation and best save), then right after the best save (before the next latest save);
  the rerun ends with exactly the uninterrupted run's test metrics."""
  _, results = trained
  args = ["--config", "configs/test.py", "--workdir", str(tmp_path)]
  _run_until(args, tmp_path / "checkpoints" / "12")
  best = tmp_path / "checkpoints_best" / "12"
  # Usually the kill came before the best save; if not, kill the rerun at its next save.
  _run_until(args, best if not best.exists() else tmp_path / "checkpoints" / "16")
  done = _main(*args)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "Resuming from checkpoint at step" in done.stderr  # absl logging
  assert "test metrics (checkpoint" in done.stdout  # the results table
  report = json.load(open(tmp_path / "eval" / "test_metrics.json"))
  assert report["heads"] == json.loads(json.dumps(results))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "split" not in r] == list(range(18))
  assert [r["step"] for r in rows if "split" in r] == [12, 18]


def test_after_is_exact_for_a_finite_token_and_nan_for_an_infinite_one():
  x = np.array([[-1.5, 0.0, 3.25e-30], [np.inf, -np.inf, 7.0]], np.float32)
  for token in (np.float32(0.0), np.float32(-2.5e30), np.float32(1e-40)):
    np.testing.assert_array_equal(np.asarray(jax.jit(train.after)(x, token)), x)
  # 0 * inf is NaN, so XLA cannot fold the multiply away (what makes the dependency hold).
  assert np.isnan(np.asarray(train.after(x, np.float32(np.inf)))).all()


def test_joint_step_runs_the_dcg_update_after_the_denoiser_gradient(tiny_config):
  """The joint step's two backward passes (the denoiser's, then the DCG's update) run one after
  the other: its XLA temporaries stay at the larger of the two halves compiled alone (the DCG
  warm-up step; the joint step without the DCG update), not near their sum, which is what
  XLA's CPU scheduler gave when it interleaved them (64 px, batch 8: 5.7 MB against 3.8 MB)."""
  mesh = sharding.make_mesh()
  batch = {"image": np.zeros((8, 64, 64, 3), np.float32), "label": np.arange(8) % 4}
  temps = {}
  for joint_train in (True, False):
    cfg = tiny_config()
    cfg.data.image_size = 64
    cfg.guidance.joint_train = joint_train
    models = models_lib.create_models(cfg)
    guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(cfg, steps_per_epoch=4)
    steps = train.make_train_steps(models, cfg, guidance_tx, denoiser_tx, schedule, joint_start=0)
    state = train_state.create_train_state(models, cfg, guidance_tx, denoiser_tx,
                                           jax.random.PRNGKey(0), load_pretrained=False)
    for stage in ("joint", "warmup") if joint_train else ("joint",):
      compiled = train.jit_step(steps[stage], mesh).lower(state, batch).compile()
      temps[stage, joint_train] = compiled.memory_analysis().temp_size_in_bytes
  halves = (temps["warmup", True], temps["joint", False])
  assert temps["joint", True] <= 1.1 * max(halves), (temps, halves)
