#!/usr/bin/env bash
# Fill .gpu_wheels/ with the wheels a borrowed GPU machine lacks (its image has torch, torchvision, accelerate,
# scikit-image, safetensors, tensorboard, but not these; lightly is installed without its dependencies, which the
# parts of it the project imports do not need), for Python 3.12 on x86-64, so that
# benchmarks/gpu_check.sh can install them offline there. Run here, where PyPI is reachable:
#   bash benchmarks/gpu_wheels.sh            # then carry .gpu_wheels with the run (it is git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu_wheels lightly==1.6.0 kornia kornia-rs \
    pycocotools faiss-cpu
ls .gpu_wheels
