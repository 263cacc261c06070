"""HAM10000 at CPU size: the accuracy study's HAM10000 setting (experiments/accuracy/README.md).

All 10,015 images of ../shared/data/ham10000_200x150 at 48×48 (6×6 saliency grid), the lesion-grouped 7:3 split (no
lesion on both sides), two-stage width-16 ResNet-18 trunks for the DCG and ρ(x), F=256, T=100,
trained from scratch; the same sizes as configs/busi_cpu.py.

  python -m diffmic_jax.main --config configs/ham10000_cpu.py --workdir runs/ham10000_cpu \
      --config.seed=0

Time: 1 to 2 minutes for `basic` and `dcg`, 1.5 to 5.5 minutes for the diffusion arms (mostly
evaluating 10 samples × 100 steps on 3,006 test images) on the 2-core AMD EPYC (Zen 4,
AVX-512), shared with a second job. Result (test split, mean ± std over seeds 0, 1, 2): full model, diffusion head
macro-F1 0.318 ± 0.061 (accuracy 0.693 ± 0.010), its DCG 0.413 ± 0.046; `basic` 0.365 ± 0.045.
"""

import os

from configs import busi_cpu
from configs import ham10000

_SHARED_DATA = os.environ.get(
    "DIFFMIC_SHARED_DATA",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config():
  config = ham10000.get_config()
  small = busi_cpu.get_config()
  for section in ("guidance", "model", "diffusion", "optim"):
    config[section] = small[section]
  config.data.manual_dir = os.path.normpath(os.path.join(_SHARED_DATA, "ham10000_200x150"))
  config.data.image_size = 48
  config.data.group_split = True  # lesion-grouped: no lesion on both sides of the split.
  config.guidance.pretrain_epochs = 2
  config.optim.warmup_epochs = 1
  config.training.num_epochs = 6
  config.training.eval_every_epochs = 2
  config.training.select_metric = "f1_macro"
  config.training.batch_size = 32
  config.training.eval_batch_size = 128
  return config
