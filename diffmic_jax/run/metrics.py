"""Classification metrics over a whole split (never averages of batch means), host-side.

Built on scikit-learn; specificity and the expected calibration error, which scikit-learn does
not provide, are derived from the confusion matrix and the probabilities.
"""

import numpy as np
from sklearn import metrics as skm

from diffmic_jax.platform import files


# Keys of `classification_metrics` that may choose the best checkpoint on validation
# (config.training.select_metric; official: accuracy).
SELECT_METRICS = ("accuracy", "f1_macro", "balanced_accuracy")


def _uniform_if_diverged(probs):
  """probs [N, C] with every row holding a non-finite entry (a diverged prediction) replaced by
  the uniform 1/C, and the [N] mask of the finite rows."""
  probs = np.asarray(probs, np.float64)
  finite = np.isfinite(probs).all(axis=1)
  return np.where(finite[:, None], probs, 1.0 / probs.shape[1]), finite


def _confidence_and_correct(probs, labels):
  """[N] top probability and [N] 0/1 correctness; a diverged row is uniform and wrong."""
  probs, finite = _uniform_if_diverged(probs)
  correct = finite & (probs.argmax(axis=1) == np.asarray(labels))
  return probs.max(axis=1), correct.astype(np.float64)


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """ECE, Σ_b (n_b / N) · |accuracy_b − confidence_b| over equal-width confidence bins.
  probs: [N, C] (a diverged, non-finite row counts as uniform and wrong); labels: [N]."""
  confidence, correct = _confidence_and_correct(probs, labels)
  bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(ece)


def macro_ovr_auc(probs, labels, num_classes: int):
  """Macro one-vs-rest ROC AUC over the classes present with both outcomes; None if none."""
  aucs = [skm.roc_auc_score(labels == c, probs[:, c]) for c in range(num_classes)
          if 0 < np.sum(labels == c) < len(labels)]
  return float(np.mean(aucs)) if aucs else None


def per_class(confusion):
  """Per-class precision, sensitivity (recall) and specificity from a [C, C] matrix (rows = truth)."""
  tp = np.diag(confusion).astype(np.float64)
  fp = confusion.sum(axis=0) - tp
  fn = confusion.sum(axis=1) - tp
  tn = confusion.sum() - tp - fp - fn
  ratio = lambda a, b: [float(x) if d > 0 else None for x, d in zip(a / np.maximum(b, 1), b)]
  return {"precision": ratio(tp, tp + fp), "sensitivity": ratio(tp, tp + fn),
          "specificity": ratio(tn, tn + fp)}


def classification_metrics(probs, labels, num_classes: int, predictions=None) -> dict:
  """All metrics of one classifier on one split.

  Args:
    probs: [N, C] class probabilities (softmax of ŷ₀ or of guidance logits); a row with a
      non-finite entry (a diverged prediction) counts as wrong: its prediction is another class
      than the label, its probabilities uniform for AUC and ECE.
    labels: [N] integer labels.
    num_classes: C.
    predictions: [N] the classifier's classes when its rule is not argmax `probs` (the
      diffusion head's vote, `sampler.vote_prediction`; -1 = none, counted as wrong); the
      confusion matrix, accuracy, F1, kappa and sensitivities score them, AUC and ECE `probs`.

  Returns:
    accuracy, macro/weighted F1, quadratic-weighted kappa, balanced accuracy, macro OvR AUC,
    ECE, per-class precision/sensitivity/specificity, the confusion matrix (rows = truth) and
    num_nonfinite (rows counted as wrong).
  """
  labels = np.asarray(labels, np.int64)
  ece = expected_calibration_error(probs, labels)
  probs, finite = _uniform_if_diverged(probs)
  chosen = probs.argmax(axis=1) if predictions is None else np.asarray(predictions, np.int64)
  preds = np.where(finite & (chosen >= 0), chosen, (labels + 1) % num_classes)
  classes = list(range(num_classes))
  confusion = skm.confusion_matrix(labels, preds, labels=classes)
  f1 = lambda avg: float(skm.f1_score(labels, preds, labels=classes, average=avg, zero_division=0))
  both_constant = len(np.unique(labels)) == 1 and len(np.unique(preds)) == 1
  return {
      "num_examples": int(len(labels)),
      "accuracy": float(np.mean(preds == labels)),
      "f1_macro": f1("macro"),
      "f1_weighted": f1("weighted"),
      # kappa is undefined (0/0) when truth and prediction are one identical class.
      "kappa_quadratic": 1.0 if both_constant and preds[0] == labels[0] else float(
          np.nan_to_num(skm.cohen_kappa_score(labels, preds, labels=classes, weights="quadratic"))),
      "balanced_accuracy": float(np.mean([r for r in per_class(confusion)["sensitivity"]
                                          if r is not None])),
      "auc_macro_ovr": macro_ovr_auc(probs, labels, num_classes),
      "ece": ece,
      "per_class": per_class(confusion),
      "confusion_matrix": confusion.tolist(),
      "num_nonfinite": int(np.sum(~finite)),
  }


