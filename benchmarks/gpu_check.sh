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
# (crops/s by batch size and precision), $OUT/prefetch-cuda.json (issue 19: crops/s of each crop
# backend and precision, images/s end to end on the Flickr-like workload with detections from a
# file, the encoder's share of the time by CUDA events, peak GPU memory) and $OUT/log.
# The whole script stays under 9 minutes (timeouts 150 + 120 + 250 s).
# On a machine without a GPU, check that it runs: DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/bicm-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
if [ -n "${QUICK:-}" ]; then
    QUICK_ARGS=(--quick)
    PIPE_ARGS=(--images 1 --queries 2 --naive-images 0 --crop-rounds 1 --no-compile)
else
    QUICK_ARGS=(--images 20)
    PIPE_ARGS=(--images 20 --naive-images 1)
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    $PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
    (cd benchmarks && timeout 150 $PY bench_prefetch.py --device "$DEVICE" "${QUICK_ARGS[@]}" --json "$OUT/prefetch-$DEVICE.json")
    [ -n "${QUICK:-}" ] || timeout 120 $PY benchmarks/gpu_crops.py --json "$OUT/crops-$DEVICE.json"
    timeout 250 $PY benchmarks/bench_pipeline.py --device "$DEVICE" "${PIPE_ARGS[@]}" --json "$OUT/pipeline-$DEVICE.json"
} 2>&1 | tee "$OUT/log"
