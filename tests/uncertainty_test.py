"""Uncertainty scores of several reverse samples, the defer-to-expert curve and calibration,
against hand-counted votes, float64 numpy percentiles and constructed toys."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffmic_jax.diffusion import sampler
from diffmic_jax.evaluation import evaluate
from diffmic_jax.run import metrics

# ŷ₀ of S = 5 samples for B = 2 images and C = 3 classes.
Y0 = np.array([
    [[0.9, 0.1, 0.0], [0.8, 0.3, 0.1], [0.2, 0.7, 0.1], [1.0, 0.0, 0.2], [0.6, 0.5, 0.4]],
    [[0.1, 0.2, 0.9], [0.0, 0.1, 0.8], [0.2, 0.0, 1.1], [0.1, 0.3, 0.7], [0.0, 0.2, 0.95]],
], np.float32)


def test_vote_probabilities_are_a_hand_counted_vote():
  out = sampler.sample_uncertainty(jnp.asarray(Y0), jnp.asarray([0, 2]))
  # Image 0: argmaxes 0, 0, 1, 0, 0 -> 4/5 for class 0, 1/5 for class 1. Image 1: all class 2.
  np.testing.assert_allclose(out["vote_probs"], [[0.8, 0.2, 0.0], [0.0, 0.0, 1.0]], atol=1e-7)
  np.testing.assert_allclose(out["agreement"], [0.8, 1.0], atol=1e-7)


def test_prediction_is_the_vote_and_a_tie_goes_to_the_larger_mean_softmax():
  # Image 0 (the case): one sample is far more confident in class 2, so the mean
  # softmax favours class 2 while 3 of 4 samples vote class 0. Image 1: a 2-2 tie between
  # classes 1 and 2, with the larger mean softmax on class 2. Image 2: unanimous class 1.
  y0 = np.array([
      [[0.5, 0.0, 0.4], [0.5, 0.0, 0.4], [0.5, 0.0, 0.4], [-9.0, -9.0, 9.0]],
      [[0.0, 0.6, 0.5], [0.0, 0.6, 0.5], [0.0, 0.1, 2.0], [0.0, 0.1, 2.0]],
      [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
  ], np.float32)
  out = sampler.sample_uncertainty(jnp.asarray(y0), jnp.asarray([0, 2, 1]))
  mean_softmax = np.exp(y0) / np.exp(y0).sum(-1, keepdims=True)
  mean_softmax = mean_softmax.mean(1)
  assert mean_softmax[0].argmax() == 2  # the old rule named a class with 1 vote of 4
  pred = np.asarray(sampler.vote_prediction(out["vote_probs"], jnp.asarray(mean_softmax)))
  np.testing.assert_array_equal(pred, [0, 2, 1])
  # The same rule on numpy arrays (evaluate's host path), and -1 for a row without a finite ŷ₀.
  np.testing.assert_array_equal(
      evaluate.predicted_class(np.asarray(out["vote_probs"]), mean_softmax), [0, 2, 1])
  nan_row = mean_softmax.copy()
  nan_row[1] = np.nan
  np.testing.assert_array_equal(evaluate.predicted_class(np.asarray(out["vote_probs"]), nan_row),
                                [0, -1, 1])
  # Entropy of the vote: 3:1 split, 2:2 split, unanimous (hand-computed, nats).
  np.testing.assert_allclose(out["vote_entropy"],
                             [-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), np.log(2.0), 0.0],
                             atol=1e-6)


def test_metrics_score_the_given_predictions_and_auc_the_probabilities():
  labels = np.array([0, 0, 1, 1])
  probs = np.array([[0.4, 0.6], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]])
  m = metrics.classification_metrics(probs, labels, 2, predictions=np.array([0, 0, 1, -1]))
  assert m["accuracy"] == 0.75  # the -1 (no finite sample) counts as wrong
  assert m["confusion_matrix"] == [[2, 0], [1, 1]]
  assert m["auc_macro_ovr"] == metrics.classification_metrics(probs, labels, 2)["auc_macro_ovr"]


def test_intervals_are_percentiles_over_samples_and_the_separation_flag():
  out = sampler.sample_uncertainty(jnp.asarray(Y0), jnp.asarray([0, 2]))
  y0 = Y0.astype(np.float64)
  expected = np.stack([np.percentile(y0, 2.5, axis=1), np.percentile(y0, 97.5, axis=1)], axis=1)
  np.testing.assert_allclose(out["y0_interval"], expected, rtol=1e-5, atol=1e-6)
  # Image 0: class 0 spans [~0.24, ~0.98] and overlaps class 1's [~0.01, ~0.68].
  # Image 1: class 2 spans [~0.71, ~1.08], above classes 0 ([0, ~0.2]) and 1 ([~0.01, ~0.29]).
  np.testing.assert_array_equal(out["interval_separated"], [False, True])


def test_defer_curve_of_a_score_that_ranks_every_error_first_rises_to_one():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  preds = labels.copy()
  wrong = [2, 5, 7]  # 30% errors
  preds[wrong] = (labels[wrong] + 1) % 3
  score = np.zeros(10)
  score[wrong] = [0.9, 0.8, 0.95]
  curve = metrics.defer_curve(score, preds, labels, 3)
  assert curve["fraction"][0] == 0.0 and curve["fraction"][-1] == 0.5
  assert curve["accuracy"][0] == pytest.approx(0.7)
  assert curve["num_kept"][0] == 10 and curve["num_kept"][-1] == 5
  for fraction, accuracy, f1 in zip(curve["fraction"], curve["accuracy"], curve["f1_macro"]):
    if fraction >= 0.3:
      assert accuracy == 1.0 and f1 == 1.0
  assert all(a <= b for a, b in zip(curve["accuracy"], curve["accuracy"][1:]))
  # A score that ranks the errors last keeps them: accuracy only falls.
  worst = metrics.defer_curve(-score, preds, labels, 3)
  assert worst["accuracy"][-1] == pytest.approx(2 / 5)


def test_risk_coverage_and_aurc_by_hand():
  # Sorted by uncertainty: right, wrong, right, wrong. Kept k = 1..4 holds 0, 1, 1, 2 errors.
  score = np.array([0.3, 0.1, 0.4, 0.2])
  correct = np.array([True, True, False, False])
  curve = metrics.risk_coverage(score, correct)
  np.testing.assert_allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(curve["risk"], [0.0, 1 / 2, 1 / 3, 2 / 4])
  assert metrics.aurc(score, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
  # Errors ranked last: the floor; first: the ceiling (risks 1, 1, 2/3, 1/2).
  assert metrics.aurc([0, 0.1, 0.2, 0.3], [1, 1, 0, 0]) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
  assert metrics.optimal_aurc(4, 2) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
  assert metrics.optimal_aurc(3, 0) == 0.0 and metrics.optimal_aurc(2, 2) == 1.0
  assert metrics.aurc([0.3, 0.2, 0.1, 0], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def test_aurc_takes_tied_scores_in_random_order_in_expectation():
  # One tie group of 4 with 2 errors, then one error alone. Expected errors among the first k
  # of the group: k/2, so risks 1/2, 1/2, 1/2, 1/2; then 3/5. Any input order gives the same.
  correct = np.array([True, False, True, False, False])
  score = np.array([0.2, 0.2, 0.2, 0.2, 0.9])
  want = (4 * 0.5 + 3 / 5) / 5
  assert metrics.aurc(score, correct) == pytest.approx(want)
  for perm in ([1, 3, 0, 2, 4], [4, 3, 2, 1, 0]):
    assert metrics.aurc(score[perm], correct[perm]) == pytest.approx(want)
  # A non-finite score is the most uncertain: the diverged case is referred first.
  assert metrics.aurc([np.nan, 0.1], [False, True]) == pytest.approx((0 + 1 / 2) / 2)
  assert metrics.defer_curve(score, np.where(correct, 0, 1), np.zeros(5, int), 2)["aurc"] == (
      pytest.approx(want))


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
  # 10 cases at confidence 0.7 of which 7 are right; 10 at 0.9 of which 9 are right.
  probs = np.array([[0.7, 0.3]] * 10 + [[0.1, 0.9]] * 10)
  labels = np.array([0] * 7 + [1] * 3 + [1] * 9 + [0])
  curve = metrics.reliability_curve(probs, labels)
  assert curve["ece"] == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(curve["confidence"], [0.7, 0.9])
  np.testing.assert_allclose(curve["accuracy"], [0.7, 0.9])
  overconfident = metrics.reliability_curve(np.array([[0.9, 0.1]] * 10), labels[:10])
  assert overconfident["ece"] == pytest.approx(0.9 - 0.7)


def test_uncertainty_report_writes_json_and_pngs(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 40)
  logits = rng.normal(size=(40, 3)) + 2 * np.eye(3)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  predictions = {"labels": labels, "probs": probs, "vote_probs": np.eye(3)[probs.argmax(1)],
                 "prediction": probs.argmax(1), "vote_entropy": np.zeros(40),
                 "entropy": -(probs * np.log(probs)).sum(1), "agreement": probs.max(1),
                 "fused": logits, "global": logits, "local": logits[::-1]}
  report = evaluate.uncertainty_report(predictions, 3)
  assert len(report["defer"]) == 5 and len(report["calibration"]) == 5
  evaluate.write_uncertainty_report(report, str(tmp_path), "test")
  for name in ("test_uncertainty.json", "test_defer.png", "test_reliability.png"):
    assert (tmp_path / "eval" / name).stat().st_size > 0