def format_table(results: dict, class_names) -> str:
  """A plain-text table: one row per classifier head, then the diffusion head's per-class rows."""
  keys = ["accuracy", "f1_macro", "f1_weighted", "kappa_quadratic", "balanced_accuracy",
          "auc_macro_ovr", "ece"]
  lines = [f"{'head':<16}" + "".join(f"{k:>18}" for k in keys)]
  for head, m in results.items():
    cells = "".join(f"{m[k]:>18.4f}" if m[k] is not None else f"{'n/a':>18}" for k in keys)
    lines.append(f"{head:<16}{cells}")
  main = next(iter(results.values()))
  lines.append(f"\n{'class':<16}{'precision':>12}{'sensitivity':>12}{'specificity':>12}")
  fmt = lambda v: f"{v:>12.4f}" if v is not None else f"{'n/a':>12}"
  for i, name in enumerate(class_names):
    pc = main["per_class"]
    lines.append(f"{name:<16}" + fmt(pc["precision"][i]) + fmt(pc["sensitivity"][i])
                 + fmt(pc["specificity"][i]))
  return "\n".join(lines)


def save_confusion_png(confusion, class_names, path, title: str) -> None:
  """Writes the confusion matrix as a PNG (matplotlib, headless backend) to a path (atomically)
  or a binary file object."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  display = skm.ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(class_names))
  fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 3, 1.2 * len(class_names) + 2))
  display.plot(ax=ax, colorbar=False, xticks_rotation=45)
  ax.set_title(title)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def write_json(path: str, payload) -> None:
  """Writes JSON atomically (temporary file then rename)."""
  files.write_json(path, payload)


# ----------------------------------------------------------------------------- uncertainty


DEFER_FRACTIONS = tuple(np.round(np.arange(0.0, 0.501, 0.05), 2))


def risk_coverage(uncertainty, correct) -> dict:
  """The risk-coverage curve of selective classification, tie-aware.

  The k least uncertain cases are kept, k = 1..N; the risk at coverage k/N is their error rate.
  Cases with equal uncertainty are taken in random order, in expectation: inside a tie group
  of g cases with e errors, each kept case adds e/g expected errors (a discrete score such as
  the agreement of S samples has large tie groups, and a fixed order would favour whichever
  cases come first). A non-finite uncertainty counts as the largest.

  Args:
    uncertainty: [N] score, larger = less sure.
    correct: [N] whether each case's prediction is right.

  Returns:
    {'coverage': [N] k/N, 'risk': [N] expected error rate of the k kept cases}.
  """
  score = np.asarray(uncertainty, np.float64)
  score = np.where(np.isfinite(score), score, np.inf)
  order = np.argsort(score, kind="stable")
  score, errors = score[order], 1.0 - np.asarray(correct, np.float64)[order]
  _, start, size = np.unique(score, return_index=True, return_counts=True)
  group_errors = np.add.reduceat(errors, start)
  before = np.concatenate([[0.0], np.cumsum(group_errors)[:-1]])
  group = np.repeat(np.arange(len(start)), size)
  kept = np.arange(1, len(score) + 1)
  expected = before[group] + (kept - start[group]) * group_errors[group] / size[group]
  return {"coverage": kept / len(score), "risk": expected / kept}


def aurc(uncertainty, correct) -> float:
  """Area under the risk-coverage curve (`risk_coverage`), the mean risk over k = 1..N: lower
  is better; a ranking that puts every error last reaches the error rate's floor."""
  return float(np.mean(risk_coverage(uncertainty, correct)["risk"]))


