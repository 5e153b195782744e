#!/usr/bin/env bash
# Ground a phrase end to end, offline: random ViT-B-32 weights (see make_demo_inputs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/make_demo_inputs.py demo
bicm ground demo/img.png "a red ball" "the yellow triangle" \
  --checkpoint demo/random-vit-b-32.pt --quick-gelu --proposals demo/dets.json --json --save-vis demo/out.png
