#!/usr/bin/env bash
# Evaluate one PASCAL-trained model (fold: all) on the four cross-domain targets, 1- and 5-shot, one table.
#   bash launch/eval_cross_domain.sh <run dir or checkpoint> [key=value ...]
# Data roots: $FSS_DATA/{FSS-1000,ISIC,LungSegmentation,Deepglobe} (see README, "Cross-domain").
set -euo pipefail
ckpt=${1:?run dir or checkpoint}; shift
results=()
for target in fss1000 isic chest_xray deepglobe; do
  for shot in 1 5; do
    out="$ckpt/eval_cross_domain/${target}_${shot}shot"
    python -m finetune.evaluate "$ckpt" --config "configs/finetune/cdfss_${target}.yaml" \
      eval.shot=$shot eval.seeds=[0,1,2,3,4] eval.out_dir="$out" "$@"
    results+=("$out/results.json")
  done
done
python -m finetune.report "${results[@]}" --by benchmark --out "$ckpt/eval_cross_domain/table.md"
