#!/usr/bin/env bash
# The accuracy study of experiments/README.md ("Accuracy study"), every table from here.
# Usage: experiments/accuracy_study.sh protocol|levers   (each part resumes where it stopped)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
part=${1:-protocol}
study() {  # study NAME CONFIG ARMS SEEDS
  python experiments/accuracy.py --config "configs/$2.py" --arms "$3" --seeds "$4" \
    --out "experiments/results/$1" --runs "runs/accuracy/$1"
}
case $part in
  protocol)
    study busi_cpu busi_cpu protocol 0,1,2
    study retinamnist_cpu retinamnist_cpu protocol 0,1,2
    study ham10000_cpu ham10000_cpu protocol 0,1,2
    ;;
  levers)  # one seed each, against the protocol's full model of seed 0 (same folder)
    study busi_cpu busi_cpu full_s1,full_s50,full_dual,full_warm10,full_lossall,full_balanced,full_frozen_dcg,full_beta1000,full_e300 0
    ;;
  *) echo "usage: $0 protocol|levers" >&2; exit 1 ;;
esac
