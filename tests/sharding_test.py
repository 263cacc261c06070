"""Data parallelism: two CPU devices give the same losses and variables as one.

XLA_FLAGS must be set before JAX starts, so each device count runs in its own subprocess
(`python -m tests.sharding_test OUT.npz` with --xla_force_host_platform_device_count=N). Both
run two DCG warm-up steps and two joint steps of the tiny config on the same deterministic
batches from the same key, through `train.jit_step` (batch sharded over ('data',), state
replicated and donated), and save the metrics and every leaf of the final state. BatchNorm
batch statistics over the sharded global batch must equal the single-device ones.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DIFFMIC_COMPILATION_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "diffmic_jax", "xla-tests"))
BATCH = 8
EVAL_EXAMPLES = 13
STAGES = ("warmup", "warmup", "joint", "joint")


def _child(out_path: str) -> None:
  """Runs the steps on every visible device and writes metrics and final state to out_path."""
  # pylint: disable=g-import-not-at-top
  import jax
  jax.config.update("jax_compilation_cache_dir", CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
  from configs import test as test_config
  from diffmic_jax.evaluation import evaluate
  from diffmic_jax.diffusion import models as models_lib
  from diffmic_jax.platform import sharding
  from diffmic_jax.training import train
  from diffmic_jax.run import train_state
  # pylint: enable=g-import-not-at-top

  cfg = test_config.get_config()
  # Adam divides by sqrt(v) + eps, so an element whose gradient is at rounding level (a bias
  # right before a BatchNorm has a mathematically zero gradient) takes a full ±lr step whose
  # sign is rounding noise, and a different reduction order flips it. A larger eps compares
  # the data-parallel arithmetic instead of Adam's sign of noise.
  cfg.guidance.eps = cfg.optim.eps = 1e-4
  models = models_lib.create_models(cfg)
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(cfg, steps_per_epoch=4)
  steps = train.make_train_steps(models, cfg, guidance_tx, denoiser_tx, schedule, joint_start=2)
  mesh = sharding.make_mesh()
  state = train_state.create_train_state(models, cfg, guidance_tx, denoiser_tx,
                                   jax.random.PRNGKey(cfg.seed), load_pretrained=False)
  state = sharding.replicate(state, mesh)
  fns = {name: train.jit_step(steps[name], mesh) for name in set(STAGES)}
  rng = np.random.default_rng(0)
  size = cfg.data.image_size
  out, info = {}, {"num_devices": jax.device_count(), "mesh_size": mesh.size}
  for i, stage in enumerate(STAGES):
    host = {"image": rng.normal(size=(BATCH, size, size, 3)).astype(np.float32),
            "label": (np.arange(BATCH) % cfg.data.num_classes).astype(np.int32)}
    batch = sharding.put_batch(host, mesh)
    if i == 0:
      info["batch_num_shards"] = len(batch["image"].addressable_shards)
      info["batch_shard_shape"] = list(batch["image"].addressable_shards[0].data.shape)
      info["batch_fully_replicated"] = bool(batch["image"].sharding.is_fully_replicated)
    state, metrics = fns[stage](state, batch)
    info.setdefault("metrics_fully_replicated", True)
    for name, value in metrics.items():
      info["metrics_fully_replicated"] &= bool(value.sharding.is_fully_replicated)
      out[f"metric/{i}/{name}"] = np.asarray(value)
  # Evaluation over a split whose size is not a multiple of the batch: padded, sharded,
  # gathered and unpadded by the same function that validation and --mode eval use.
  images = rng.normal(size=(EVAL_EXAMPLES, size, size, 3)).astype(np.float32)
  eval_batches = [{"image": np.concatenate([images[i:i + BATCH], np.zeros(
                       (max(0, i + BATCH - EVAL_EXAMPLES), size, size, 3), np.float32)]),
                   "label": (np.arange(i, i + BATCH) % cfg.data.num_classes).astype(np.int32),
                   "mask": np.arange(i, i + BATCH) < EVAL_EXAMPLES}
                  for i in range(0, EVAL_EXAMPLES, BATCH)]
  variables = {"guidance": state.guidance, "denoiser": state.denoiser}
  predictions = evaluate.predict(models, variables, eval_batches, jax.random.PRNGKey(1), mesh,
                                 sampler_name="official_truncated", num_steps=5)
  for name, value in predictions.items():
    out[f"eval/{name}"] = value
  leaves = jax.tree_util.tree_leaves_with_path(state)
  info["state_fully_replicated"] = all(bool(leaf.sharding.is_fully_replicated)
                                       for _, leaf in leaves)
  info["state_num_shards"] = sorted({len(leaf.addressable_shards) for _, leaf in leaves})
  for path, leaf in leaves:
    out["state/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  out["info"] = np.asarray(json.dumps(info))
  np.savez(out_path, **out)


def _launch(num_devices: int, out_path: str) -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, "-m", "tests.sharding_test", out_path], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{num_devices: dict of saved arrays}: both device counts, run concurrently."""
  tmp = tmp_path_factory.mktemp("sharding")
  procs = {n: _launch(n, str(tmp / f"devices{n}.npz")) for n in (1, 2)}
  results = {}
  for n, proc in procs.items():
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{n}-device run failed:\n{log[-5000:]}"
    with np.load(tmp / f"devices{n}.npz") as f:
      results[n] = {k: f[k] for k in f.files}
  return results


def _info(run):
  return json.loads(str(run["info"]))


def test_two_devices_shard_the_batch_and_replicate_the_state(runs):
  one, two = _info(runs[1]), _info(runs[2])
  assert one["num_devices"] == 1 and two["num_devices"] == 2 and two["mesh_size"] == 2
  assert two["batch_num_shards"] == 2 and two["batch_shard_shape"][0] == BATCH // 2
  assert not two["batch_fully_replicated"]
  assert two["state_fully_replicated"] and two["state_num_shards"] == [2]
  assert two["metrics_fully_replicated"]


def test_two_devices_give_the_same_losses_as_one(runs):
  metrics = sorted(k for k in runs[1] if k.startswith("metric/"))
  assert metrics == sorted(k for k in runs[2] if k.startswith("metric/"))
  assert any(k.endswith("/loss") for k in metrics) and any(k.endswith("/dcg_loss") for k in metrics)
  for key in metrics:
    np.testing.assert_allclose(runs[2][key], runs[1][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_two_devices_give_the_same_updated_variables_as_one(runs):
  keys = sorted(k for k in runs[1] if k.startswith("state/"))
  assert keys == sorted(k for k in runs[2] if k.startswith("state/"))
  assert any("batch_stats" in k for k in keys) and any("ema" in k for k in keys)
  for key in keys:
    np.testing.assert_allclose(runs[2][key], runs[1][key], rtol=1e-5, atol=1e-5, err_msg=key)
  # The steps really changed the variables (guards against comparing two initial states).
  step_key = next(k for k in keys if k.startswith("state/.step"))
  assert int(runs[1][step_key]) == len(STAGES)


def test_two_devices_evaluate_every_example_once_with_the_same_predictions(runs):
  keys = sorted(k for k in runs[1] if k.startswith("eval/"))
  assert keys == sorted(k for k in runs[2] if k.startswith("eval/")) and keys
  assert runs[2]["eval/labels"].shape == (EVAL_EXAMPLES,)
  np.testing.assert_array_equal(runs[2]["eval/labels"], np.arange(EVAL_EXAMPLES) % 4)
  for key in keys:
    np.testing.assert_allclose(runs[2][key], runs[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


if __name__ == "__main__":
  _child(sys.argv[1])
