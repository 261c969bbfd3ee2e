#!/usr/bin/env bash
# Stage 1 with the reference config, then export the key encoder.
#   bash launch/pretrain.sh <accelerate yaml> <pretrain config> [key=value ...]
# Example: bash launch/pretrain.sh launch/accelerate/multi_gpu_8.yaml \
#              configs/pretrain/mocov2sp_r50_8xb32-coslr-1000e_voc.yaml data.root=$FSS_DATA/VOC2012
# Re-running the same command resumes from the newest checkpoint (requeue-safe).
set -euo pipefail
launch_cfg=${1:?accelerate config yaml}; cfg=${2:?pretrain config}; shift 2
accelerate launch --config_file "$launch_cfg" pretrain/run.py --config "$cfg" --resume auto "$@"
