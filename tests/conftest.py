"""Shared test setup: persistent XLA compilation cache, strict rank promotion, parsed absl flags
(grain worker processes read flags), and the shared tiny model fixtures."""

import os

import jax
import pytest
from absl import flags

# Subprocesses (the command-line tests) inherit the variable and share the cache.
os.environ.setdefault("DIFFMIC_COMPILATION_CACHE",
                      os.path.join(os.path.expanduser("~"), ".cache", "diffmic_jax", "xla-tests"))
jax.config.update("jax_compilation_cache_dir", os.environ["DIFFMIC_COMPILATION_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_numpy_rank_promotion", "raise")
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("DIFFMIC_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def tiny_config():
  """A fresh copy of configs/test.py (tiny models on the synthetic demo data)."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  return test_config.get_config


# Tests of compiled numerics on JAX's default backend (the sampler, networks, convolutions,
# losses, diffusion maths, bfloat16, parity with torch, training end to end): the tests that
# need a GPU. experiments/speed/gpu_check.py runs them there (`pytest -m device`); on a CPU they run
# like the rest.
DEVICE_MODULES = ("denoiser_test", "diffusion_test", "fast_conv_test", "losses_test",
                  "mixed_precision_test", "models_test", "parity_test", "sampler_test",
                  "train_test")


def pytest_configure(config):
  config.addinivalue_line("markers", "device: compiled numerics on JAX's default backend; "
                          "experiments/speed/gpu_check.py runs these on the GPU")


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.stem in DEVICE_MODULES:
      item.add_marker(pytest.mark.device)
