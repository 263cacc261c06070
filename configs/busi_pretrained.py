"""BUSI in the paper's regime in miniature: DCG trunks pretrained on HAM10000, ρ(x) random.

The paper's DCG refines a strong prior: its trunks are ImageNet-pretrained, its ρ(x) random
(REFERENCE.md §1-3). Here both DCG trunks (and `basic`'s classifier, built like them:
model.classifier_trunk='guidance') start from the trunk of configs/ham10000_pretrain.py, a
full-depth ResNet-18 at half width (32) trained on HAM10000 dermoscopy and transferred to
ultrasound; ρ(x) keeps the accuracy study's size (two-stage, width 16) and starts random, as in
the official code. 64×64 images give the trunk a 2×2 saliency grid; the local branch reads the
2 most salient cells as 32-px crops at full resolution (the paper: 6 of 49 cells, 32 px on
224). Train it first:

  python -m diffmic_jax.main --config configs/ham10000_pretrain.py \
      --workdir runs/ham10000_pretrain --config.seed=0
  python -m diffmic_jax.main --config configs/busi_pretrained.py --workdir runs/busi_pretrained \
      --config.seed=0

`--config.guidance.init_from=` trains the same model from scratch (the study's baseline).
Time: 1.5-2 minutes for `basic` and `dcg`, 3.5 for `c2` and `full`, on the 2-core AMD EPYC
(Zen 4, AVX-512) beside other jobs. Result (test, 119 images, seeds 0-2): full model, diffusion
head macro-F1 0.530 ± 0.012, its DCG 0.595 ± 0.026; `basic` 0.592 ± 0.012 (from scratch: 0.503,
0.554, 0.594); experiments/accuracy/README.md, "Paper regime in miniature".
"""

import os

from configs import busi_cpu

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  config = busi_cpu.get_config()
  config.data.image_size = 64
  config.guidance.init_from = os.environ.get(
      "DIFFMIC_PRETRAINED_RUN", os.path.join(_REPO, "runs", "ham10000_pretrain"))
  config.guidance.backbone = "resnet18"
  config.guidance.width = 32
  config.guidance.stage_sizes = ()  # full depth: downsampling 32, a 2×2 grid at 64 px.
  config.guidance.num_rois = 2
  config.guidance.crop_size = 32  # one cell of the grid, at full resolution.
  config.guidance.attention_dim = 64
  config.model.classifier_trunk = "guidance"
  config.guidance.pretrain_epochs = 3
  config.optim.warmup_epochs = 2
  config.training.num_epochs = 20
  config.training.eval_every_epochs = 4
  config.training.eval_overlays = 0
  return config
