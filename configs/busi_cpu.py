"""BUSI at CPU size: the accuracy study's BUSI setting (experiments/accuracy/README.md).

64×64 images, two-stage width-16 ResNet-18 trunks for the DCG and ρ(x), F=256, T=100,
trained from scratch (5 DCG warm-up + 60 joint epochs, batch 32); the checkpoint is chosen on
validation macro-F1 with 10 reverse samples per image. Every arm of the study (basic, dcg, c1,
c2, full) uses this config.

  python -m diffmic_jax.main --config configs/busi_cpu.py --workdir runs/busi_cpu --config.seed=0

Time: 1 to 3 minutes per run on the 2-core AMD EPYC (Zen 4, AVX-512), sharing it with a second
job. Result (test split, 119 images, mean ± std over seeds 0, 1, 2): full model, diffusion head
macro-F1 0.558 ± 0.019 (accuracy 0.641 ± 0.005), its DCG 0.563 ± 0.032; `basic` 0.611 ± 0.019.
Those runs predate the vote rule (docs/predict.md) and later changes. Rerun with the code of
2026-12-06 (40-87 s a run on that machine, idle): diffusion macro-F1 0.572 ± 0.055 (accuracy
0.669 ± 0.041), its DCG 0.610 ± 0.016, `dcg` alone 0.642 ± 0.030, `basic` 0.592 ± 0.025
(experiments/accuracy/README.md, "Rerun with today's code").
"""

from configs import busi


def get_config():
  config = busi.get_config()
  config.data.image_size = 64
  config.guidance.backbone = "resnet18"
  config.guidance.stage_sizes = (1, 1)
  config.guidance.width = 16
  config.guidance.crop_size = 8
  config.guidance.lr = 1e-3
  config.guidance.pretrain_epochs = 5
  config.model.encoder_stage_sizes = (1, 1)
  config.model.encoder_width = 16
  config.model.feature_dim = 256
  config.diffusion.timesteps = 100
  config.diffusion.test_steps = 100
  config.diffusion.val_steps = 100
  config.optim.warmup_epochs = 2
  config.training.num_epochs = 60
  config.training.eval_every_epochs = 5
  config.training.batch_size = 32
  config.training.eval_batch_size = 64
  # Evaluation: the mean of softmax(ŷ₀) over 10 reverse samples (a single sample is a draw from
  # the predictive distribution, not its mode), and the checkpoint with the best validation
  # macro-F1 (the study's goal metric; accuracy favours the majority class).
  config.diffusion.num_samples = 10
  config.diffusion.predict_num_samples = 10
  config.training.select_metric = "f1_macro"
  return config
