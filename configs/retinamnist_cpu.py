"""RetinaMNIST (MedMNIST v2, 28×28 fundus, 5 DR grades) at CPU size: the study's quick third set.

The official MedMNIST train/val/test split (1,080 / 120 / 400) of ../shared/data/retinamnist_28,
upsampled to 32×32 at build time, with the model sizes of configs/busi_cpu.py (crop 8 px on a 4×4
saliency grid).

  python -m diffmic_jax.main --config configs/retinamnist_cpu.py --workdir runs/retinamnist_cpu \
      --config.seed=0

Time: 1 to 3 minutes per run on the 2-core AMD EPYC (Zen 4, AVX-512), shared with a second job.
Result (test split, 400 images, mean ± std over seeds 0, 1, 2): full model, diffusion head
macro-F1 0.320 ± 0.018 (accuracy 0.502 ± 0.010), its DCG 0.351 ± 0.013; `basic` 0.362 ± 0.006.
Those runs predate the vote rule (docs/predict.md) and later changes. Rerun with the code of
2026-12-06 (42-92 s a run on that machine, idle): diffusion macro-F1 0.301 ± 0.021 (accuracy
0.492 ± 0.017), its DCG 0.343 ± 0.021, `dcg` alone 0.343 ± 0.014, `basic` 0.377 ± 0.027
(experiments/accuracy/README.md, "Rerun with today's code").
"""

import os

from configs import busi_cpu

_SHARED_DATA = os.environ.get(
    "DIFFMIC_SHARED_DATA",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config():
  config = busi_cpu.get_config()
  config.data.name = "medmnist"
  config.data.manual_dir = os.path.normpath(os.path.join(_SHARED_DATA, "retinamnist_28"))
  config.data.num_classes = 5
  config.data.image_size = 32
  config.data.deduplicate = False
  config.data.class_names = ("grade0", "grade1", "grade2", "grade3", "grade4")
  config.training.num_epochs = 40
  return config
