#!/usr/bin/env bash
# Train and evaluate one benchmark's four folds, then print the per-fold table.
#   bash launch/finetune_folds.sh <finetune config> <prior export or none> [shot] [key=value ...]
# Example: bash launch/finetune_folds.sh configs/finetune/pascal5i_r50.yaml prior_r50.safetensors 1
# Accelerate settings come from `accelerate config` or ACCELERATE_CONFIG_FILE (e.g. launch/accelerate/single_gpu.yaml).
# Re-running resumes unfinished folds (--resume auto) and re-evaluates.
set -euo pipefail
cfg=${1:?finetune config}; prior=${2:?prior export (or none)}; shot=${3:-1}; shift $(( $# < 3 ? $# : 3 ))
launch_args=()
[[ -n "${ACCELERATE_CONFIG_FILE:-}" ]] && launch_args=(--config_file "$ACCELERATE_CONFIG_FILE")
out=${OUT_DIR:-runs/finetune}
results=()
for fold in 0 1 2 3; do
  name="$(basename "${cfg%.yaml}")_fold${fold}_${shot}shot"
  accelerate launch "${launch_args[@]}" finetune/run.py --config "$cfg" --resume auto \
    data.fold=$fold shot=$shot model.prior="$prior" train.out_dir="$out" train.run_name="$name" "$@"
  python -m finetune.evaluate "$out/$name" --config "$cfg" data.fold=$fold shot=$shot model.prior="$prior" "$@"
  results+=("$out/$name/eval/results.json")
done
python -m finetune.report "${results[@]}" --by fold --out "$out/$(basename "${cfg%.yaml}")_${shot}shot_folds.md"
