#!/usr/bin/env bash
# Three shapes evals whose predictions.jsonl must not change under a refactoring: every ablation
# and +KAM row with the shapes detector, CLIP naming and the union selection with selective
# search, and the defaults. Run at two commits and compare the folders with cmp:
#
#   bash benchmarks/same_predictions.sh /tmp/before [KAM_MODEL]    # at the old commit
#   bash benchmarks/same_predictions.sh /tmp/after  [KAM_MODEL]    # at the new one
#   for d in ref-det phrase-ss ref-default; do cmp /tmp/{before,after}/$d/predictions.jsonl; done
#
# KAM_MODEL: a 'bicm train-kam' model of the shapes CLIP (default: the one benchmarks/shapes_tables.sh makes).
set -euo pipefail
OUT=$1
KAM=${2:-runs/tables/ref-shapes-detector/kam.safetensors}
export BICM_PRECISION=fp32  # the same numbers on every CPU
bicm eval --dataset shapes-ref --split test --limit 300 --model shapes --proposals shapes-detector --lambda-t auto \
   --ablation all --kam "$KAM" --no-cache --no-progress --out "$OUT/ref-det"
bicm eval --dataset shapes-phrase --split test --limit 300 --model shapes --proposals selective-search --name-with shapes \
   --lambda-t auto --ablation all --no-cache --no-progress --out "$OUT/phrase-ss"
bicm eval --dataset shapes-ref --split test --limit 300 --model shapes --no-cache --no-progress --out "$OUT/ref-default"
