"""Tiny CPU configuration for tests and smoke runs: the synthetic demo data at 32×32, narrow
two-stage ResNets, T=10. Not an experiment; it only checks that the pipeline works.

  python -m diffmic_jax.main --config configs/test.py --workdir /tmp/diffmic_test
"""

from configs import default


def get_config():
  config = default.get_config()
  config.seed = 0
  config.data.name = "demo"
  config.data.num_classes = 4
  config.data.image_size = 32
  config.data.demo_num_examples = 80
  config.data.val_fraction = 0.2
  config.data.test_fraction = 0.2
  config.guidance.stage_sizes = (1, 1)  # downsampling 8: a 4x4 saliency grid at 32 px.
  config.guidance.width = 8
  config.guidance.crop_size = 8
  config.guidance.attention_dim = 8
  config.guidance.pretrain_epochs = 1
  config.model.encoder_stage_sizes = (1, 1)
  config.model.encoder_width = 8
  config.model.feature_dim = 32
  config.diffusion.timesteps = 10
  config.diffusion.test_steps = 5
  config.diffusion.val_steps = 10
  config.optim.warmup_epochs = 1
  config.training.batch_size = 8
  config.training.eval_batch_size = 8
  config.training.num_epochs = 2
  config.training.eval_every_epochs = 1
  config.training.checkpoint_every_steps = 4
  config.training.log_every_steps = 2
  return config
