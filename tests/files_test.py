"""The atomic-write and pytree-flatten helpers (files.py, trees.py)."""

import json
import os

import flax
import numpy as np
import pytest

from diffmic_jax.platform import files
from diffmic_jax.platform import trees


def test_atomic_open_keeps_the_old_file_when_the_writer_fails(tmp_path):
  path = str(tmp_path / "report.json")
  files.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write('{"a": 2, "trunc')
      raise RuntimeError("killed mid-write")
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind
  files.write_text(path, "done")
  assert open(path).read() == "done" and os.listdir(tmp_path) == ["report.json"]


def test_save_figure_writes_a_whole_png(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots()
  ax.plot([0, 1])
  files.save_figure(fig, str(tmp_path / "f.png"), dpi=20)
  plt.close(fig)
  assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == ["f.png"]


@flax.struct.dataclass
class _State:
  step: int
  params: dict


def test_flatten_paths_of_dicts_dataclasses_and_configs():
  x, y = np.zeros(2), np.ones(3)
  assert trees.flatten(_State(step=x, params={"b": {"k": y}, "a": {}})) == {"step": x,
                                                                           "params/b/k": y}
  config = {"data": {"mean": [0.5, 0.4], "path": None}, "seed": 3}
  assert trees.flatten_dicts(config, ".") == {"data.mean": [0.5, 0.4], "data.path": None,
                                              "seed": 3}
  nested = {"params": {"conv": {"kernel": x}}, "batch_stats": {"bn": {"mean": y}}}
  assert trees.unflatten(trees.flatten_dicts(nested)) == nested
