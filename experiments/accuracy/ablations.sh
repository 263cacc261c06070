#!/usr/bin/env bash
# Paper Table 2 ablations (basic, c1, c2, full): one training run each, then a table of the
# test metrics of every head.
# Usage: experiments/accuracy/ablations.sh CONFIG OUT_DIR [--config.x=y ...]
#   experiments/accuracy/ablations.sh configs/demo.py runs/demo_ablations
set -euo pipefail
config=$1
out=$2
shift 2
for ablation in basic c1 c2 full; do
  python -m diffmic_jax.main --config "$config" --workdir "$out/$ablation" \
    --config.ablation="$ablation" "$@"
done
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| ablation | head | accuracy | macro F1 | quadratic kappa | AUC |")
print("|---|---|---|---|---|---|")
for ablation in ("basic", "c1", "c2", "full"):
  report = json.load(open(os.path.join(out, ablation, "eval", "test_metrics.json")))
  for head, m in report["heads"].items():
    print(f"| {ablation} | {head} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | "
          f"{m['kappa_quadratic']:.4f} | {m['auc_macro_ovr']:.4f} |")
PY
