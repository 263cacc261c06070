#!/usr/bin/env bash
# The accuracy study of experiments/README.md ("Accuracy study"), every table from here.
# Usage: experiments/accuracy_study.sh guides|diffusion|levers   (each part resumes where it
# stopped; guides + diffusion = the protocol: basic, dcg, c1, c2, full × 3 seeds × 3 datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
part=${1:-protocol}
study() {  # study NAME CONFIG ARMS SEEDS
  python experiments/accuracy.py --config "configs/$2.py" --arms "$3" --seeds "$4" \
    --out "experiments/results/$1" --runs "runs/accuracy/$1"
}
case $part in
  guides)  # the arms without a diffusion head
    for set in busi_cpu retinamnist_cpu ham10000_cpu; do study $set $set basic,dcg 0,1,2; done
    ;;
  diffusion)  # the full model first on every set, then c2, then c1
    for arm in full c2 c1; do
      for set in busi_cpu retinamnist_cpu ham10000_cpu; do study $set $set $arm 0,1,2; done
    done
    ;;
  levers)  # one seed each, against the protocol's full model of seed 0 (same folder)
    study busi_cpu busi_cpu full,full_cdrop,full_s1,full_dual,full_frozen_dcg,full_warm10,full_lossall,full_balanced,full_beta1000,full_s50 0
    ;;
  long)  # the official joint length is the expensive lever: 300 joint epochs
    study busi_cpu busi_cpu full_e300 0
    ;;
  *) echo "usage: $0 guides|diffusion|levers" >&2; exit 1 ;;
esac
