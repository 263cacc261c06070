"""docs/library.md's code, read from the page at test time and run as written, on a tiny run
in `runs/demo` and a folder `new_images/` of PNG files (the names the page uses), so that the
page cannot rot: a renamed function, a changed signature or a missing output key fails here."""

import csv
import os
import re

import numpy as np
import pytest
from PIL import Image

from diffmic_jax.data import demo
from diffmic_jax.evaluation import predict
from diffmic_jax.training import train

from tests import conftest

PAGE = os.path.join(conftest.REPO, "docs", "library.md")


def python_blocks(markdown: str) -> list[str]:
  """The ```python fenced blocks of a markdown page, in order."""
  return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_reads_fenced_blocks_only():
  page = "text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\nc = 3\n```\n"
  assert python_blocks(page) == ["a = 1\n", "b = 2\nc = 3\n"]


@pytest.fixture(scope="module")
def demo_folder(tiny_config, tmp_path_factory):
  """A folder with a tiny trained run as runs/demo (configs/test.py as other tests train it, so
  its programs are in the compilation cache) and one batch of demo images as PNG files in
  new_images/ (training.eval_batch_size of them: --mode predict's first batch)."""
  root = tmp_path_factory.mktemp("user")
  config = tiny_config()
  workdir = str(root / "runs" / "demo")
  train.train_and_evaluate(config, workdir)
  images, _ = demo.make_demo(config.training.eval_batch_size, config.data.image_size, 1)
  (root / "new_images").mkdir()
  for n, image in enumerate(images):
    Image.fromarray(image).save(root / "new_images" / f"{n}.png")
  return root, config, workdir


def test_the_library_page_runs_as_written_and_gives_the_predict_commands_classes(
    demo_folder, monkeypatch):
  root, config, workdir = demo_folder
  blocks = python_blocks(open(PAGE, encoding="utf-8").read())
  assert len(blocks) == 2, "docs/library.md: expected the example and the jax.jit block"
  monkeypatch.chdir(root)
  namespace = {}
  for block in blocks:
    exec(compile(block, PAGE, "exec"), namespace)  # pylint: disable=exec-used
  out, paths = namespace["out"], namespace["paths"]
  b, s, c = len(paths), config.diffusion.predict_num_samples, config.data.num_classes
  assert b == config.training.eval_batch_size
  assert np.asarray(out["y0"]).shape == (b, s, c)
  assert np.asarray(out["prediction"]).shape == (b,)
  # The page's own jax.jit around sampler.sample: the same key gives the same classes.
  np.testing.assert_array_equal(namespace["prediction"], out["prediction"])
  np.testing.assert_array_equal(namespace["agreement"], out["agreement"])
  # The page's claim: these are the images of `--mode predict`'s first batch, with its key.
  predict.predict_files(config, workdir, "new_images", str(root / "predicted"))
  with open(root / "predicted" / "predictions.csv", newline="") as f:
    rows = {row["path"]: row for row in csv.DictReader(f)}
  names = predict.class_names(config, workdir)
  for path, label, share in zip(paths, np.asarray(out["prediction"]),
                                np.asarray(out["agreement"])):
    row = rows[os.path.join("new_images", os.path.basename(path))]
    assert row["prediction"] == names[label], path
    assert float(row["vote_share"]) == pytest.approx(float(share), abs=1e-6)
