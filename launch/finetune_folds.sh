#!/usr/bin/env bash
# Train and evaluate one benchmark's folds (each run ends with its evaluation), then write the per-fold table.
#   bash launch/finetune_folds.sh <finetune config> <prior export or none> [shot] [key=value ...]
# Example: bash launch/finetune_folds.sh configs/finetune/pascal5i_r50.yaml prior_r50.safetensors 1
# Environment: FOLDS (default "0 1 2 3"), OUT_DIR (default runs/finetune), ACCELERATE_CONFIG_FILE (otherwise
# `accelerate config`'s default, e.g. launch/accelerate/single_gpu.yaml).
# Re-running resumes unfinished folds (--resume auto); a finished fold is only evaluated again.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cfg=${1:?finetune config}; prior=${2:?prior export (or none)}; shot=${3:-1}; shift $(( $# < 3 ? $# : 3 ))
launch_args=()
[[ -n "${ACCELERATE_CONFIG_FILE:-}" ]] && launch_args=(--config_file "$ACCELERATE_CONFIG_FILE")
out=${OUT_DIR:-runs/finetune}
stem=$(basename "${cfg%.yaml}")
results=() baselines=()
shopt -s nullglob  # no baseline results when eval.compare_with=[]
for fold in ${FOLDS:-0 1 2 3}; do
  name="${stem}_fold${fold}_${shot}shot"
  accelerate launch "${launch_args[@]}" "$repo/finetune/run.py" --config "$cfg" --resume auto \
    data.fold="$fold" shot="$shot" model.prior="$prior" train.out_dir="$out" train.run_name="$name" "$@"
  results+=("$out/$name/eval/results.json")
  baselines+=("$out/$name/eval"/vs_*/results.json)  # eval.compare_with, on the same episodes
done
python -m fewshot.report "${results[@]}" "${baselines[@]}" --by fold --out "$out/${stem}_${shot}shot_folds.md"
