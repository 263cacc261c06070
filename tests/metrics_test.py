"""Metrics against a hand-worked confusion matrix."""

import numpy as np
import pytest

from diffmic_jax.evaluation import evaluate
from diffmic_jax.run import metrics

LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 1, 1, 1, 2, 0])


def _one_hot_probs(preds, num_classes=3, confidence=0.8):
  probs = np.full((len(preds), num_classes), (1 - confidence) / (num_classes - 1))
  probs[np.arange(len(preds)), preds] = confidence
  return probs


def test_hand_worked_confusion_matrix():
  m = metrics.classification_metrics(_one_hot_probs(PREDS), LABELS, 3)
  assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["per_class"]["precision"] == pytest.approx([1 / 2, 2 / 3, 1.0])
  assert m["per_class"]["sensitivity"] == pytest.approx([1 / 2, 1.0, 1 / 2])
  assert m["per_class"]["specificity"] == pytest.approx([3 / 4, 3 / 4, 1.0])
  assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  assert m["f1_weighted"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # balanced support
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  # Quadratic kappa: 1 − Σ w·O / Σ w·E with w_ij = (i − j)²/(C − 1)².
  observed = np.array(m["confusion_matrix"]) / 6
  expected = np.outer([2, 2, 2], [2, 3, 1]) / 36
  w = (np.arange(3)[:, None] - np.arange(3)[None, :]) ** 2 / 4
  assert m["kappa_quadratic"] == pytest.approx(1 - (w * observed).sum() / (w * expected).sum())
  # Every prediction has confidence 0.8 and 4/6 are right: ECE = |0.8 − 2/3|.
  assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))


def test_auc_and_missing_classes():
  probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
  m = metrics.classification_metrics(probs, np.array([0, 0, 1, 1]), 2)
  assert m["auc_macro_ovr"] == pytest.approx(1.0)
  absent = metrics.classification_metrics(_one_hot_probs(np.array([0, 0])), np.array([0, 0]), 3)
  assert absent["per_class"]["sensitivity"][1] is None
  assert absent["auc_macro_ovr"] is None
  assert absent["accuracy"] == 1.0


def test_report_table_and_png(tmp_path):
  m = metrics.classification_metrics(_one_hot_probs(PREDS), LABELS, 3)
  table = metrics.format_table({"diffusion": m}, ["a", "b", "c"])
  assert "diffusion" in table and "specificity" in table
  path = tmp_path / "cm.png"
  metrics.save_confusion_png(m["confusion_matrix"], ["a", "b", "c"], str(path), "t")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_names_the_heads_of_each_ablation():
  probs = _one_hot_probs(PREDS)
  predictions = {"labels": LABELS, "probs": probs, "fused": np.log(probs),
                 "global": np.log(probs), "local": np.log(probs[::-1])}
  assert list(evaluate.score(predictions, 3)) == ["diffusion", "dcg_fused", "dcg_global",
                                                  "dcg_local"]
  assert list(evaluate.score(predictions, 3, dcg=False)) == ["diffusion", "classifier"]
  basic = evaluate.score(predictions, 3, with_diffusion=False, dcg=False)
  assert list(basic) == ["classifier"]
  assert basic["classifier"]["accuracy"] == pytest.approx(4 / 6)


def test_diverged_rows_are_uniform_and_wrong_in_the_calibration_numbers():
  # One confident correct row (confidence 0.9, bin 13 of 15) and one diverged row, which counts
  # as uniform (confidence 1/3, bin 5) and wrong: ECE = ½·|1 − 0.9| + ½·|0 − 1/3| = 0.05 + 1/6,
  # by hand. Dropping the diverged row from the bins but not from N gives 0.05; scoring the
  # uniform row's argmax (class 0, the label) as right gives 0.05 + 1/3.
  probs = np.array([[0.9, 0.05, 0.05], [np.nan, np.nan, np.nan]])
  labels = np.array([0, 0])
  curve = metrics.reliability_curve(probs, labels)
  np.testing.assert_allclose(curve["ece"], 0.05 + 1 / 6, atol=1e-12)
  assert np.all(np.isfinite(curve["confidence"]))
  report = metrics.classification_metrics(probs, labels, num_classes=3)
  np.testing.assert_allclose(report["ece"], 0.05 + 1 / 6, atol=1e-12)
  assert report["num_nonfinite"] == 1 and report["accuracy"] == 0.5
