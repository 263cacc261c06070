"""config.model.dtype='bfloat16': bf16 compute, float32 state, and float32-level accuracy.

(a) After a bf16 warm-up step and a bf16 joint step, every parameter, optimiser moment, EMA
    entry and BatchNorm statistic is still float32, while the convolutions, BatchNorms and the
    denoiser's MLP produce bfloat16 activations (checked with `jax.eval_shape`, nothing runs).
(b) The same short joint training on the synthetic demo data, from the same seed, reaches
    about the same DCG and diffusion test accuracy in bf16 as in float32, both well above
    chance.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.data import input_pipeline
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.diffusion import sampler
from diffmic_jax.nn import denoiser as denoiser_lib
from diffmic_jax.platform import sharding
from diffmic_jax.run import train_state
from diffmic_jax.training import train

# Activations that must follow model.dtype: every Conv and BatchNorm of the trunks, the DCG's
# saliency conv, rho(x)'s projection and BN0, and the denoiser's three conditional layers.
_COMPUTE = re.compile(r"(^|/)(conv\d|bn\d|downsample_conv|downsample_bn|saliency|encoder_proj|"
                      r"norm\d?|lin[123])/__call__$")


def _config(tiny_config, dtype):
  cfg = tiny_config()
  cfg.model.dtype = dtype
  return cfg


def _abstract_state(models, cfg):
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(cfg, steps_per_epoch=4)
  state = jax.eval_shape(lambda k: train_state.create_train_state(
      models, cfg, guidance_tx, denoiser_tx, k, load_pretrained=False), jax.random.PRNGKey(0))
  steps = train.make_train_steps(models, cfg, guidance_tx, denoiser_tx, schedule, 0)
  return state, steps


def _float_dtypes(tree):
  return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _intermediate_dtypes(intermediates) -> dict:
  """{'module/path/__call__': set of dtypes of that call's floating outputs}."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    name = "/".join(str(k) for k in keys if isinstance(k, str))
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      out.setdefault(name, set()).add(str(leaf.dtype))
  return out


def test_bfloat16_training_keeps_state_float32(tiny_config):
  cfg = _config(tiny_config, "bfloat16")
  models = models_lib.create_models(cfg)
  state, steps = _abstract_state(models, cfg)
  size = cfg.data.image_size
  batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  state, _ = jax.eval_shape(steps["warmup"], state, batch)
  state, metrics = jax.eval_shape(steps["joint"], state, batch)
  for name in ("guidance", "guidance_opt", "denoiser", "denoiser_opt", "ema"):
    assert _float_dtypes(getattr(state, name)) == {"float32"}, name
  assert jax.tree.leaves(state.guidance["batch_stats"])
  assert jax.tree.leaves(state.denoiser["batch_stats"])
  assert _float_dtypes(metrics) == {"float32"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_activations_follow_model_dtype(tiny_config, dtype):
  cfg = _config(tiny_config, dtype)
  models = models_lib.create_models(cfg)
  variables = jax.eval_shape(lambda k: models_lib.init_variables(models, k, cfg.data.image_size),
                             jax.random.PRNGKey(0))
  b, size, c = 8, cfg.data.image_size, models.num_classes
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)

  def guidance(v, x):
    return models.guidance.apply(v, x, train=True, capture_intermediates=True,
                                 mutable=["batch_stats", "intermediates"])

  def noise_model(v, x):
    return models.denoiser.apply(v, x, jnp.zeros((b, c)), jnp.zeros((b, c)),
                                 jnp.zeros((b,), jnp.int32), train=True,
                                 capture_intermediates=True,
                                 mutable=["batch_stats", "intermediates"])

  (_, g_vars) = jax.eval_shape(guidance, variables["guidance"], images)
  (eps, d_vars) = jax.eval_shape(noise_model, variables["denoiser"], images)
  found = {**{"guidance/" + k: v for k, v in _intermediate_dtypes(g_vars["intermediates"]).items()},
           **{"denoiser/" + k: v for k, v in _intermediate_dtypes(d_vars["intermediates"]).items()}}
  compute = {k: v for k, v in found.items() if _COMPUTE.search(k)}
  # Both trunks of the DCG, rho(x)'s trunk and the MLP are covered.
  for part in ("guidance/global_net/conv1", "guidance/local_net/layer1_0/conv1",
               "denoiser/encoder_net/layer1_0/bn1", "denoiser/encoder_proj", "denoiser/lin2",
               "denoiser/norm3"):
    assert any(k.startswith(part + "/") for k in compute), part
  assert {k: v for k, v in compute.items() if v != {dtype}} == {}
  assert eps.dtype == jnp.float32  # ε̂ and the losses stay float32.
  # BatchNorm statistics are float32 whatever the compute dtype.
  assert _float_dtypes(g_vars["batch_stats"]) == _float_dtypes(d_vars["batch_stats"]) == {"float32"}
  features = jax.eval_shape(lambda v, x: models.denoiser.apply(
      v, x, train=False, method=denoiser_lib.NoiseModel.encode), variables["denoiser"], images)
  assert features.dtype == jnp.dtype(dtype)


# ----------------------------------------------------------------------------- accuracy

_STEPS = 300
_BATCH = 32


@pytest.fixture(scope="module")
def demo_data(tiny_config):
  """Normalised train/test arrays of the synthetic demo at 32 px (800 examples)."""
  cfg = tiny_config()
  cfg.data.demo_num_examples = 800
  splits = input_pipeline.create_splits(cfg.data, None)

  def arrays(source):
    images = np.stack([source[i]["image"] for i in range(len(source))])
    return input_pipeline.normalise(images), np.asarray(source.labels, np.int32)

  return arrays(splits.train), arrays(splits.test)


def _train_and_score(tiny_config, dtype, data):
  """Joint steps (diffusion + the DCG's joint CE step) from scratch, then test accuracy."""
  (x_train, y_train), (x_test, y_test) = data
  cfg = _config(tiny_config, dtype)
  cfg.guidance.lr = 1e-3
  cfg.training.num_epochs, cfg.optim.warmup_epochs = 10, 1
  models = models_lib.create_models(cfg)
  guidance_tx, denoiser_tx, schedule = train_state.build_optimizers(cfg, steps_per_epoch=_STEPS // 10)
  step = train.make_train_steps(models, cfg, guidance_tx, denoiser_tx, schedule, 0)["joint"]
  mesh = sharding.make_mesh()
  step = train.jit_step(step, mesh)
  state = train_state.create_train_state(models, cfg, guidance_tx, denoiser_tx,
                                   jax.random.PRNGKey(cfg.seed), load_pretrained=False)
  state = sharding.replicate(state, mesh)  # placed as the step returns it: one compile.
  rng = np.random.default_rng(0)
  for _ in range(_STEPS):
    index = rng.choice(len(y_train), _BATCH, replace=False)
    state, metrics = step(state, {"image": x_train[index], "label": y_train[index]})
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["dcg_loss"]))
  sample = sampler.make_sample_fn(models, "official_truncated", models.num_timesteps)
  out = sample({"guidance": state.guidance, "denoiser": state.denoiser}, x_test,
               jax.random.PRNGKey(1))
  dcg = np.argmax(np.asarray(out["guidance_logits"]["fused"]), -1)
  return {"dcg": float(np.mean(dcg == y_test)),
          "diffusion": float(np.mean(np.asarray(out["prediction"]) == y_test))}


def test_bfloat16_accuracy_stays_close_to_float32(tiny_config, demo_data):
  fp32 = _train_and_score(tiny_config, "float32", demo_data)
  bf16 = _train_and_score(tiny_config, "bfloat16", demo_data)
  chance = 1 / 4
  for result in (fp32, bf16):
    assert result["dcg"] >= 0.6, (fp32, bf16)
    assert result["diffusion"] >= chance + 0.1, (fp32, bf16)
  assert abs(bf16["dcg"] - fp32["dcg"]) <= 0.1, (fp32, bf16)
  assert abs(bf16["diffusion"] - fp32["diffusion"]) <= 0.15, (fp32, bf16)
