"""`--mode predict` end to end on the tiny config: folders, CSVs, bad files, and agreement with
`--mode eval` on the same images."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffmic_jax.data import demo
from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import evaluate
from diffmic_jax.evaluation import predict
from diffmic_jax.platform import errors
from diffmic_jax.run import checkpointing
from diffmic_jax.training import train

from tests import conftest


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _test_split_folder(config, workdir, root):
  """Writes the test split's images as PNGs (in split order, nested two levels deep) plus bad
  files; returns the good paths in the order a folder search returns them."""
  split = json.load(open(os.path.join(workdir, "split.json")))
  images, _ = demo.make_demo(config.data.demo_num_examples, config.data.image_size,
                             config.data.demo_seed)
  paths = []
  for n, example_id in enumerate(split["test"]):
    folder = root / "a" if n < len(split["test"]) // 2 else root / "a" / "b"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{n:03d}_{example_id}.png"
    Image.fromarray(images[int(example_id.split("_")[1])]).save(path)
    paths.append(str(path))
  (root / "a" / "0015_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
  (root / "a" / "b" / "empty.jpg").write_bytes(b"")
  (root / "notes.txt").write_text("not an image")
  return split, paths


def _main(*args):
  env = {**os.environ, "PYTHONPATH": conftest.REPO}
  return subprocess.run([sys.executable, "-m", "diffmic_jax.main", *args], cwd=conftest.REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_predict_folder_matches_eval_mode_and_lists_bad_files(trained, tiny_config, tmp_path):
  config = tiny_config()
  split, good = _test_split_folder(config, trained, tmp_path / "in")
  out = tmp_path / "out"
  proc = _main("--config", "configs/test.py", "--workdir", trained, "--mode", "predict",
               "--input", str(tmp_path / "in"), "--output", str(out), "--overlays")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _read(out / "predictions.csv")
  assert [r["path"] for r in rows] == good
  skipped = {os.path.basename(r["path"]): r["reason"] for r in _read(out / "skipped.csv")}
  assert set(skipped) == {"0015_corrupt.png", "empty.jpg", "notes.txt"}
  assert "not a readable image" in skipped["notes.txt"]
  # The same images in the same order: exactly the predictions of --mode eval.
  evaluated = _read(os.path.join(trained, "eval", "test_predictions.csv"))
  assert [r["id"] for r in evaluated] == split["test"]
  names = split["class_names"]
  for mine, theirs in zip(rows, evaluated):
    assert mine["prediction"] == names[int(theirs["prediction"])]
    assert mine["dcg_prediction"] == names[int(theirs["dcg_fused_prediction"])]
    for name in names:
      assert mine[f"p_{name}"] == theirs[f"p_{name}"]
    votes = [float(mine[f"vote_{n}"]) for n in names]
    assert sum(votes) == pytest.approx(1.0) and float(mine["vote_share"]) == max(votes)
    assert mine["vote_share"] == theirs["vote_share"]
  for name in ("test_uncertainty.json", "test_defer.png", "test_reliability.png"):
    assert os.path.exists(os.path.join(trained, "eval", name))
  overlays = sorted(os.listdir(out / "overlays"))
  assert len(overlays) == len(good) and overlays[0].startswith("00000_000_demo_")
  # --mode eval explains training.eval_overlays test images (the whole tiny test split).
  assert len(os.listdir(os.path.join(trained, "eval", "overlays"))) == len(split["test"])


def test_batch_size_for_a_few_images():
  assert predict.batch_size_for(1, 64, 1) == 1
  assert predict.batch_size_for(3, 64, 2) == 4  # a multiple of the devices
  assert predict.batch_size_for(64, 64, 1) == 64
  assert predict.batch_size_for(500, 64, 2) == 64
  assert predict.batch_size_for(0, 64, 2) == 2  # nothing readable: one tiny padded batch


def test_a_few_images_run_as_one_small_batch_with_eval_mode_predictions(
    trained, tiny_config, tmp_path, monkeypatch):
  """Fewer images than training.eval_batch_size: one batch of just those images, whose rows
  get the noise of the full batch, so --mode eval's predictions (float32 round-off aside)."""
  config = tiny_config()
  _, good = _test_split_folder(config, trained, tmp_path / "in")
  few = 3
  assert config.training.eval_batch_size > few
  with open(tmp_path / "few.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path"]] + [[p] for p in good[:few]])
  shapes = []
  real = evaluate.predict
  def recording(models, variables, batches, *args, **kwargs):
    shapes.extend(b["image"].shape[0] for b in batches)
    return real(models, variables, batches, *args, **kwargs)
  monkeypatch.setattr(evaluate, "predict", recording)
  predict.predict_files(config, trained, str(tmp_path / "few.csv"), str(tmp_path / "out"))
  assert shapes == [few]
  rows = _read(tmp_path / "out" / "predictions.csv")
  evaluated = _read(os.path.join(trained, "eval", "test_predictions.csv"))[:few]
  names = json.load(open(os.path.join(trained, "split.json")))["class_names"]
  assert [r["path"] for r in rows] == good[:few]
  for mine, theirs in zip(rows, evaluated):
    assert mine["prediction"] == names[int(theirs["prediction"])]
    assert mine["vote_share"] == theirs["vote_share"]
    np.testing.assert_allclose([float(mine[f"p_{n}"]) for n in names],
                               [float(theirs[f"p_{n}"]) for n in names], atol=2e-6)


