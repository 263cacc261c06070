"""experiments/paired_rounds.py: speed-ups taken within each round of interleaved official and
own timings, against hand arithmetic on made-up JSONs."""

import json
import os
import subprocess
import sys
import warnings

from tests import conftest

sys.path.insert(0, os.path.join(conftest.REPO, "experiments"))
with warnings.catch_warnings():  # via benchmark.py, whose default --config ml_collections loads
  warnings.simplefilter("ignore", DeprecationWarning)  # with load_module()
  import paired_rounds  # pylint: disable=g-import-not-at-top,wrong-import-position

_SCRIPT = os.path.join(conftest.REPO, "experiments", "paired_rounds.py")


def _write(directory, name, content):
  with open(os.path.join(directory, name), "w") as f:
    json.dump(content, f)


def _joint(images_per_s):
  return {"training": [{"stage": "joint", "batch": 32, "images_per_s": images_per_s}]}


def _rounds(tmp_path):
  """Round 1: official joint 16 s, ours 8 s (2×); round 2: 12 s against 8 s (1.5×), and an
  inference row that only ours measured; a file outside the rounds' naming."""
  official = {"official_commit": "23469e7"}
  _write(tmp_path, "round1_1_official_training.json", {**official, **_joint(32 / 16)})
  _write(tmp_path, "round1_2_ours_training.json", _joint(32 / 8))
  _write(tmp_path, "round2_1_official_training.json", {**official, **_joint(32 / 12)})
  _write(tmp_path, "round2_2_ours_training.json", {
      **_joint(32 / 8), "inference": [{"sampler": "official_truncated", "steps": 100,
                                       "batch": 32, "images_per_s": 10.0}]})
  _write(tmp_path, "notes.json", _joint(1.0))
  return tmp_path


def test_speedups_are_taken_within_each_round(tmp_path):
  pairs = paired_rounds.paired_speedups(paired_rounds.load_rounds(str(_rounds(tmp_path))))
  assert list(pairs) == [("training", "joint", 32)]  # the unpaired inference row is left out
  assert [(n, round(o, 6), round(m, 6), round(r, 6)) for n, o, m, r in
          pairs[("training", "joint", 32)]] == [(1, 16.0, 8.0, 2.0), (2, 12.0, 8.0, 1.5)]
  table = paired_rounds.format_table(pairs)
  assert "1: 16.00 / 8.00 = 2.00×; 2: 12.00 / 8.00 = 1.50×" in table
  assert "**1.75×** (1.50–2.00)" in table


def test_the_cli_prints_the_table_and_refuses_a_bad_file_in_one_line(tmp_path):
  ok = subprocess.run([sys.executable, _SCRIPT, str(_rounds(tmp_path))], capture_output=True,
                      text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert "| joint step, batch 32 |" in ok.stdout
  _write(tmp_path, "round3_2_ours_training.json", {"training": [{"stage": "joint"}]})
  bad = subprocess.run([sys.executable, _SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 1
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and "round3_2_ours_training.json" in lines[0] and "images_per_s" in \
      lines[0], bad.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  none = subprocess.run([sys.executable, _SCRIPT, str(empty)], capture_output=True, text=True,
                        check=False)
  assert none.returncode == 1 and "no round<N>_*.json" in none.stderr
