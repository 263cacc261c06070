"""Cross-framework parity without torch: our ResNet trunks (torchvision conversion), DCG and
denoiser (official-checkpoint conversion) against torch outputs stored in
tests/fixtures/parity.npz by tests/fixtures/make_parity_fixtures.py (see docs/development.md).

tests/pretrained_test.py runs the same comparisons against live torch when it is installed.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from diffmic_jax import convert
from diffmic_jax.diffusion import models as models_lib
from diffmic_jax.nn import pretrained
from diffmic_jax.nn import resnet

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "parity.npz")
RESNET_WIDTH = 4  # the fixture's torchvision ResNets: full depth, stem width 4


def official_config():
  """configs/test.py (32 px, width-8 two-stage trunks, T=10) with 3 classes and F=16."""
  cfg = test_config.get_config()
  cfg.data.num_classes = 3
  cfg.guidance.attention_dim = 16
  cfg.model.feature_dim = 16
  return cfg


@pytest.fixture(scope="module")
def arrays():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


def _group(arrays, prefix):
  """{key: array} of the entries named '<prefix>/<key>'."""
  return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_trunk_matches_torch(arrays, arch):
  flat, signature = pretrained.convert_torchvision(_group(arrays, f"{arch}/state_dict"), arch,
                                                   width=RESNET_WIDTH, source=arch)
  model = resnet.ResNet(stage_sizes=signature.stage_sizes, block=signature.block,
                        width=signature.width)
  variables = pretrained.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  images = jnp.asarray(arrays[f"{arch}/images"].transpose(0, 2, 3, 1))
  pooled, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  expected = arrays[f"{arch}/feature_map"]
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(aux["feature_map"], expected, atol=1e-4 * scale)
  np.testing.assert_allclose(pooled, expected.mean(axis=(1, 2)), atol=1e-4 * scale)


def test_official_dcg_and_denoiser_match_torch(arrays):
  cfg = official_config()
  state = convert.build_official_state(cfg, _group(arrays, "official/denoiser"),
                                       _group(arrays, "official/dcg"))
  models = models_lib.create_models(cfg)
  a = _group(arrays, "official")
  images = jnp.asarray(a["images"].transpose(0, 2, 3, 1))
  eps = jax.jit(lambda v, *x: models.denoiser.apply(v, *x, train=False))(
      state.denoiser, images, jnp.asarray(a["y_t"]), jnp.asarray(a["yhat"]), jnp.asarray(a["t"]))
  np.testing.assert_allclose(eps, a["eps"], atol=1e-4, rtol=1e-4)
  logits, _ = jax.jit(lambda v, x: models.guidance.apply(v, x, train=False))(state.guidance,
                                                                             images)
  for head in ("fused", "global", "local"):
    np.testing.assert_allclose(logits[head], a[head], atol=1e-4, rtol=1e-4, err_msg=head)
