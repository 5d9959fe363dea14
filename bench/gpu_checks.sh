#!/usr/bin/env bash
# Issue 17's GPU checks in one go, on an H100/H200 machine prepared with ../shared/device (see bench/README.md):
# the GPU tests, then the stage-1 benchmark with ResNet-50 fp16, batch 256, CPU and GPU decoding in the same run.
# Results (JSON, logs) go to $OUT (default /tmp/gpu-checks); copy the JSON into bench/results/.
#   WHEELS=.device/c  folder with nvidia-nvimgcodec-cu13 and nvidia-nvjpeg wheels to install first (optional)
#   SECONDS_PER=6     steady-state seconds per measure;  IMAGES=/tmp/bimg  the benchmark sets
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}; mkdir -p "$out"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
python3 -c "import torch; print(torch.cuda.get_device_name())" | tee "$out/gpu.txt"
CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -m gpu tests/stage1/test_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$out/gpu-tests.log"
python3 bench/stage1.py --images "${IMAGES:-/tmp/bimg}" --provider cuda --backbone resnet50 \
  --weights /tmp/resnet50-random.pth --precision fp16 --batch-size 256 --seconds "${SECONDS_PER:-6}" \
  --skip-naive --decode gpu --sweep-cuda-options --out-json "$out/stage1-cuda-resnet50-fp16-decode-gpu.json" 2>&1 | tee "$out/bench.log" | tail -40
