"""BUSI breast ultrasound (780 images, 3 classes): the runnable stand-in for PMG2000.

PMG2000 (the paper's placental ultrasound set) is private; BUSI is the closest public ultrasound
classification set (../shared/data/busi_256, see its PROVENANCE.md). It is read as an image
folder (<manual_dir>/{benign,malignant,normal}/*.png) with the PMG settings (8:2 split).
About 19% of its images are (near-)duplicates, so data.deduplicate drops them (and any copies
whose labels disagree) before the stratified split; the counts go to <workdir>/split.json.

Run (CPU-sized; for the paper-sized model use a GPU and guidance.pretrained):
  python -m diffmic_jax.main --config configs/busi.py --workdir runs/busi
  (other location: --config.data.manual_dir=/path/to/busi_256)
No published DiffMIC number exists for BUSI.
"""

import os

from configs import pmg

_SHARED_DATA = os.environ.get(
    "DIFFMIC_SHARED_DATA",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config():
  config = pmg.get_config()
  config.data.name = "image_folder"
  config.data.manual_dir = os.path.normpath(os.path.join(_SHARED_DATA, "busi_256"))
  config.data.num_classes = 3
  config.data.test_fraction = 0.2  # PMG protocol: 8:2.
  config.data.deduplicate = True  # ~19% near-duplicates in BUSI (780 -> 597 images).
  return config
