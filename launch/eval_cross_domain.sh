#!/usr/bin/env bash
# Evaluate one PASCAL-trained model (fold: all) on the cross-domain targets, 1- and 5-shot, one table.
#   bash launch/eval_cross_domain.sh <run dir or checkpoint> [key=value ...]
# Data roots: $FSS_DATA/{FSS-1000,ISIC,LungSegmentation,Deepglobe} (see README, "Cross-domain").
# Environment knobs (defaults = the PATNet protocol):
#   CD_TARGETS="fss1000 isic chest_xray deepglobe"  CD_SHOTS="1 5"  CD_SEEDS="[0,1,2,3,4]"
#   CD_CONFIG_PREFIX=<repo>/configs/finetune/cdfss_   (each target's config is ${CD_CONFIG_PREFIX}<target>.yaml)
# The table collects every results.json under <run>/eval_cross_domain/, so calls for different targets or shots
# add up to one table.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ckpt=${1:?run dir or checkpoint}; shift
targets=${CD_TARGETS:-fss1000 isic chest_xray deepglobe}
shots=${CD_SHOTS:-1 5}
seeds=${CD_SEEDS:-[0,1,2,3,4]}
prefix=${CD_CONFIG_PREFIX:-$repo/configs/finetune/cdfss_}
for target in $targets; do
  for shot in $shots; do
    python -m finetune.evaluate "$ckpt" --config "${prefix}${target}.yaml" \
      eval.shot="$shot" eval.seeds="$seeds" eval.out_dir="$ckpt/eval_cross_domain/${target}_${shot}shot" "$@"
  done
done
# the method's results and, beside them, the training-free baselines of eval.compare_with on the same episodes
shopt -s nullglob
python -m fewshot.report "$ckpt"/eval_cross_domain/*/results.json "$ckpt"/eval_cross_domain/*/vs_*/results.json \
  --by benchmark --out "$ckpt/eval_cross_domain/table.md"