def test_predict_csv_with_relative_missing_and_bad_paths(trained, tiny_config, tmp_path):
  _, good = _test_split_folder(tiny_config(), trained, tmp_path / "in")
  listing = tmp_path / "in" / "list.csv"
  chosen = [os.path.relpath(good[3], listing.parent), good[0], "a/0015_corrupt.png",
            "missing.png"]
  with open(listing, "w", newline="") as f:
    csv.writer(f).writerows([["label", "path"]] + [["x", p] for p in chosen])
  result = predict.predict_files(tiny_config(), trained, str(listing), str(tmp_path / "out"))
  assert result["num_predicted"] == 2 and result["num_skipped"] == 2
  rows = _read(tmp_path / "out" / "predictions.csv")
  assert [os.path.abspath(r["path"]) for r in rows] == [good[3], good[0]]
  reasons = [r["reason"] for r in _read(tmp_path / "out" / "skipped.csv")]
  assert "corrupt" in reasons[0] and reasons[1] == "file not found"
  for r in rows:
    probs = [float(r[f"p_{n}"]) for n in predict.class_names(tiny_config(), trained)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_predict_bad_input_is_a_user_error(trained, tiny_config, tmp_path):
  listing = tmp_path / "list.csv"
  listing.write_text("file,label\na.png,0\n")
  with pytest.raises(ValueError, match="no 'path' column"):
    predict.predict_files(tiny_config(), trained, str(listing), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    predict.predict_files(tiny_config(), trained, str(tmp_path / "nothing"))
  assert not (tmp_path / "out").exists()


def test_predict_with_no_readable_file_writes_empty_results(trained, tiny_config, tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "notes.txt").write_text("not an image")
  result = predict.predict_files(tiny_config(), trained, str(tmp_path / "in"),
                                 str(tmp_path / "out"), overlays=True)
  assert result["num_predicted"] == 0 and result["num_skipped"] == 1
  assert _read(tmp_path / "out" / "predictions.csv") == []
  assert len(_read(tmp_path / "out" / "skipped.csv")) == 1


def test_odd_file_names_and_unreadable_folders_are_kept_and_listed(trained, tiny_config,
                                                                     tmp_path, monkeypatch):
  _, good = _test_split_folder(tiny_config(), trained, tmp_path / "in")
  odd = os.path.join(str(tmp_path / "in"), os.fsdecode(b"caf\xe9_latin1.png"))  # not UTF-8
  os.rename(good[0], odd)
  (tmp_path / "in" / "locked").mkdir()
  scandir = os.scandir
  def refuse_locked(path="."):
    if os.path.basename(os.fspath(path)) == "locked":  # as for a folder of mode 000
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return scandir(path)
  monkeypatch.setattr(os, "scandir", refuse_locked)
  result = predict.predict_files(tiny_config(), trained, str(tmp_path / "in"),
                                 str(tmp_path / "out"))
  assert result["num_predicted"] == len(good)
  with open(tmp_path / "out" / "predictions.csv", "rb") as f:
    assert os.fsencode(odd) in f.read()  # the file's own bytes
  with open(tmp_path / "out" / "skipped.csv", newline="", encoding="utf-8") as f:
    skipped = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
  assert skipped["locked"] == "unreadable folder (Permission denied)"


def test_rows_are_written_as_batches_finish(trained, tiny_config, tmp_path, monkeypatch):
  _test_split_folder(tiny_config(), trained, tmp_path / "in")
  monkeypatch.setattr(predict, "CHUNK_BATCHES", 1)
  # Batch by batch, each batch keeps its key: still exactly --mode eval's probabilities.
  predict.predict_files(tiny_config(), trained, str(tmp_path / "in"), str(tmp_path / "whole"))
  evaluated = _read(os.path.join(trained, "eval", "test_predictions.csv"))
  rows = _read(tmp_path / "whole" / "predictions.csv")
  assert len(rows) == len(evaluated) > tiny_config().training.eval_batch_size
  for mine, theirs in zip(rows, evaluated):
    assert [v for k, v in mine.items() if k.startswith("p_")] == [
        v for k, v in theirs.items() if k.startswith("p_")]
  calls = []
  real = evaluate.predict
  def crash_on_second(*args, **kwargs):
    calls.append(kwargs["first_batch"])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)
  monkeypatch.setattr(evaluate, "predict", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    predict.predict_files(tiny_config(), trained, str(tmp_path / "in"), str(tmp_path / "out"))
  assert calls == [0, 1]
  assert len(_read(tmp_path / "out" / "predictions.csv")) == tiny_config().training.eval_batch_size


def test_bad_output_and_latin1_csv_are_refused_before_any_work(trained, tiny_config, tmp_path,
                                                               monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("a checkpoint was restored")
  monkeypatch.setattr(evaluate, "load_variables", never)
  (tmp_path / "in").mkdir()
  (tmp_path / "taken").write_text("a file")
  with pytest.raises(errors.UserError, match="--output .*taken: an existing file"):
    predict.predict_files(tiny_config(), trained, str(tmp_path / "in"), str(tmp_path / "taken"))
  listing = tmp_path / "latin1.csv"
  listing.write_bytes("path\nr\xe9tine.png\n".encode("latin-1"))
  with pytest.raises(errors.UserError, match="latin1.csv: not UTF-8"):
    predict.predict_files(tiny_config(), trained, str(listing), str(tmp_path / "out"))
  assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "out").exists()


def test_latest_checkpoint_deleted_while_read_is_read_again(trained, tiny_config, tmp_path,
                                                            monkeypatch, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  restore = checkpointing.Checkpointer.restore_fields
  deleted = []
  def deleted_by_training(self, kind, step, abstract_state, fields):
    if not deleted:  # the run's next save removes the checkpoint being read
      deleted.append(step)
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    return restore(self, kind, step, abstract_state, fields)
  monkeypatch.setattr(checkpointing.Checkpointer, "restore_fields", deleted_by_training)
  _, variables = evaluate.load_variables(tiny_config(), workdir, "latest")
  assert deleted == [steps[-1]] and variables["denoiser"]
  assert "was deleted while it was read" in caplog.text


def test_a_unanimous_vote_has_entropy_zero_not_minus_zero(tmp_path):
  """First-hour round: -Σ p log p of a unanimous vote was -0.0, which both CSVs (and the
  overlays' titles) printed as '-0.000000' for every confident case."""
  certain = np.array([[0.0, 1.0]])
  vote_entropy = np.asarray(sampler.entropy(certain))
  assert vote_entropy[0] == 0 and not np.signbit(vote_entropy[0])
  predictions = {"prediction": np.array([1]), "labels": np.array([1]),
                 "vote_probs": certain, "vote_entropy": vote_entropy,
                 "probs": np.array([[0.4, 0.6]]), "entropy": np.asarray(sampler.entropy(certain)),
                 "interval_separated": np.array([True]), "fused": np.array([[0.0, 2.0]])}
  row = dict(zip(predict.prediction_header(["a", "b"]),
                 predict.prediction_rows(["x.png"], predictions, ["a", "b"])[0]))
  assert row["vote_entropy"] == "0.000000" and row["softmax_entropy"] == "0.000000"
  (tmp_path / "eval").mkdir()
  evaluate.write_predictions(predictions, ["x"], ["a", "b"], str(tmp_path), "test")
  with open(tmp_path / "eval" / "test_predictions.csv", newline="") as f:
    assert next(csv.DictReader(f))["vote_entropy"] == "0.000000"
