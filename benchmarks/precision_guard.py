"""Accuracy guard of a fast precision: does it choose the same boxes as fp32?

Compares two `bicm eval` run folders of the SAME queries that differ only in `--precision`
(e.g. on the shapes test split):

    bicm eval --dataset shapes-ref --split test --model shapes --proposals selective-search \\
        --name-with shapes --ablation none --precision fp32 --out runs/guard-fp32 [--limit N]
    bicm eval ... --precision bf16 --out runs/guard-bf16 [--limit N]
    python benchmarks/precision_guard.py runs/guard-fp32 runs/guard-bf16 [--json out.json]

The same guard compares the crop backends (issue 19): two runs that differ only in
`--crop-backend` (pil, the reference, and tensor), with the stricter `--min-same 0.995`:

    bicm eval --dataset shapes-ref --split test --model shapes --proposals shapes-detector \
        --lambda-t auto --ablation none --crop-backend pil --out runs/crops-pil
    bicm eval ... --crop-backend tensor --out runs/crops-tensor
    python benchmarks/precision_guard.py runs/crops-pil runs/crops-tensor --min-same 0.995

Prints, for the main row (QAM+COM+SF), the share of queries whose chosen box is the same
(within 0.5 px), both accuracies, their difference and the exact McNemar test; exits 1 when
the guard fails (same box < --min-same, default 99%, or |accuracy difference| >= 0.5 points).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bicm.evaluate import MAIN_ROW, mcnemar
from bicm.jsonl import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="run folder of the reference eval (fp32, or pil crops)")
    parser.add_argument("candidate", type=Path, help="run folder of the fast eval (bf16, or tensor crops)")
    parser.add_argument("--row", default=MAIN_ROW)
    parser.add_argument("--json", default=None)
    parser.add_argument("--min-same", type=float, default=0.99, help="Smallest share of queries with the same box.")
    args = parser.parse_args()

    ref = {r["id"]: r for r in read_jsonl(args.reference / "predictions.jsonl")}
    cand = {r["id"]: r for r in read_jsonl(args.candidate / "predictions.jsonl")}
    ids = sorted(set(ref) & set(cand))
    if not ids:
        sys.exit("no queries in common")
    same = 0
    for i in ids:
        a, b = ref[i]["rows"].get(args.row, {}).get("box"), cand[i]["rows"].get(args.row, {}).get("box")
        same += int(a == b or (a is not None and b is not None and max(abs(x - y) for x, y in zip(a, b)) <= 0.5))
    records = [{"rows": {"ref": ref[i]["rows"].get(args.row, {}), "cand": cand[i]["rows"].get(args.row, {})}} for i in ids]
    test = mcnemar(records, "ref", "cand")
    acc_ref = sum(bool(r["rows"]["ref"].get("hit")) for r in records) / len(ids)
    acc_cand = sum(bool(r["rows"]["cand"].get("hit")) for r in records) / len(ids)
    report = {
        "queries": len(ids),
        "same_box": same / len(ids),
        "accuracy_reference": acc_ref,
        "accuracy_candidate": acc_cand,
        "difference_points": 100 * (acc_cand - acc_ref),
        "mcnemar": test,
    }
    print(f"{len(ids)} queries: same box {100 * report['same_box']:.2f}%; Acc@0.5 {100 * acc_ref:.2f}% -> {100 * acc_cand:.2f}% "
          f"({report['difference_points']:+.2f} points; {test['b_only']} gained / {test['a_only']} lost, McNemar p = {test['p_value']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    ok = report["same_box"] >= args.min_same and abs(report["difference_points"]) < 0.5
    print("guard:", "PASS" if ok else f"FAIL (needs >= {100 * args.min_same:g}% same box and < 0.5 points)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
