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
  diffusion)
    for set in busi_cpu retinamnist_cpu ham10000_cpu; do study $set $set c1,c2,full 0,1,2; done
    ;;
  levers)  # one seed each, against the protocol's full model of seed 0 (same folder)
    study busi_cpu busi_cpu full,full_cdrop,full_s1,full_dual,full_frozen_dcg,full_warm10,full_lossall,full_balanced,full_beta1000,full_s50,full_e300 0
    ;;
  *) echo "usage: $0 guides|diffusion|levers" >&2; exit 1 ;;
esac
