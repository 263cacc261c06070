"""experiments/speed/speed_goals.py: the speed targets computed from benchmark JSONs, against hand
arithmetic on made-up timings."""

import json
import os
import sys
import warnings

import pytest

from tests import conftest

sys.path.insert(0, os.path.join(conftest.REPO, "experiments", "speed"))
with warnings.catch_warnings():  # via benchmark.py, whose default --config ml_collections loads
  warnings.simplefilter("ignore", DeprecationWarning)  # with load_module()
  import speed_goals  # pylint: disable=g-import-not-at-top,wrong-import-position

ZEN3 = {"model": "AMD EPYC 7B13", "vendor": "AuthenticAMD", "vector_extensions": ["avx2", "fma"],
        "cores": 2}
XEON = {"model": "Intel(R) Xeon(R)", "vendor": "GenuineIntel",
        "vector_extensions": ["avx2", "avx512f", "fma"], "cores": 2}
ZEN5 = {"model": "AMD EPYC (family 26, model 2)", "vendor": "AuthenticAMD",
        "vector_extensions": ["avx2", "avx512f", "fma"], "cores": 2}
PAPER = {"image_size": 224, "num_classes": 7, "feature_dim": 6144, "timesteps": 1000,
         "dtype": "float32", "conv_impl": "auto"}


def _result(cpu, training=True):
  """A benchmark JSON: peak 400 GFLOP/s; inference 3.2 s per batch of 32 at 100 steps (official
  0.5 images/s), 1.4 s at 10 respaced steps, 0.8 s at batch 1; joint step 2.1x at 0.9x the
  official memory, warm-up 1.1x."""
  out = {"cpu": cpu, "config": PAPER, "matmul_peak_gflops": 400.0, "inference": [
      {"sampler": "official_truncated", "steps": 100, "batch": 32, "seconds_per_batch": 3.2,
       "seconds_per_image": 0.1, "images_per_s": 10.0, "official_images_per_s": 0.5,
       "speedup": 20.0, "gflop_per_image": 27.3},
      {"sampler": "respaced", "steps": 10, "batch": 32, "seconds_per_batch": 1.4,
       "seconds_per_image": 1.4 / 32, "images_per_s": 32 / 1.4},
      {"sampler": "official_truncated", "steps": 100, "batch": 1, "seconds_per_batch": 0.8,
       "seconds_per_image": 0.8, "images_per_s": 1.25, "official_images_per_s": 0.3,
       "speedup": 1.25 / 0.3}], "training": []}
  if training:
    out["training"] = [
        {"stage": "warmup", "batch": 32, "seconds_per_step": 4.0, "images_per_s": 8.0,
         "speedup": 1.1},
        {"stage": "joint", "batch": 32, "seconds_per_step": 6.0, "images_per_s": 32 / 6,
         "speedup": 2.1, "memory_ratio": 0.9, "peak_memory_bytes": 8.8e9}]
  return out


def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(json.dumps(content))
  return str(path)


def _goals(tmp_path, *results):
  paths = [_write(tmp_path, f"r{i}.json", r) for i, r in enumerate(results)]
  return {g["goal"]: g for g in speed_goals.evaluate(*speed_goals.load(paths))}


def test_goals_of_an_amd_cpu_without_avx512_against_hand_arithmetic(tmp_path):
  goals = _goals(tmp_path, _result(ZEN3))
  assert {name: g["met"] for name, g in goals.items()} == {
      "inference, 100 steps, batch 32 (AMD)": False,  # 20x < 25x
      "inference within 1.5x of its FLOP floor": True,
      "sampler step at batch 32 within 1.3x of two F x F matmuls at peak": False,
      "joint training step, batch 32 (AMD)": True,  # 2.1x >= 2x
      "DCG warm-up step, batch 32": False,  # 1.1x < 1.2x
      "batch-1 latency, 100 steps": False,  # 0.8 s > 0.75 s
      "joint-step peak memory at most the official": True}
  # 0.1 s per image against 27.3 GFLOP at 400 GFLOP/s
  assert goals["inference within 1.5x of its FLOP floor"]["value"] == pytest.approx(
      0.1 / (27.3 / 400))
  # (3.2 - 1.4) s over 100 - 10 denoiser calls, against 2 products of 2 * 32 * 6144^2 FLOPs
  assert goals["sampler step at batch 32 within 1.3x of two F x F matmuls at peak"][
      "value"] == pytest.approx((1.8 / 90) / (2 * 2 * 32 * 6144**2 / 400e9))


def test_an_avx512_cpu_has_the_avx512_targets_and_an_amd_one_both(tmp_path):
  xeon = _goals(tmp_path, _result(XEON))
  assert xeon["inference, 100 steps, batch 32 (AVX-512)"]["met"] is True  # 20x >= 15x
  assert xeon["joint training step, batch 32 (AVX-512)"]["met"] is True
  assert not any("(AMD)" in name for name in xeon)
  zen5 = _goals(tmp_path, _result(ZEN5))
  assert {name for name in zen5 if name.startswith(("inference, 100", "joint training"))} == {
      "inference, 100 steps, batch 32 (AVX-512)", "inference, 100 steps, batch 32 (AMD)",
      "joint training step, batch 32 (AVX-512)", "joint training step, batch 32 (AMD)"}


def test_rows_missing_from_the_first_file_come_from_the_next(tmp_path):
  alone = _result(ZEN3)  # a later run: its inference row must not replace the first file's
  alone["inference"][0].update(speedup=30.0)
  alone["training"][1].update(speedup=1.9, memory_ratio=0.8)
  first_only = _goals(tmp_path, _result(ZEN3, training=False))
  assert first_only["joint training step, batch 32 (AMD)"]["met"] is None
  assert first_only["joint training step, batch 32 (AMD)"]["measured"] == "not measured"
  both = _goals(tmp_path, _result(ZEN3, training=False), alone)
  assert both["joint training step, batch 32 (AMD)"]["value"] == 1.9
  assert both["joint training step, batch 32 (AMD)"]["source"] == "r1.json"
  assert both["inference, 100 steps, batch 32 (AMD)"]["source"] == "r0.json"
  assert both["inference, 100 steps, batch 32 (AMD)"]["value"] == 20.0


def test_a_run_without_the_official_comparison_is_refused_in_one_line(tmp_path, capsys):
  bare = _result(ZEN3)
  for row in bare["inference"] + bare["training"]:
    row.pop("speedup", None)
  path = _write(tmp_path, "bare.json", bare)
  assert speed_goals.main([path]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and path in err and "--compare-official" in err


def test_runs_of_two_machines_are_refused(tmp_path, capsys):
  paths = [_write(tmp_path, "a.json", _result(ZEN3)), _write(tmp_path, "b.json", _result(XEON))]
  assert speed_goals.main(paths) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and paths[1] in err and "one machine" in err
  assert speed_goals.main([paths[0]]) == 0
  assert "| DCG warm-up step, batch 32 | 1.10x (4.00 s per step) |" in capsys.readouterr().out
