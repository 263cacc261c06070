"""APTOS 2019 blindness detection, 5 grades: the official aptos.yml settings (REFERENCE.md §1.3).

Run (GPU; needs the ImageNet ResNet-50 weights for paper-level accuracy, see docs/pretrained.md):
  python -m diffmic_jax.main --config configs/aptos.py --workdir runs/aptos \
      --config.data.manual_dir=/path/to/aptos2019-blindness-detection \
      --config.guidance.pretrained=resnet50.npz
Paper (Table 1): accuracy 0.858, macro F1 0.716.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "aptos2019"
  config.data.num_classes = 5
  config.data.test_fraction = 0.3
  config.data.vflip = True  # official: APTOS only.
  config.training.batch_size = 32
  config.training.eval_batch_size = 32
  config.diffusion.test_steps = 60
  return config
