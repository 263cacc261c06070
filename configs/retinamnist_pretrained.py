"""RetinaMNIST in the paper's regime in miniature: DCG trunks pretrained on HAM10000, ρ(x) random.

The model of configs/busi_pretrained.py on the official MedMNIST split of RetinaMNIST (fundus,
5 DR grades; 1,080 / 120 / 400), whose 28×28 images are upsampled to 64×64 at build time so
that the full-depth trunk has a 2×2 saliency grid (at 28 or 32 px it would have one cell and no
local branch). Fewer joint epochs than BUSI: 2.5 times as many training images per epoch.

  python -m diffmic_jax.main --config configs/retinamnist_pretrained.py \
      --workdir runs/retinamnist_pretrained --config.seed=0

Time: 1.3-2 minutes for `basic` and `dcg`, 4 for `c2` and `full`, on the 2-core AMD EPYC
(Zen 4, AVX-512) beside other jobs. Result (test, 400 images, seeds 0-2): full model, diffusion
head macro-F1 0.295 ± 0.031, its DCG 0.333 ± 0.014; `basic` 0.330 ± 0.011 (from scratch: 0.286,
0.301, 0.350); experiments/accuracy/README.md, "Paper regime in miniature".
"""

from configs import busi_pretrained
from configs import retinamnist_cpu


def get_config():
  config = busi_pretrained.get_config()
  retina = retinamnist_cpu.get_config()
  config.data = retina.data
  config.data.image_size = 64
  config.guidance.pretrain_epochs = 2
  config.training.num_epochs = 8
  config.training.eval_every_epochs = 2
  return config
