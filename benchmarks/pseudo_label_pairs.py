"""Analysis only: why Table 7's precision is what it is on a shapes protocol.

KAM pairs every unpaired train image with its most similar train query. A pair can only give
a right label when that query describes something in that image (a "valid" pair); this prints
how many pairs are valid, and how often the grounding is right among the valid ones (overall
and above Thr_k 0.9), reading the truth that ``bicm pseudo-label --reveal-truth`` keeps apart:

    python benchmarks/pseudo_label_pairs.py runs/tables/ref-shapes-detector/pseudo shapes-ref
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bicm.pseudo import _correct, normalize_query, shapes_unpaired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a 'bicm pseudo-label' run folder (pairs.jsonl)")
    parser.add_argument("dataset", choices=["shapes-ref", "shapes-phrase"])
    parser.add_argument("--thr-k", type=float, default=0.9)
    args = parser.parse_args()
    truth = shapes_unpaired(None, args.dataset, reveal_truth=True).truth
    pairs = [json.loads(line) for line in (args.run / "pairs.jsonl").read_text().splitlines()]
    scored = [p for p in pairs if p.get("score") is not None]
    valid = [p for p in scored if (p["id"], normalize_query(p["query"])) in truth]
    above = [p for p in valid if p["score"] > args.thr_k]
    share = lambda part, whole: round(len(part) / max(1, len(whole)), 3)  # noqa: E731
    print(json.dumps({
        "pairs": len(pairs),
        "valid_pairs": len(valid),
        "valid_share": share(valid, pairs),
        "right": sum(_correct(p, truth) for p in scored),
        "right_among_valid": share([p for p in valid if _correct(p, truth)], valid),
        f"valid_above_{args.thr_k}": len(above),
        f"right_among_valid_above_{args.thr_k}": share([p for p in above if _correct(p, truth)], above),
    }, indent=1))


if __name__ == "__main__":
    main()
