#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (a few minutes on one H100/H200), written to one JSON file.
#
#   bash benchmarks/gpu_wheels.sh                 # here, once: wheels the GPU image lacks -> .gpu_wheels/
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # there (device tool: carry .gpu_wheels, OUT_DIR=$OUT)
#
# Writes OUT_DIR/gpu_check.json (the GPU, the software, stage 1 end to end per local mode: images/s, GPU busy
# share, peak memory; the device views' share of a step; stage 2 episodes/s at 473 px, bf16) and both logs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
if [ -d .gpu_wheels ]; then  # offline: the image has torch & co., not lightly / kornia
    "$PYTHON" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$(date +%s)
# stage 1: the CPU parts at the reference recipe's scale (ResNet-50, 224 px), then end to end through the loader
timeout 420 "$PYTHON" benchmarks/bench_pretrain.py --arch resnet50 --size 224 --batch 64 --steps 5 --warmup 2 \
    --loader-passes 1 --gpu-batch 256 --gpu-workers "${GPU_WORKERS:-16}" --work-dir /tmp/gpu_check_work \
    --json "$OUT_DIR/pretrain.json" 2>&1 | tee "$OUT_DIR/pretrain.log"
# stage 2: 1-shot qgnet, ResNet-50, 473 px, fp32 and bf16, batched evaluation
timeout 180 "$PYTHON" benchmarks/bench_finetune.py --sizes 473 --arch resnet50 --steps 5 --eval-batch 32 \
    --json "$OUT_DIR/finetune.json" 2>&1 | tee "$OUT_DIR/finetune.log"
"$PYTHON" - "$OUT_DIR" "$(( $(date +%s) - start ))" <<'PY'
import json, sys, subprocess
from pathlib import Path
import torch
out = Path(sys.argv[1])
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
merged = {"gpu": torch.cuda.get_device_name(), "nvidia_smi": smi, "torch": torch.__version__,
          "seconds": int(sys.argv[2]), "pretrain": json.loads((out / "pretrain.json").read_text()),
          "finetune": json.loads((out / "finetune.json").read_text())}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'} ({merged['seconds']} s)")
PY
