"""Time per image of each proposal source (and of CLIP naming) on this machine.

Workload: a 500x375 image (Flickr30K-sized) of textured noise with 12 drawn objects.
Faster R-CNN runs with random weights saved in torchvision's format (same compute as the
real weights, which cannot be downloaded here). Run by hand:

    python benchmarks/bench_proposals.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import random_vit_b32, timed
from PIL import Image, ImageDraw

from bicm.proposals.files import write_detections
from bicm.proposals.naming import ClipNamer
from bicm.proposals.sources import make_source


def scene(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.normal(110, 25, (375, 500, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.uniform(0, 420), rng.uniform(0, 300)
        w, h = rng.uniform(20, 120, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + w, y + h), fill=colour)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    image = scene()
    report: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp())

    from torchvision.models import detection

    for mode in ("fast", "quality"):
        source = make_source("selective-search", mode=mode)
        report[f"selective-search {mode}"] = timed(lambda: source.propose(image), args.repeats)
        report[f"selective-search {mode} boxes"] = len(source.propose(image))
    for arch in ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        torch.manual_seed(0)
        model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=91)
        path = tmp / f"{arch}.pth"
        torch.save(model.state_dict(), path)
        source = make_source("faster-rcnn", arch=arch, checkpoint=path, device="cpu")
        source.propose(image)  # warm-up
        report[f"faster-rcnn {arch}"] = timed(lambda: source.propose(image), args.repeats)
    boxes = make_source("selective-search").propose(image)
    dets = write_detections(tmp / "dets.jsonl", {"img.png": boxes})
    report["file (read + lookup)"] = timed(lambda: make_source(str(dets)).propose(image, "img.png"), args.repeats)

    backbone = random_vit_b32()
    namer = ClipNamer(backbone, "vg1600")
    start = time.perf_counter()
    namer.text_features  # the 1600 prompts, once per process
    report["naming: encode vg1600 prompts (once)"] = time.perf_counter() - start
    report[f"naming: {len(boxes)} boxes (crops + classify)"] = timed(lambda: namer.name(boxes, image), args.repeats)

    for key, value in report.items():
        print(f"{key:>45}: {value:.3f}" if isinstance(value, float) else f"{key:>45}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
