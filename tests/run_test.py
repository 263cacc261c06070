"""run.py: the deprecated config names (diffusion.test_timesteps, val_timesteps)."""

from absl import logging as absl_logging
import pytest

from diffmic_jax.platform import errors
from diffmic_jax.run import run as run_lib


def test_deprecated_step_names_move_onto_the_new_fields_with_a_warning(tiny_config, caplog):
  config = tiny_config()
  config.diffusion.test_timesteps = 7
  config.diffusion.val_timesteps = 3
  with caplog.at_level("WARNING", logger=absl_logging.get_absl_logger().name):
    run_lib.validate_config(config)
  d = config.diffusion
  assert (d.test_steps, d.val_steps, d.test_timesteps, d.val_timesteps) == (7, 3, None, None)
  assert "diffusion.test_timesteps is deprecated; use config.diffusion.test_steps" in caplog.text
  caplog.clear()
  run_lib.apply_deprecated_names(config)  # a second call changes nothing
  assert (d.test_steps, d.val_steps) == (7, 3) and "deprecated" not in caplog.text


def test_unset_deprecated_names_leave_the_new_fields_alone(tiny_config):
  config = tiny_config()
  steps = config.diffusion.test_steps
  run_lib.apply_deprecated_names(config)
  assert config.diffusion.test_steps == steps and config.diffusion.test_timesteps is None
  config.diffusion.val_timesteps = 0
  with pytest.raises(errors.UserError, match="config.diffusion.val_steps must be >= 1, got 0"):
    run_lib.validate_config(config)
