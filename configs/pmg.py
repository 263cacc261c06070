"""Placental maturity grading (PMG2000, private ultrasound, 4 grades), REFERENCE.md §1.3.

The official v1 code has no PMG config; this follows DiffMIC-v2's placental.yml where v1 is
silent (batch 64, 100 test steps, 8:2 split). The data are read from an image folder
(<manual_dir>/<grade>/<image>) or, with data.name='manifest', from a CSV manifest.

Run (GPU):
  python -m diffmic_jax.main --config configs/pmg.py --workdir runs/pmg \
      --config.data.manual_dir=/path/to/pmg2000 --config.guidance.pretrained=resnet50.npz
Paper (Table 1): accuracy 0.931, macro F1 0.926.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "image_folder"  # or "manifest" with --config.data.manifest_file=CSV.
  config.data.num_classes = 4
  config.data.test_fraction = 0.2  # paper: 8:2.
  config.training.batch_size = 64
  config.training.eval_batch_size = 64
  config.diffusion.test_steps = 100
  return config