def optimal_aurc(num_cases: int, num_errors: int) -> float:
  """The AURC of the ranking that refers every error first: the floor set by the error rate
  alone. AURC minus it (E-AURC, Geifman et al. 2019) measures the ranking apart from the
  accuracy, so heads of different accuracy can be compared by how well they rank their errors."""
  kept = np.arange(1, num_cases + 1)
  return float(np.mean(np.maximum(kept - (num_cases - num_errors), 0) / kept))


def defer_curve(uncertainty, preds, labels, num_classes: int,
                fractions=DEFER_FRACTIONS) -> dict:
  """Accuracy and macro-F1 of the cases kept when the most uncertain ones go to an expert.

  Args:
    uncertainty: [N] score, larger = less sure (ties keep the input order).
    preds, labels: [N] predicted and true classes.
    num_classes: C.
    fractions: fractions of the N cases referred (the round(f·N) most uncertain).

  Returns:
    {'fraction': [F], 'num_kept': [F], 'accuracy': [F], 'f1_macro': [F]} (lists) and 'aurc',
    the area under the whole risk-coverage curve (`aurc`).
  """
  preds, labels = np.asarray(preds), np.asarray(labels)
  order = np.argsort(-np.asarray(uncertainty, np.float64), kind="stable")
  curve = {"fraction": [], "num_kept": [], "accuracy": [], "f1_macro": []}
  for fraction in fractions:
    kept = order[int(round(fraction * len(order))):]
    curve["fraction"].append(float(fraction))
    curve["num_kept"].append(int(len(kept)))
    curve["accuracy"].append(float(np.mean(preds[kept] == labels[kept])) if len(kept) else None)
    curve["f1_macro"].append(float(skm.f1_score(
        labels[kept], preds[kept], labels=list(range(num_classes)), average="macro",
        zero_division=0)) if len(kept) else None)
  curve["aurc"] = aurc(uncertainty, preds == labels)
  return curve


def reliability_curve(probs, labels, num_bins: int = 15) -> dict:
  """Reliability diagram data (scikit-learn's calibration_curve on confidence vs correctness).

  Args:
    probs: [N, C] class probabilities; the confidence is the largest.
    labels: [N].
    num_bins: equal-width confidence bins, as `expected_calibration_error`.

  Returns:
    {'confidence': mean confidence of each non-empty bin, 'accuracy': its accuracy,
     'ece': expected calibration error}.
  """
  from sklearn import calibration  # pylint: disable=g-import-not-at-top
  # A diverged (non-finite) row counts as in `classification_metrics`: uniform and wrong.
  top, correct = _confidence_and_correct(probs, labels)
  accuracy, confidence = calibration.calibration_curve(correct, top, n_bins=num_bins,
                                                       strategy="uniform")
  return {"confidence": confidence.tolist(), "accuracy": accuracy.tolist(),
          "ece": expected_calibration_error(probs, labels, num_bins)}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_defer_png(curves: dict, path: str, title: str) -> None:
  """Accuracy and macro-F1 against the referred fraction, one line per score."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, curve in curves.items():
    for ax, key in zip(axes, ("accuracy", "f1_macro")):
      ax.plot(curve["fraction"], curve[key], marker="o", markersize=3, label=name)
  for ax, key in zip(axes, ("accuracy", "macro F1")):
    ax.set_xlabel("fraction referred to an expert (most uncertain first)")
    ax.set_ylabel(f"{key} of the kept cases")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def save_reliability_png(curves: dict, path: str, title: str) -> None:
  """Reliability diagram: accuracy against confidence per head, ECE in the legend."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 5))
  ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
  for name, curve in curves.items():
    ax.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3,
            label=f"{name} (ECE {curve['ece']:.3f})")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (largest probability)",
         ylabel="accuracy", title=title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)
