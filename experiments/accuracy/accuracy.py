"""The accuracy study: arms × seeds of full training runs, one table of mean ± std.

Every run is `python -m diffmic_jax.main --config CONFIG --workdir RUNS/<arm>/seed<k>
--config.seed=<k> <arm overrides>`; its test report (eval/test_metrics.json, the checkpoint
chosen on the validation split) and its learning curves (metrics.jsonl) are copied into
OUT/runs/<arm>_seed<k>.json as it finishes (scratch: `runs/` is git-ignored) and, with every
other run, into OUT/results.json (the committed record). Runs found in either are skipped, so
an interrupted study resumes, also from a fresh clone.

  python experiments/accuracy/accuracy.py --config configs/busi_cpu.py --arms protocol \
      --seeds 0,1,2 --out experiments/accuracy/results/busi_cpu --runs runs/accuracy/busi_cpu

Arm sets (--arms): `protocol` = the paper's Table 2 arms basic, c1, c2, full plus `dcg`, the
DCG trained alone and selected on its own validation score; `levers` = the full model with one
change each (see LEVERS); or a comma list of names from both. `--table-only` rebuilds the
outputs from every run already in OUT (several studies may share one OUT). Writes
OUT/results.json (every run), OUT/table.md (mean ± std over seeds for every arm and head) and
OUT/curves_<arm>.png (validation accuracy of every head and the training losses).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from diffmic_jax.platform import files
from diffmic_jax.run import metrics

PROTOCOL = {
    "basic": ["--config.ablation=basic"],
    "dcg": ["--config.ablation=dcg"],
    "c1": ["--config.ablation=c1"],
    "c2": ["--config.ablation=c2"],
    "full": ["--config.ablation=full"],
}
# One change each against the config's full model (the levers of README.md, "Levers").
LEVERS = {
    "full_s1": ["--config.diffusion.num_samples=1"],
    "full_s50": ["--config.diffusion.num_samples=50"],
    "full_ema": ["--config.optim.eval_with_ema=True"],
    # The official decay 0.9999 averages over ~10k steps, far more than a CPU run takes.
    "full_ema995": ["--config.optim.eval_with_ema=True", "--config.optim.ema_decay=0.995"],
    "full_dual": ["--config.model.conditioning=dual"],
    "full_warm10": ["--config.guidance.pretrain_epochs=10"],
    "full_lossall": ["--config.guidance.loss=all"],
    "full_balanced": ["--config.data.class_balanced=True"],
    # The two levers that helped the head, together.
    "full_balanced_beta1000": ["--config.data.class_balanced=True",
                               "--config.diffusion.beta_start=1e-3",
                               "--config.diffusion.beta_end=0.2"],
    # basic with the same sampling: the fair baseline for full_balanced.
    "basic_balanced": ["--config.ablation=basic", "--config.data.class_balanced=True"],
    # β scaled by 1000/T: at T=100 the chain then ends at the ᾱ_T ≈ 2e-5 of the official
    # T=1000 table instead of ᾱ_T = 0.36 (where the sampler's start N(μ, I) is not the marginal).
    "full_beta1000": ["--config.diffusion.beta_start=1e-3", "--config.diffusion.beta_end=0.2"],
    "full_frozen_dcg": ["--config.guidance.joint_train=False"],
    "full_cdrop": ["--config.model.cond_dropout=0.3"],
    "full_clip": ["--config.diffusion.clip_y0=2.0"],
    # Local crops of 16 px instead of 8 (at 64 px, 8 px crops leave the local branch near chance).
    "full_crop16": ["--config.guidance.crop_size=16"],
    "full_e300": ["--config.training.num_epochs=300", "--config.training.eval_every_epochs=20"],
    "full_e1000": ["--config.training.num_epochs=1000", "--config.training.eval_every_epochs=50"],
}
ARMS = {**PROTOCOL, **LEVERS}
METRICS = ("accuracy", "f1_macro", "kappa_quadratic", "balanced_accuracy", "auc_macro_ovr")


def run_one(config, arm, seed, runs_dir, out_dir, extra, finished):
  """Trains one arm × seed (skipped if `finished`, {(arm, seed): record}, has it); returns the
  result record."""
  if (arm, seed) in finished:
    return finished[(arm, seed)]
  result_path = os.path.join(out_dir, "runs", f"{arm}_seed{seed}.json")
  workdir = os.path.join(runs_dir, arm, f"seed{seed}")
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "diffmic_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.seed={seed}", *ARMS[arm], *extra]
  start = time.time()
  with open(os.path.join(workdir, "stdout.log"), "a") as log:
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  with open(os.path.join(workdir, "eval", "test_metrics.json")) as f:
    report = json.load(f)
  record = {"arm": arm, "seed": seed, "command": " ".join(cmd[1:]), "wall_s": time.time() - start,
            "test": report, "curves": _curves(os.path.join(workdir, "metrics.jsonl"))}
  uncertainty_path = os.path.join(workdir, "eval", "test_uncertainty.json")
  if os.path.exists(uncertainty_path):  # defer curves with their AURC, calibration (ECE)
    with open(uncertainty_path) as f:
      record["uncertainty"] = json.load(f)
  os.makedirs(os.path.dirname(result_path), exist_ok=True)
  files.write_json(result_path, record, indent=1)
  return record


def _curves(path):
  """Validation rows and (subsampled) training rows of a metrics.jsonl."""
  val, train = [], []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      (val if "epoch" in row else train).append(row)
  keep = max(1, len(train) // 200)
  return {"val": val, "train": train[::keep]}


def table(records):
  """Markdown table: arm, head, then mean ± std over seeds of every metric."""
  by_arm = {}
  for r in records:
    by_arm.setdefault(r["arm"], []).append(r)
  lines = ["| arm | head | seeds | " + " | ".join(METRICS) + " |",
           "|---|---|---|" + "---|" * len(METRICS)]
  for arm, runs in by_arm.items():
    for head in runs[0]["test"]["heads"]:
      cells = [_mean_std([r["test"]["heads"][head][m] for r in runs]) for m in METRICS]
      lines.append(f"| {arm} | {head} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


REFERRED = (0.1, 0.2, 0.3)  # fractions of the test cases referred to an expert


def _mean_std(values):
  values = np.asarray(values, float)
  return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def excess_aurc(curve):
  """E-AURC of a `metrics.defer_curve`: its AURC minus the floor of its error rate (the first
  point keeps every case)."""
  num_cases = curve["num_kept"][0]
  num_errors = int(round(num_cases * (1.0 - curve["accuracy"][0])))
  return curve["aurc"] - metrics.optimal_aurc(num_cases, num_errors)


def uncertainty_tables(records):
  """Markdown tables of every run's eval/test_uncertainty.json, mean ± std over seeds: for each
  arm and ranking, the AURC and the E-AURC (AURC minus the floor its error rate sets: the
  ranking apart from the accuracy; both lower is better) and accuracy / macro-F1 of the cases
  kept when 10, 20 and 30 % are referred; then the ECE of every calibrated head."""
  by_arm = {}
  for r in records:
    if "uncertainty" in r:
      by_arm.setdefault(r["arm"], []).append(r["uncertainty"])
  cols = [f"{m} @{int(f * 100)}%" for m in ("acc", "F1") for f in REFERRED]
  defer = ["| arm | ranking | seeds | AURC | E-AURC | " + " | ".join(cols) + " |",
           "|---|---|---|---|---|" + "---|" * len(cols)]
  ece = ["| arm | head | seeds | ECE |", "|---|---|---|---|"]
  for arm, reports in by_arm.items():
    for name in reports[0]["defer"]:
      curves = [rep["defer"][name] for rep in reports]
      cells = [_mean_std([c["aurc"] for c in curves]), _mean_std([excess_aurc(c) for c in curves])]
      for key in ("accuracy", "f1_macro"):
        for fraction in REFERRED:
          cells.append(_mean_std([c[key][c["fraction"].index(fraction)] for c in curves]))
      defer.append(f"| {arm} | {name} | {len(curves)} | " + " | ".join(cells) + " |")
    for head in reports[0]["calibration"]:
      ece.append(f"| {arm} | {head} | {len(reports)} | "
                 f"{_mean_std([rep['calibration'][head]['ece'] for rep in reports])} |")
  return "\n".join(defer) + "\n\n" + "\n".join(ece)


def plot_uncertainty(records, out_dir):
  """uncertainty.png: macro-F1 of the kept cases against the fraction referred, mean over seeds
  (band: ± std), one line per arm and ranking."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  by_key = {}
  for r in records:
    for name, curve in r.get("uncertainty", {}).get("defer", {}).items():
      by_key.setdefault((r["arm"], name), []).append(curve)
  if not by_key:
    return
  fig, ax = plt.subplots(figsize=(8, 5))
  for (arm, name), curves in by_key.items():
    fraction = np.asarray(curves[0]["fraction"])
    f1 = np.array([c["f1_macro"] for c in curves], float)
    aurc = np.mean([c["aurc"] for c in curves])
    line, = ax.plot(fraction, f1.mean(0), marker="o", markersize=3,
                    label=f"{arm}: {name} (AURC {aurc:.3f}, {len(curves)} seeds)")
    if len(curves) > 1:
      ax.fill_between(fraction, f1.mean(0) - f1.std(0, ddof=1), f1.mean(0) + f1.std(0, ddof=1),
                      color=line.get_color(), alpha=0.12)
  ax.set(xlabel="fraction referred to an expert (most uncertain first)",
         ylabel="macro-F1 of the kept cases", title=os.path.basename(os.path.normpath(out_dir)))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  files.save_figure(fig, os.path.join(out_dir, "uncertainty.png"), dpi=90)
  plt.close(fig)


