"""Analysis only: KAM trained on TRUE labels instead of pseudo labels (not unpaired!).

Does the KAM machinery (the MLP inputs, training, Eq. 11 at inference) help when its labels
are right? This script writes a run folder in `bicm pseudo-label`'s format from a PAIRED
split with ground truth (default: the `val` split of a shapes protocol): every query is grounded as
`bicm pseudo-label` would, and its label is the candidate with the highest IoU with the true
box (pairs whose best candidate has IoU <= 0.5 are left out). Then

    python benchmarks/kam_true_labels.py --dataset shapes-ref --out runs/kam-true
    bicm train-kam runs/kam-true --out kam-true.safetensors
    bicm eval --dataset shapes-ref --split test --model shapes --proposals shapes-detector \\
        --lambda-t auto --kam kam-true.safetensors --ablation table4

separates "the labels are wrong" from "the adaptation does not work". The result is an
upper bound for KAM with this backbone and these proposals, never a result of the method.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torchvision.ops import box_iou

from bicm.api import Grounder
from bicm.config import Needs, config_dict
from bicm.cache import FeatureCache
from bicm.data import load_dataset
from bicm.imageio import load_image
from bicm.jsonl import JsonlAppender
from bicm.proposals.sources import make_source
from bicm.pseudo import PseudoRun, pair_key
from bicm.shapes.dataset import protocol_of, shapes_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes-ref", choices=["shapes-ref", "shapes-phrase"])
    parser.add_argument("--split", default="val")
    parser.add_argument("--proposals", default="shapes-detector")
    parser.add_argument("--name-with", default=None, help="name class-agnostic proposals (selective search: shapes)")
    parser.add_argument("--lambda-t", type=float, default=None, help="[default: the model's calibrated value]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top-n", type=int, default=100)
    args = parser.parse_args()

    from bicm.checkpoints import recorded_lambda_t

    root = shapes_folder(None, protocol_of(args.dataset), args.split)
    samples = load_dataset(args.dataset, args.split, root, image_root=root)
    lambda_t = args.lambda_t if args.lambda_t is not None else (recorded_lambda_t("shapes") or 1000.0)
    grounder = Grounder.from_pretrained("shapes", device="cpu", name_with=args.name_with, lambda_t=lambda_t)
    source = make_source(args.proposals, top_n=args.top_n)
    cfg = grounder.config
    run = PseudoRun(
        images=f"TRUE LABELS: {args.dataset} {args.split} (analysis only, not unpaired)",
        queries=f"{args.dataset} {args.split}",
        n_images=len({s.image_file for s in samples}),
        n_queries=len(samples),
        proposals=source.id,
        model=f"{grounder.backbone.name}@{grounder.backbone.fingerprint()}",
        config=config_dict(cfg),
        thr_k=0.5,
        features_above=0.0,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps(asdict(run), indent=1) + "\n")
    store = FeatureCache(args.out / "kam_features.sqlite")
    by_image: dict[str, list] = {}
    for s in samples:
        by_image.setdefault(s.image_file, []).append(s)
    kept = skipped = 0
    with JsonlAppender(args.out / "pairs.jsonl", key_field="id") as out:
        for n, (image_file, group) in enumerate(by_image.items(), start=1):
            group = [s for s in group if s.sample_id not in out.done]
            if not group:
                continue
            pil = load_image(root / image_file, exif_transpose=False)
            features = grounder.extract(pil, [s.query for s in group], source, image_key=image_file, needs=grounder.config.needs() | Needs(kam=True))
            results = grounder.score(features, cfg)
            records = []
            for i, (sample, result) in enumerate(zip(group, results)):
                boxes = result.candidates.boxes
                ious = box_iou(boxes, torch.tensor([sample.box]))[:, 0]
                best = int(ious.argmax())
                record = {"id": sample.sample_id, "image": image_file, "query": sample.query, "box": [round(v, 2) for v in boxes[best].tolist()]}
                if float(ious[best]) <= 0.5:
                    records.append({**record, "score": None, "iou": float(ious[best])})
                    skipped += 1
                    continue
                fp, fc = grounder.candidate_features(features, i, cfg)
                tensors = {"fi": features.image_feat, "fq": features.text[i], "fp": fp.half(), "boxes": boxes}
                if fc is not None:
                    tensors["fc"] = fc.half()
                store.put_many({pair_key(sample.sample_id): (tensors, {"target": [best], "score": 1.0})})
                records.append({**record, "score": 1.0, "iou": float(ious[best]), "selected": [best], "features": True})
                kept += 1
            out.append(records)
            print(f"\r{n}/{len(by_image)} images, {kept} labels, {skipped} queries without a candidate of IoU > 0.5", end="", flush=True)
    store.close()
    print(f"\nwrote {args.out}: train with  bicm train-kam {args.out}")


if __name__ == "__main__":
    main()
