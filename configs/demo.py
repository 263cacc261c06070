"""Built-in demo: DiffMIC on the synthetic 4-class dataset, sized for a 2-core CPU.

The class needs both the global stripe orientation and a small local shape (see
diffmic_jax/data/demo.py), so the DCG's local branch matters. Narrow two-stage ResNets,
64×64 images, F=256; the diffusion, losses, samplers and protocol are the official ones.

  python -m diffmic_jax.main --config configs/demo.py --workdir runs/demo

Expected (seed 0, 2-core CPU, about 3 minutes): test accuracy of the diffusion head ≈ 0.99,
DCG fused ≈ 1.0, DCG local ≈ 0.5 (the crops alone see the shape, not the stripes).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.seed = 0
  config.data.name = "demo"
  config.data.num_classes = 4
  config.data.image_size = 64
  config.data.demo_num_examples = 1200
  config.guidance.backbone = "resnet18"
  config.guidance.stage_sizes = (1, 1)  # downsampling 8: an 8x8 saliency grid at 64 px.
  config.guidance.width = 16
  config.guidance.crop_size = 8  # one saliency cell, as 32 px on 224 px.
  config.guidance.attention_dim = 32
  config.guidance.pretrain_epochs = 4
  config.guidance.lr = 1e-3  # from scratch (no ImageNet weights); DiffMIC-v2 PMG also uses 1e-3.
  config.model.encoder_stage_sizes = (1, 1)
  config.model.encoder_width = 16
  config.model.feature_dim = 256
  # T=100: each row of the per-timestep gamma tables gets 10x more updates than with T=1000,
  # which a few-minute run needs; the chain at test time is the whole schedule.
  config.diffusion.timesteps = 100
  config.diffusion.test_steps = 100
  config.diffusion.val_steps = 100
  config.optim.warmup_epochs = 2
  config.training.batch_size = 32
  config.training.eval_batch_size = 64
  config.training.num_epochs = 40
  config.training.eval_every_epochs = 8
  config.training.checkpoint_every_steps = 50
  config.training.log_every_steps = 10
  return config
