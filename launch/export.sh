#!/usr/bin/env bash
# Export the key encoder of a stage-1 run's newest checkpoint.  bash launch/export.sh <run dir> <out.safetensors>
set -euo pipefail
python -m pretrain.export "${1:?run dir}" --out "${2:?output .safetensors}" --encoder key