def _smooth(values, width=15):
  """Running mean over `width` logged steps (training losses are per-batch and noisy)."""
  values = np.asarray(values, float)
  if len(values) < width:
    return values
  return np.convolve(values, np.ones(width) / width, mode="valid")


def plot_curves(records, out_dir):
  """curves_<arm>.png: validation accuracy per head (one line per seed), the ε-MSE per timestep
  band, and the MMD terms with the DCG loss, over training (seeds overlaid, smoothed)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  by_arm = {}
  for r in records:
    by_arm.setdefault(r["arm"], []).append(r)
  loss_panels = (("ε-MSE per timestep band (0 = smallest t)",
                  ("mse_band0", "mse_band1", "mse_band2", "mse_band3")),
                 ("MMD terms and DCG loss", ("mmd_global", "mmd_local", "dcg_loss")))
  for arm, runs in by_arm.items():
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    split = "val"
    for r in runs:
      style = ["-", "--", ":"][r["seed"] % 3]
      val = r["curves"]["val"]
      if val:
        split = val[0]["split"]
        heads = sorted(k[len(split) + 1:-len("_accuracy")] for k in val[0]
                       if k.endswith("_accuracy"))
        for i, head in enumerate(heads):
          key = f"{split}_{head}_accuracy"
          axes[0].plot([v["epoch"] for v in val], [v[key] for v in val], style,
                       color=colors[i % len(colors)], label=f"{head} s{r['seed']}", lw=1)
      for ax, (_, keys) in zip(axes[1:], loss_panels):
        for i, key in enumerate(keys):
          rows = [t for t in r["curves"]["train"] if key in t]
          if len(rows) > 1:
            smooth = _smooth([t[key] for t in rows])
            steps = [t["step"] for t in rows][len(rows) - len(smooth):]
            ax.plot(steps, smooth, style, color=colors[i % len(colors)],
                    label=f"{key} s{r['seed']}", lw=1)
    axes[0].set(title=f"{arm}: {split} accuracy per head", xlabel="joint epoch")
    for ax, (title, _) in zip(axes[1:], loss_panels):
      ax.set(title=f"{arm}: {title}", xlabel="step", yscale="log")
    for ax in axes:
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, f"curves_{arm}.png"), dpi=80)
    plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--arms", default="protocol")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", required=True, help="results folder (JSON, table, PNGs)")
  parser.add_argument("--runs", required=True, help="workdirs of the runs (not committed)")
  parser.add_argument("--table-only", action="store_true", help="only rebuild the outputs")
  args, extra = parser.parse_known_args()
  if args.table_only:
    return write_outputs(args.out, args.config, extra, _read_runs(args.out))
  names = {"protocol": list(PROTOCOL), "levers": ["full", *LEVERS]}.get(args.arms,
                                                                       args.arms.split(","))
  unknown = [n for n in names if n not in ARMS]
  if unknown:
    parser.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}, 'protocol' or 'levers'")
  finished = {(r["arm"], r["seed"]): r for r in _read_runs(args.out)}
  records = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for arm in names:
      records.append(run_one(args.config, arm, seed, args.runs, args.out, extra, finished))
      print(f"{arm} seed {seed}: " + ", ".join(
          f"{h} F1 {m['f1_macro']:.3f}" for h, m in records[-1]["test"]["heads"].items()),
          flush=True)
  write_outputs(args.out, args.config, extra, _read_runs(args.out))


def _read_runs(out_dir):
  """Every finished run of OUT/results.json and OUT/runs (the newer per-run file wins), in arm
  order (protocol, then levers), then seed."""
  records = {}
  results_path = os.path.join(out_dir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      records.update({(r["arm"], r["seed"]): r for r in json.load(f)["runs"]})
  folder = os.path.join(out_dir, "runs")
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    if name.endswith(".json"):
      with open(os.path.join(folder, name)) as f:
        record = json.load(f)
      records[(record["arm"], record["seed"])] = record
  order = list(ARMS)
  return sorted(records.values(), key=lambda r: (order.index(r["arm"]), r["seed"]))


def write_outputs(out_dir, config, extra, records):
  files.write_json(os.path.join(out_dir, "results.json"),
                   {"config": config, "extra": extra, "runs": records}, indent=1)
  files.write_text(os.path.join(out_dir, "table.md"), table(records) + "\n")
  plot_curves(records, out_dir)
  print(table(records))
  if any("uncertainty" in r for r in records):
    files.write_text(os.path.join(out_dir, "uncertainty.md"), uncertainty_tables(records) + "\n")
    plot_uncertainty(records, out_dir)
    print(uncertainty_tables(records))


if __name__ == "__main__":
  main()
