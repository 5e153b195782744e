"""Speed-up of a second `bicm eval` run thanks to the feature cache.

Workload: a generated dataset (500x375 images of textured noise with drawn shapes, 5
queries each), a ViT-B-32-sized CLIP with random weights, selective-search proposals
(top 100), every ablation row. The same evaluation runs twice into two run folders with one
cache file; the second run finds every proposal, crop and text embedding in the cache.

    python benchmarks/bench_eval_cache.py [--images 12] [--json out.json]
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
from common import random_vit_b32
from PIL import Image, ImageDraw

from bicm import BiCMConfig, Grounder
from bicm.cache import FeatureCache
from bicm.data import load_dataset
from bicm.evaluate import ablation_rows, run_eval
from bicm.proposals.selective import SelectiveSearch

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "yellow": (230, 210, 40), "white": (245, 245, 245), "purple": (150, 50, 170)}


def make_dataset(root: Path, n_images: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n_images):
        image = Image.fromarray(rng.normal(110, 25, (375, 500, 3)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for j, (name, colour) in enumerate(COLOURS.items()):
            x, y = 20 + 95 * j, int(rng.uniform(20, 250))
            draw.rectangle((x, y, x + 70, y + 90), fill=colour)
            lines.append({"id": f"{i}-{j}", "image": f"{i}.png", "query": f"the {name} box", "box": [x, y, x + 71, y + 91]})
        image.save(root / "images" / f"{i}.png")
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp())
    samples = load_dataset("jsonl", "test", make_dataset(root, args.images))
    backbone = random_vit_b32()
    backbone.fingerprint()  # hashed once per process; not part of either run's time
    rows = ablation_rows("all", BiCMConfig(selection="largest-above-mean"))
    times = []
    for run in ("first", "second"):
        cache = FeatureCache(root / "cache.sqlite")
        grounder = Grounder(backbone, rows[0][1], cache=cache)
        start = time.perf_counter()
        summary = run_eval(grounder, samples, root / "images", root / run, rows, dataset="jsonl", split="test",
                           source=SelectiveSearch(top_n=100), progress=False)
        times.append(time.perf_counter() - start)
        print(f"{run} run: {times[-1]:.1f} s ({len(samples)} queries, {args.images} images); cache hits "
              f"{cache.stats.hits}, misses {cache.stats.misses}; {summary['rows'][0]['name']} "
              f"{100 * summary['rows'][0]['accuracy']:.1f}%")
    first = json.loads((root / "first" / "summary.json").read_text())["rows"]
    second = json.loads((root / "second" / "summary.json").read_text())["rows"]
    print(f"speed-up: {times[0] / times[1]:.1f}x; same summary: {first == second}")
    if args.json:
        Path(args.json).write_text(json.dumps({"first_s": times[0], "second_s": times[1], "speedup": times[0] / times[1],
                                               "same_summary": first == second}, indent=1))


if __name__ == "__main__":
    main()
