"""Trunks from a trained run of ours (config.guidance.init_from, config.model.encoder_init_from),
on real tiny Orbax checkpoints: loaded values equal the source, heads that do not fit keep their
initialisation, an architecture mismatch is refused in one line, and resume keeps the run's own
weights."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffmic_jax.diffusion import models
from diffmic_jax.nn import pretrained
from diffmic_jax.run import checkpointing
from diffmic_jax.run import train_state
from diffmic_jax.training import train
from tests import conftest


def _config(tiny_config, ablation, **fields):
  config = tiny_config()
  config.ablation = ablation
  config.guidance.backbone = "resnet18"  # the same trunk as a classifier's (ρ(x)-like) one
  config.model.classifier_trunk = "guidance"
  for name, value in fields.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


def _fresh_state(config, seed=0):
  guidance_tx, denoiser_tx, _ = train_state.build_optimizers(config, steps_per_epoch=1)
  return train_state.create_train_state(models.create_models(config), config, guidance_tx,
                                        denoiser_tx, jax.random.PRNGKey(seed))


def _save(state, workdir, kind="best", step=7):
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(kind, step, state, {"stage": "done"})
  checkpointer.wait()
  checkpointer.close()
  return workdir


def _flat(tree):
  return pretrained.flatten(pretrained._to_dict(jax.device_get(tree)))  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def dcg_source(tiny_config, tmp_path_factory):
  """A saved DCG state (C=4) whose every leaf differs from a seed-0 initialisation."""
  state = _fresh_state(_config(tiny_config, "dcg"), seed=3)
  state = state.replace(guidance=jax.tree.map(lambda x: x + 0.5, state.guidance))
  return state, _save(state, str(tmp_path_factory.mktemp("dcg_source")))


def test_dcg_trunks_and_fitting_heads_equal_the_source(tiny_config, dcg_source):
  source, workdir = dcg_source
  state = _fresh_state(_config(tiny_config, "full", guidance__init_from=workdir))
  got, want = _flat(state.guidance), _flat(source.guidance)
  assert set(got) == set(want)
  for key in want:  # same C: trunks, MIL and saliency heads all come from the source
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # ρ(x) stays at its own (random) initialisation unless encoder_init_from is set.
  plain = _fresh_state(_config(tiny_config, "full"))
  for key, value in _flat(plain.denoiser).items():
    np.testing.assert_array_equal(_flat(state.denoiser)[key], value, err_msg=key)


def test_heads_of_another_number_of_classes_keep_their_initialisation(tiny_config, dcg_source,
                                                                       caplog):
  source, workdir = dcg_source
  config = _config(tiny_config, "dcg", data__num_classes=3, guidance__init_from=workdir)
  with caplog.at_level("INFO"):
    got = _flat(_fresh_state(config).guidance)
  fresh = _flat(_fresh_state(_config(tiny_config, "dcg", data__num_classes=3)).guidance)
  want = _flat(source.guidance)
  for key, value in got.items():
    module = key.split("/")[1]
    if module in ("global_net", "local_net"):
      np.testing.assert_array_equal(value, want[key], err_msg=key)
    elif value.shape != want[key].shape:  # the class dimension: not loaded
      np.testing.assert_array_equal(value, fresh[key], err_msg=key)
    else:  # e.g. the MIL's U and V: same shape, loaded
      np.testing.assert_array_equal(value, want[key], err_msg=key)
  assert "guidance heads not loaded" in caplog.text
  assert re.search(r"source \(\d+, 4\), target \(\d+, 3\)", caplog.text)


def test_a_basic_runs_classifier_feeds_both_dcg_trunks_and_rho(tiny_config, tmp_path):
  source = _fresh_state(_config(tiny_config, "basic", model__encoder="resnet18"), seed=5)
  workdir = _save(source, str(tmp_path / "basic"), kind="latest", step=3)
  config = _config(tiny_config, "full", guidance__init_from=workdir,
                   model__encoder_init_from=os.path.join(workdir, "checkpoints", "3"))
  state = _fresh_state(config)
  net = pretrained.module_tree(jax.device_get(source.guidance), "net")
  for trunk in ("global_net", "local_net"):
    got = pretrained.module_tree(jax.device_get(state.guidance), trunk)
    assert set(got) == set(net)
    for key in net:
      np.testing.assert_array_equal(got[key], net[key], err_msg=f"{trunk} {key}")
  encoder = pretrained.module_tree(jax.device_get(state.denoiser), "encoder_net")
  for key in net:
    np.testing.assert_array_equal(encoder[key], net[key], err_msg=f"encoder_net {key}")


def test_another_architecture_is_refused_naming_the_parameter(tiny_config, dcg_source):
  _, workdir = dcg_source
  config = _config(tiny_config, "dcg", guidance__init_from=workdir, guidance__width=16)
  with pytest.raises(pretrained.WeightMismatchError,
                     match=r"first mismatch: batch_stats/bn1/mean: source \(8,\), target \(16,\)"):
    _fresh_state(config)


def test_a_folder_without_a_checkpoint_is_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "diffmic_jax.main", "--config=configs/test.py",
       f"--workdir={tmp_path / 'run'}", f"--config.guidance.init_from={tmp_path}"],
      cwd=conftest.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "no finished checkpoint" in lines[0], proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_resume_keeps_the_runs_own_weights_and_refuses_another_source(tiny_config, dcg_source,
                                                                      tmp_path):
  _, workdir = dcg_source
  # A classifier's trunk feeds both DCG trunks: training must not see them share buffers.
  source = _save(_fresh_state(_config(tiny_config, "basic"), seed=5), str(tmp_path / "source"))
  config = _config(tiny_config, "dcg", guidance__init_from=source)
  config.training.num_epochs = 1
  run_dir = str(tmp_path / "run")
  train.train_and_evaluate(config, run_dir)
  latest = checkpointing.Checkpointer(run_dir)
  step = latest.latest_step()
  before = _flat(checkpointing.read_state(run_dir)[0]["guidance"])
  shutil.rmtree(source)  # a resumed run restores its checkpoint and never reads the source
  train.train_and_evaluate(config, run_dir)
  after = _flat(checkpointing.read_state(run_dir)[0]["guidance"])
  assert latest.latest_step() == step
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value, err_msg=key)
  latest.close()
  other = _config(tiny_config, "dcg", guidance__init_from=workdir)
  other.training.num_epochs = 1
  with pytest.raises(ValueError, match=r"guidance.init_from"):
    train.train_and_evaluate(other, run_dir)
