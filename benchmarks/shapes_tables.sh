#!/usr/bin/env bash
# The paper's tables (4, 5, 6 and 7) on the shapes world v2, both protocols, one proposal source:
#
#   bash benchmarks/shapes_tables.sh shapes-detector          # the detector (the paper's setting)
#   bash benchmarks/shapes_tables.sh selective-search 1000    # class-agnostic, named by the shapes CLIP
#
# Per protocol: KAM pseudo labels from the unpaired train split (Table 7 with --reveal-truth), the
# KAM MLP trained on them, then ONE eval pass over the test split with every ablation row and the
# +KAM rows (exact McNemar between consecutive rows in table.md). lambda_t is the value calibrated
# for the shipped CLIP by the paper's rule (--lambda-t auto; see its model card). The second
# argument limits the unpaired train images (selective search takes ~1 s per image on 2 cores).
# Run folders go to runs/tables/<protocol>-<source>/; every step resumes when run again.
set -euo pipefail
export BICM_PRECISION=${BICM_PRECISION:-fp32}  # the same numbers on every CPU (bf16 crops differ in the last digits)
SOURCE=${1:-shapes-detector}
LIMIT=${2:-3000}
ROOT=runs/tables
NAMING=()
if [ "$SOURCE" = selective-search ]; then NAMING=(--name-with shapes); fi
for PROTOCOL in ref phrase; do
    DATASET=shapes-$PROTOCOL
    if [ "$PROTOCOL" = ref ]; then SELECTION=largest-above-mean; else SELECTION=union-above-mean; fi
    RUN=$ROOT/$PROTOCOL-$SOURCE
    bicm pseudo-label --dataset "$DATASET" --model shapes --proposals "$SOURCE" "${NAMING[@]}" --lambda-t auto \
        --selection "$SELECTION" --limit "$LIMIT" --reveal-truth --features-above 0.5 --no-cache --out "$RUN/pseudo"
    bicm train-kam "$RUN/pseudo" --out "$RUN/kam.safetensors"
    bicm eval --dataset "$DATASET" --split test --model shapes --proposals "$SOURCE" "${NAMING[@]}" --lambda-t auto \
        --ablation all --kam "$RUN/kam.safetensors" --no-cache --out "$RUN/test"
done
