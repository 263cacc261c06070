#!/usr/bin/env bash
# The accuracy study of experiments/accuracy/README.md ("Accuracy study"), every table from here.
# Usage: experiments/accuracy/accuracy_study.sh protocol|guides|diffusion|levers|long|pretrained
# (each part resumes where it stopped; protocol = guides + diffusion: basic, dcg, c1, c2, full
# × 3 seeds × 3 datasets, in the order that gives BUSI and HAM10000's main comparison first)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
part=${1:-protocol}
study() {  # study NAME CONFIG ARMS SEEDS [--config.a.b=value ...]
  python experiments/accuracy/accuracy.py --config "configs/$2.py" --arms "$3" --seeds "$4" \
    --out "experiments/accuracy/results/$1" --runs "runs/accuracy/$1" "${@:5}"
}
case $part in
  protocol)
    study busi_cpu busi_cpu basic,dcg,full,c2,c1 0,1,2
    study ham10000_cpu ham10000_cpu basic,dcg,full 0,1,2
    study retinamnist_cpu retinamnist_cpu basic,dcg,full 0,1,2
    study ham10000_cpu ham10000_cpu c2,c1 0,1,2
    study retinamnist_cpu retinamnist_cpu c2,c1 0,1,2
    ;;
  guides)  # the arms without a diffusion head
    for set in busi_cpu retinamnist_cpu ham10000_cpu; do study $set $set basic,dcg 0,1,2; done
    ;;
  diffusion)  # the full model first on every set, then c2, then c1
    for arm in full c2 c1; do
      for set in busi_cpu retinamnist_cpu ham10000_cpu; do study $set $set $arm 0,1,2; done
    done
    ;;
  levers)  # one seed each, against the protocol's full model of seed 0 (same folder)
    study busi_cpu busi_cpu full,full_s1,full_s50,full_dual,full_crop16,full_ema995,full_warm10,full_lossall,full_balanced,full_frozen_dcg,full_cdrop,full_beta1000 0
    study busi_cpu busi_cpu basic_balanced,full_balanced 0,1,2  # the strongest lever, with seeds
    study busi_cpu busi_cpu full_balanced_beta1000 0,1,2  # the two levers that helped, together
    study ham10000_cpu ham10000_cpu full_balanced,basic_balanced,full_balanced_beta1000 0,1,2
    study ham10000_cpu ham10000_cpu full,full_lossall,full_dual 0
    ;;
  long)  # the official joint length is the expensive lever: 300 and 1000 joint epochs
    study busi_cpu busi_cpu full_e300,full_e1000 0
    ;;
  pretrained)  # the paper's regime in miniature: HAM10000-pretrained DCG trunks, random ρ(x),
    # against the same arms from scratch (guidance.init_from=''); runs/ham10000_pretrain or
    # $DIFFMIC_PRETRAINED_RUN holds the pretrained trunk (trained here first if absent).
    pretrain=${DIFFMIC_PRETRAINED_RUN:-runs/ham10000_pretrain}
    [ -d "$pretrain/checkpoints_best" ] || python -m diffmic_jax.main \
      --config configs/ham10000_pretrain.py --workdir "$pretrain" --config.seed=0
    export DIFFMIC_PRETRAINED_RUN=$pretrain
    for seed in 0 1 2; do  # seed by seed: a study cut short holds every arm of its seeds
      study busi_pretrained busi_pretrained basic,dcg,c2,full $seed
      study busi_scratch busi_pretrained basic,dcg,c2,full $seed --config.guidance.init_from=
      study retinamnist_pretrained retinamnist_pretrained basic,dcg,c2,full $seed
      study retinamnist_scratch retinamnist_pretrained basic,dcg,c2,full $seed \
        --config.guidance.init_from=
    done
    ;;
  *) echo "usage: $0 protocol|guides|diffusion|levers|long|pretrained" >&2; exit 1 ;;
esac
