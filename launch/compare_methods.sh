#!/usr/bin/env bash
# One table of trained runs and the training-free baselines on the same episodes: each run's own held-out test
# classes (its <run>/eval) and the real cross-domain samples of ../shared/data/cdfss-samples, 1-shot, 129 px.
#   bash launch/compare_methods.sh OUT RUN[=LABEL] [RUN[=LABEL] ...] [-- key=value ...]
# (overrides after "--" go to every evaluation, e.g. eval.episodes=20 for a quick look)
# e.g. after the smoke runs of docs/methods.md:
#   bash launch/compare_methods.sh runs/compare runs/finetune/smoke_real-mix_mnv2=qgnet \
#        runs/finetune/smoke_real-mix_ssp_mnv2=ssp runs/finetune/smoke_real-mix_qsm_mnv2=qsm
# Environment: CD_ROOT (default ../shared/data/cdfss-samples), CD_TARGETS (default "chest_xray isic kvasir"),
#   CD_EPISODES (50), CD_SEEDS ([0,1,2]), BASELINES (eval.compare_with, default [prototype,ssp]),
#   HELDOUT (1; 0 = skip the held-out re-evaluation, e.g. when each run's own eval already has it).
set -euo pipefail
out=${1:?output folder}; shift
runs=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  runs+=("$1"); shift
done
[ ${#runs[@]} -gt 0 ] || { echo "error: no run folder given" >&2; exit 2; }
cd_root=${CD_ROOT:-../shared/data/cdfss-samples}
targets=${CD_TARGETS:-chest_xray isic kvasir}
episodes=${CD_EPISODES:-50}
seeds=${CD_SEEDS:-[0,1,2]}
baselines=${BASELINES:-[prototype,ssp]}
compare=$baselines  # baselines depend only on the backbone and the episodes: scored once, with the first run
for spec in "${runs[@]}"; do
  run=${spec%%=*}
  label=${spec#*=}; [ "$label" = "$spec" ] && label=$(basename "$run")
  [ -f "$run/config.yaml" ] || { echo "error: $run is not a run folder (no config.yaml)" >&2; exit 2; }
  # the run's own held-out classes, with the baselines beside it, on the episodes its eval used
  if [ "${HELDOUT:-1}" != 0 ]; then
    python -m finetune.evaluate "$run" eval.label="$label" eval.compare_with="$compare" \
      eval.out_dir="$out/$label/heldout" eval.vis_episodes=2 "${extra[@]}"
  fi
  for target in $targets; do
    python -m finetune.evaluate "$run" data.sources=[] data.benchmark="$target" data.root="$cd_root" \
      eval.split=test eval.protocol=hsnet eval.episodes="$episodes" eval.seeds="$seeds" eval.label="$label" \
      eval.compare_with="$compare" eval.out_dir="$out/$label/$target" eval.vis_episodes=2 "${extra[@]}"
  done
  compare=[]
done
shopt -s nullglob
# one source: <label>/heldout/results.json; several: <label>/heldout/<source>/results.json
[ "${HELDOUT:-1}" = 0 ] || python -m fewshot.report "$out"/*/heldout/results.json "$out"/*/heldout/*/results.json \
  "$out"/*/heldout/vs_*/results.json "$out"/*/heldout/*/vs_*/results.json \
  --by benchmark --out "$out/table_heldout.md"
cd_results=()
for target in $targets; do cd_results+=("$out"/*/"$target"/results.json "$out"/*/"$target"/vs_*/results.json); done
python -m fewshot.report "${cd_results[@]}" --by benchmark --out "$out/table_cross_domain.md"
