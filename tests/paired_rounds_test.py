"""experiments/speed/paired_rounds.py: speed-ups taken within each round of interleaved official and
own timings, against hand arithmetic on made-up JSONs."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from diffmic_jax.platform import errors
from tests import conftest

sys.path.insert(0, os.path.join(conftest.REPO, "experiments", "speed"))
with warnings.catch_warnings():  # via benchmark.py, whose default --config ml_collections loads
  warnings.simplefilter("ignore", DeprecationWarning)  # with load_module()
  import paired_rounds  # pylint: disable=g-import-not-at-top,wrong-import-position

_SCRIPT = os.path.join(conftest.REPO, "experiments", "speed", "paired_rounds.py")


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


_ZEN5 = {"model": "AMD EPYC (family 26, model 2)", "vendor": "AuthenticAMD",
         "vector_extensions": ["avx2", "avx512f"]}


def _goal_rounds(tmp_path, cpus=(_ZEN5, _ZEN5)):
  """Joint step 2.0× then 1.5×, warm-up step 1.25× then 1.10× (official 5.0 and 4.4 s against
  our 4.0 s), our JSONs naming `cpus`."""
  official = {"official_commit": "23469e7"}
  for number, (joint_s, warmup_s), cpu in zip((1, 2), ((16, 5.0), (12, 4.4)), cpus):
    _write(tmp_path, f"round{number}_1_official_training.json", {**official, "training": [
        {"stage": "joint", "batch": 32, "images_per_s": 32 / joint_s},
        {"stage": "warmup", "batch": 32, "images_per_s": 32 / warmup_s}]})
    _write(tmp_path, f"round{number}_2_ours_training.json", {"cpu": cpu, "training": [
        {"stage": "joint", "batch": 32, "images_per_s": 32 / 8},
        {"stage": "warmup", "batch": 32, "images_per_s": 32 / 4.0}]})
  return str(tmp_path)


def test_the_goal_table_counts_the_rounds_each_goal_was_met(tmp_path):
  rounds = paired_rounds.load_rounds(_goal_rounds(tmp_path))
  table = paired_rounds.goal_table(rounds, paired_rounds.paired_speedups(rounds))
  # An AMD CPU with AVX-512 is held to both kinds' joint targets (1.5× and 2×).
  assert "| joint step, batch 32 ≥ 1.5× (AVX-512) | 2 of 2 | 1.75× |" in table
  assert "| joint step, batch 32 ≥ 2× (AMD) | 1 of 2 | 1.75× |" in table
  assert "| warmup step, batch 32 ≥ 1.2× (every kind) | 1 of 2 | 1.18× |" in table
  assert "inference" not in table  # no round measured it


def test_the_goal_table_refuses_rounds_of_different_cpus(tmp_path):
  other = {**_ZEN5, "model": "Intel(R) Xeon(R) Platinum 8488C"}
  rounds = paired_rounds.load_rounds(_goal_rounds(tmp_path, cpus=(_ZEN5, other)))
  with pytest.raises(errors.UserError, match="different CPUs"):
    paired_rounds.goal_table(rounds, paired_rounds.paired_speedups(rounds))


def _official_dir(tmp_path):
  official = tmp_path / "DiffMIC"
  official.mkdir()
  (official / "diffusion_trainer.py").write_text("")
  return str(official)


class _FakeRunner:
  """Stands in for subprocess.run: records each argv and writes the JSON named after its
  --json, a made-up timing of the side its script is; `fail_at` (1-based) exits 1 instead."""

  def __init__(self, fail_at=None, write=True):
    self.calls, self.fail_at, self.write = [], fail_at, write

  def __call__(self, argv, stdout, stderr, check):
    del stderr, check
    self.calls.append(argv)
    stdout.write("timing\n")
    if len(self.calls) == self.fail_at:
      return subprocess.CompletedProcess(argv, 1)
    if self.write:
      official = argv[1].endswith("official_timing.py")
      content = ({"official_commit": "23469e7", **_joint(32 / 16)} if official else
                 {"cpu": _ZEN5, **_joint(32 / 8)})
      _write(os.path.dirname(argv[-1]), os.path.basename(argv[-1]), content)
    return subprocess.CompletedProcess(argv, 0)


def test_run_rounds_appends_rounds_in_the_paired_order(tmp_path):
  out = tmp_path / "rounds"
  out.mkdir()
  _write(out, "round2_2_ours_training.json", _joint(1.0))  # an earlier round: kept as it is
  runner = _FakeRunner()
  numbers = paired_rounds.run_rounds(str(out), 2, _official_dir(tmp_path), "/tmp/tvlib",
                                     threads=2, runner=runner)
  assert numbers == [3, 4]
  scripts = [(os.path.basename(a[1]), a[a.index("--only") + 1], os.path.basename(a[-1]))
             for a in runner.calls]
  assert scripts[:4] == [
      ("official_timing.py", "training", "round3_1_official_training.json"),
      ("benchmark.py", "training", "round3_2_ours_training.json"),
      ("benchmark.py", "inference", "round3_3_ours_inference.json"),
      ("official_timing.py", "inference", "round3_4_official_inference.json")]
  assert [s[2][:7] for s in scripts[4:]] == ["round4_"] * 4
  assert all("--extra-path" in a and "/tmp/tvlib" in a for a in runner.calls
             if a[1].endswith("official_timing.py"))
  assert (out / "round3_1_official_training.log").read_text() == "timing\n"
  assert json.loads((out / "round2_2_ours_training.json").read_text()) == _joint(1.0)
  pairs = paired_rounds.paired_speedups(paired_rounds.load_rounds(str(out)))
  assert [ratio for *_, ratio in pairs[("training", "joint", 32)]] == [2.0, 2.0]


def test_run_rounds_stops_at_the_first_failing_command(tmp_path):
  out, official = tmp_path / "rounds", _official_dir(tmp_path)
  runner = _FakeRunner(fail_at=2)
  with pytest.raises(errors.UserError, match=r"round1_2_ours_training\.json exited with status 1"
                     r".*round1_2_ours_training\.log"):
    paired_rounds.run_rounds(str(out), 3, official, runner=runner)
  assert len(runner.calls) == 2
  assert sorted(os.listdir(out)) == ["round1_1_official_training.json",
                                     "round1_1_official_training.log",
                                     "round1_2_ours_training.log"]
  # The next run starts a new round (2): round 1's partial files stay as they are.
  with pytest.raises(errors.UserError, match=r"round2_1_official_training\.json wrote no JSON"):
    paired_rounds.run_rounds(str(out), 1, official, runner=_FakeRunner(write=False))
  assert (out / "round1_1_official_training.json").exists()


def test_the_cli_refuses_a_run_without_the_official_code_in_one_line(tmp_path):
  for extra in ([], ["--official-dir", str(tmp_path)]):
    bad = subprocess.run([sys.executable, _SCRIPT, str(tmp_path / "rounds"), "--run", *extra],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "--official-dir" in lines[0], bad.stderr
  assert not (tmp_path / "rounds").exists()
