#!/usr/bin/env bash
# The CUDA checks of issue 7, as ONE script for the device tool's GPU (a session has 15 minutes
# of device time in all). On the device machine torch is there but open_clip is not; carry it
# as wheels. Here, in the repo root, once per session:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch ftfy wcwidth
#
# then run (device tool): command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540.
# It writes $OUT/pipeline-cuda.json (the bench_pipeline report on the GPU), $OUT/crops-cuda.json
# (crops/s by batch size and precision) and $OUT/log.
set -uo pipefail
OUT=${OUT:-/tmp/bicm-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name())"
    timeout 200 python3 benchmarks/gpu_crops.py --json "$OUT/crops-cuda.json"
    timeout 300 python3 benchmarks/bench_pipeline.py --device cuda --images 20 --naive-images 1 --json "$OUT/pipeline-cuda.json"
} 2>&1 | tee "$OUT/log"
