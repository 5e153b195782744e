"""Time per image and per additional query of `Grounder.ground_many` (QAM + COM + SF).

Workload: a ViT-B-32-sized CLIP with random weights (QuickGELU, as OpenAI's), a 500x375
image (Flickr30K-sized), 100 proposals with class names. Run by hand:

    python benchmarks/bench_ground.py [--queries 15] [--repeats 3] [--device cpu] [--json out.json]

Prints the median wall time of one image with 1 query and with Q queries, the time per extra
query, and where the time of one image goes (crop encoding, QAM, text).
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from common import random_vit_b32, timed
from PIL import Image

from bicm import Grounder, Proposals
from bicm.crops import encode_crops
from bicm.preprocess import preprocess
from bicm.qam import compute_maps

QUERIES = [
    "a man in a blue shirt", "the dog on the left", "two children", "a red car", "the tree",
    "a woman holding an umbrella", "the building in the background", "a bicycle", "grass",
    "the sky", "a white boat", "people walking", "the small bird", "a wooden bench", "the road",
]


def make_grounder(device: str) -> Grounder:
    return Grounder(random_vit_b32(device))


def workload(seed: int = 0) -> tuple[Image.Image, Proposals]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    xy = rng.uniform(0, [400, 300], size=(100, 2))
    wh = rng.uniform(20, 200, size=(100, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [500, 375])], axis=1)
    names = [f"object {i % 40}" for i in range(100)]
    return image, Proposals(torch.tensor(boxes, dtype=torch.float32), class_names=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    grounder = make_grounder(args.device)
    image, proposals = workload()
    queries = (QUERIES * 10)[: args.queries]
    grounder.ground_many(image, queries[:2], proposals)  # warm-up (class-name cache filled too)
    grounder.class_names._cache.clear()

    def fresh(qs):
        grounder.class_names._cache.clear()  # a new image's class names are not cached yet
        return grounder.ground_many(image, qs, proposals)

    t1 = timed(lambda: fresh(queries[:1]), args.repeats)
    tq = timed(lambda: fresh(queries), args.repeats)
    per_query = (tq - t1) / max(1, args.queries - 1)

    backbone = grounder.backbone
    pixels, geometry = preprocess(image, backbone.spec)
    text = backbone.encode_text(queries)
    t_crops = timed(lambda: encode_crops(backbone, image, proposals.boxes), args.repeats)
    t_qam = timed(lambda: compute_maps(backbone, pixels, geometry, text), args.repeats)
    t_text = timed(lambda: backbone.encode_text(queries), args.repeats)

    report = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "proposals": 100,
        "queries": args.queries,
        "image_1_query_s": round(t1, 3),
        f"image_{args.queries}_queries_s": round(tq, 3),
        "per_extra_query_s": round(per_query, 4),
        "crop_encoding_100_s": round(t_crops, 3),
        "crops_per_s": round(100 / t_crops, 1),
        f"qam_{args.queries}_queries_s": round(t_qam, 3),
        f"text_{args.queries}_queries_s": round(t_text, 4),
    }
    for key, value in report.items():
        print(f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
