"""HAM10000 / ISIC 2018 Task 3, 7 classes: the official isic.yml settings (REFERENCE.md §1.3).

Run (GPU; needs the ImageNet ResNet-50 weights for paper-level accuracy, see docs/pretrained.md):
  python -m diffmic_jax.main --config configs/ham10000.py --workdir runs/ham10000 \
      --config.data.manual_dir=/path/to/HAM10000 --config.guidance.pretrained=resnet50.npz
Paper (Table 1): accuracy 0.906, macro F1 0.816.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "ham10000"
  config.data.num_classes = 7
  config.data.test_fraction = 0.3
  config.training.batch_size = 64
  config.training.eval_batch_size = 64
  config.diffusion.test_steps = 250
  return config
