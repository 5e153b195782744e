"""Why BiCM scores what it scores on the shapes world: one row per query kind and target size.

On the first N images of a split of a shapes protocol, with a CLIP and a proposal source:

* proposal recall: share of queries whose truth box some proposal overlaps with IoU > 0.5;
* pointing game: share of queries whose map maximum lies inside a true box, for the
  query-aware (QA) and the vanilla (VA) map;
* QAM box ``P_t``: share with IoU > 0.5, and its median area relative to the truth;
* COM, QAM+COM, QAM+COM+SF accuracy under the protocol's selection;
* how often ``P_t`` wins under SF (is the chosen candidate) and how often it is right then;
* COM on oracle boxes: the truth's objects (every object of the scene, named by its shape) as
  the only proposals, argmax: can CLIP tell the referred object from the others?

    python benchmarks/shapes_diagnostics.py --dataset shapes-ref --split val --images 100 \
        [--model shapes | --checkpoint clip.safetensors] [--proposals shapes-detector] [--name-with shapes] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bicm import Grounder, Needs, Proposals
from bicm.evaluate import paper_selection
from bicm.imageio import load_image
from bicm.proposals.sources import make_source
from bicm.shapes.dataset import PER_IMAGE, pick_expressions, protocol_of, scene_for, shapes_folder, split_seed
from bicm.shapes.probe import area_bin
from bicm.shapes.world import iou

ROWS = ("COM", "QAM+COM", "QAM+COM+SF")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes-ref", choices=["shapes-ref", "shapes-phrase"])
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--model", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--proposals", default="shapes-detector")
    parser.add_argument("--name-with", default=None, help="name class-agnostic proposals (e.g. shapes for selective search)")
    parser.add_argument("--top-n", type=int, default=100)
    parser.add_argument("--lambda-t", type=float, default=1000.0)
    parser.add_argument("--selection", default="paper", help="paper (the protocol's), argmax, union-above-mean, largest-above-mean")
    parser.add_argument("--root", default=None, help="shapes world folder [default: ~/.cache/bicm/shapes-v2]")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    summary, rows = diagnose(args)
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}) + "\n")


def diagnose(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    protocol = protocol_of(args.dataset)
    folder = shapes_folder(args.root, protocol, args.split)
    model = args.model or (None if args.checkpoint else "shapes")
    grounder = Grounder.from_pretrained(model, checkpoint=args.checkpoint, device="cpu", name_with=args.name_with, lambda_t=args.lambda_t)
    selection = paper_selection(args.dataset) if args.selection == "paper" else args.selection
    source = make_source(args.proposals, top_n=args.top_n)
    configs = {
        "COM": grounder.config.replace(components=("com",), selection=selection),
        "QAM+COM": grounder.config.replace(components=("qam", "com"), selection=selection),
        "QAM+COM+SF": grounder.config.replace(components=("qam", "com", "sf"), selection=selection),
    }
    oracle_cfg = grounder.config.replace(components=("com",), selection="argmax")
    rows: list[dict[str, Any]] = []
    seed = split_seed(protocol, args.split)
    for index in range(args.images):
        scene = scene_for(protocol, args.split, index)
        exprs = pick_expressions(scene, PER_IMAGE[protocol], np.random.default_rng([seed, index, 1]))
        if not exprs:
            continue
        image = load_image(folder / args.split / f"{index:05d}.png")
        queries = [e.text for e in exprs]
        features = grounder.extract(image, queries, source, needs=Needs(kinds=("qa", "va"), visual=True, names=True))
        boxes = features.proposals.boxes
        results = {name: grounder.score(features, cfg) for name, cfg in configs.items()}
        oracle = Proposals(torch.tensor([o.box for o in scene.objects]), class_names=[o.shape for o in scene.objects], source="oracle")
        oracle_results = grounder.with_config(**vars_of(oracle_cfg)).ground_many(image, queries, oracle)
        for i, e in enumerate(exprs):
            truth = e.box
            area = (truth[2] - truth[0]) * (truth[3] - truth[1])
            row: dict[str, Any] = {"kind": e.kind, "size": area_bin(area / (scene.width * scene.height))}
            row["recall"] = bool(len(boxes) and max(iou(b, truth) for b in boxes.tolist()) > 0.5)
            for kind in ("qa", "va"):
                m = features.maps[kind].raw[i]
                y, x = divmod(int(m.argmax()), m.shape[1])
                row[f"point_{kind}"] = any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in (scene.objects[t].box for t in e.targets))
            pt = features.qam_boxes["qa"][i]
            row["pt_iou"] = 0.0 if pt is None else iou(pt, truth)
            row["pt_area"] = 0.0 if pt is None else (pt[2] - pt[0]) * (pt[3] - pt[1]) / area
            for name, res in results.items():
                r = res[i]
                row[name] = r.box is not None and iou(r.box, truth) > 0.5
                if name == "QAM+COM+SF":
                    row["pt_wins"] = r.candidates.qam_index is not None and r.candidates.qam_index in r.selected
            row["oracle_com"] = oracle_results[i].box is not None and iou(oracle_results[i].box, truth) > 0.5
            rows.append(row)
    summary = {
        "dataset": args.dataset,
        "split": args.split,
        "images": args.images,
        "proposals": source.id,
        "selection": selection,
        "lambda_t": args.lambda_t,
        "all": summarise(rows),
        "by_kind": {k: summarise([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})},
        "by_size": {s: summarise([r for r in rows if r["size"] == s]) for s in ("<5%", "5-15%", "15-35%", ">=35%") if any(r["size"] == s for r in rows)},
    }
    return summary, rows


def vars_of(cfg: Any) -> dict[str, Any]:
    return {"components": cfg.components, "selection": cfg.selection}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 3)  # noqa: E731
    wins = [r for r in rows if r["pt_wins"]]
    out = {
        "n": len(rows),
        "proposal_recall": mean("recall"),
        "pointing_qa": mean("point_qa"),
        "pointing_va": mean("point_va"),
        "pt_iou_gt_0.5": round(float(np.mean([r["pt_iou"] > 0.5 for r in rows])), 3),
        "pt_area_ratio_median": round(float(np.median([r["pt_area"] for r in rows])), 3),
        **{name: mean(name) for name in ROWS},
        "pt_wins_sf": round(len(wins) / len(rows), 3),
        "pt_right_when_wins": round(float(np.mean([r["QAM+COM+SF"] for r in wins])), 3) if wins else None,
        "oracle_com": mean("oracle_com"),
    }
    return out


if __name__ == "__main__":
    main()
