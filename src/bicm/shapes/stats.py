"""The statistics the shapes world is fitted to, measured on the real benchmarks and on it.

What matters for grounding, per protocol:

* ``area``: the referred box's area as a share of the image (percentiles 10/25/50/75/90);
* ``aspect``: the referred box's width / height (percentiles 25/50/75) of single-object
  queries;
* ``words``: words per query (mean and median);
* ``plural``: the share of plural phrases (phrase protocol);
* ``objects``: distinct annotated boxes per image (a lower bound on the objects in a real
  image; for the world: the objects drawn).

The real numbers come from the TransVG-format split files: ``flickr_test.pth`` (Flickr30K
Entities test: the phrase protocol) and ``unc_val.pth`` (RefCOCO val: the referring
protocol). The files hold no image sizes, so each image's size is estimated from its boxes:
Flickr30K images are 500 px on the long side (375 or 333 on the short one, or the farthest
box edge if that is larger), COCO images 640 px on the long side (480 on the short one, or
the farthest box edge). A phrase is counted plural when its head noun is plural or it holds
a number or group word ("two dogs", "people", "group men", "couple"); the files store one
union box per phrase, so plural form is the measurable proxy of a multi-box phrase.

``BENCHMARK`` below was written by :func:`benchmark_stats` from those files
(``python -m bicm.shapes.stats /path/to/transvg-splits``); a test recomputes it where the
files are present. :data:`TOLERANCE` says how close the world must come; :func:`compare`
checks it and :func:`markdown` writes the side-by-side table of the docs.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["BENCHMARK", "TOLERANCE", "benchmark_stats", "sample_stats", "world_stats", "compare", "markdown", "is_plural"]

AREA_Q = (0.10, 0.25, 0.50, 0.75, 0.90)
ASPECT_Q = (0.25, 0.50, 0.75)
#: protocol -> real split file
SOURCES = {"phrase": ("flickr_test", "flickr"), "ref": ("unc_val", "unc")}

#: Measured by benchmark_stats() on flickr_test.pth and unc_val.pth (see the module doc).
BENCHMARK: dict[str, dict[str, Any]] = {
    "phrase": {
        "source": "Flickr30K Entities test (flickr_test.pth)",
        "images": 999,
        "queries": 14481,
        "area": [
            0.021,
            0.0683,
            0.2083,
            0.4282,
            0.6549
        ],
        "aspect": [
            0.6561,
            0.9474,
            1.4904
        ],
        "words_mean": 1.59,
        "words_median": 1.0,
        "plural": 0.22,
        "objects_median": 6.0
    },
    "ref": {
        "source": "RefCOCO val (unc_val.pth)",
        "images": 1500,
        "queries": 10834,
        "area": [
            0.0644,
            0.0883,
            0.1368,
            0.2355,
            0.3846
        ],
        "aspect": [
            0.4986,
            0.7458,
            1.1061
        ],
        "words_mean": 3.57,
        "words_median": 3.0,
        "plural": 0.0,
        "objects_median": 2.0
    },
}

#: How close the world must be: percentiles within a factor (ratio world / real), the word
#: mean within an absolute number of words, the plural share within absolute points.
TOLERANCE: dict[str, float] = {"area_factor": 1.25, "aspect_factor": 1.2, "words_mean": 0.5, "plural": 0.04}

_GROUP_WORDS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "some",
                "few", "both", "multiple", "various", "group", "couple", "pair", "lots", "bunch", "crowd", "dozen"}
_PLURAL_NOUNS = {"people", "men", "women", "children", "kids", "persons", "teeth", "feet", "geese", "mice", "police",
                 "crowd", "group", "couple", "pair", "team", "family", "band", "audience"}
_NOT_PLURAL = {"glass", "dress", "grass", "bus", "class", "address", "pants", "jeans", "shorts", "glasses", "sunglasses",
               "clothes", "stairs", "goggles", "scissors", "trousers", "overalls", "tights", "news", "series", "species",
               "tennis", "gymnastics", "is", "was", "this", "his", "its", "as", "us", "chess", "canvas", "lens", "kiss",
               "cross", "walrus", "cactus", "circus", "campus", "status", "corps", "bass", "mattress", "harness",
               "business", "process", "boss", "moss", "press", "fitness"}


def is_plural(phrase: str) -> bool:
    """Whether a phrase names several things (a number or group word, or a plural head noun)."""
    words = phrase.lower().split()
    if not words:
        return False
    if any(w in _GROUP_WORDS for w in words):
        return True
    last = words[-1]
    if last in _PLURAL_NOUNS:
        return True
    if last in _NOT_PLURAL:
        return False
    return last.endswith("s") and not last.endswith("ss") and len(last) > 3


def _image_size(dataset: str, boxes: Sequence[Sequence[float]]) -> tuple[float, float]:
    mx = max(b[2] for b in boxes)
    my = max(b[3] for b in boxes)
    long_side, short_side = (500.0, 375.0) if dataset == "flickr" else (640.0, 480.0)
    if mx >= my:
        return long_side, max(my, short_side)
    return max(mx, short_side), long_side


def _summary(areas: Iterable[float], aspects: Iterable[float], words: Iterable[int], plural: Iterable[bool],
             objects: Iterable[int]) -> dict[str, Any]:
    a, r, w, p, o = (np.asarray(list(x), dtype=float) for x in (areas, aspects, words, plural, objects))
    return {
        "queries": int(len(w)),
        "area": [round(float(v), 4) for v in np.quantile(a, AREA_Q)],
        "aspect": [round(float(v), 4) for v in np.quantile(r, ASPECT_Q)],
        "words_mean": round(float(w.mean()), 2),
        "words_median": float(np.median(w)),
        "plural": round(float(p.mean()), 3),
        "objects_median": float(np.median(o)),
    }


def benchmark_stats(folder: Path | str) -> dict[str, dict[str, Any]]:
    """:data:`BENCHMARK` recomputed from the TransVG-format split files in ``folder``."""
    from ..data.transvg import read_transvg_split

    out = {}
    for protocol, (name, dataset) in SOURCES.items():
        samples = read_transvg_split(Path(folder) / f"{name}.pth", dataset)
        by_image: dict[str, list] = defaultdict(list)
        for s in samples:
            by_image[s.image_file].append(s)
        areas, aspects, words, plural, objects = [], [], [], [], []
        for group in by_image.values():
            width, height = _image_size(dataset, [s.box for s in group])
            for s in group:
                x1, y1, x2, y2 = s.box
                areas.append((x2 - x1) * (y2 - y1) / (width * height))
                words.append(len(s.query.split()))
                plural.append(is_plural(s.query) if protocol == "phrase" else False)
                if not plural[-1]:
                    aspects.append((x2 - x1) / max(y2 - y1, 1e-6))
            objects.append(len({tuple(round(v) for v in s.box) for s in group}))
        stats = _summary(areas, aspects, words, plural, objects)
        stats["plural"] = round(stats["plural"], 2)
        out[protocol] = {"source": BENCHMARK[protocol]["source"], "images": len(by_image), **stats}
    return out


def sample_stats(records: Sequence[dict[str, Any]], sizes: dict[str, tuple[int, int]], objects: dict[str, int]) -> dict[str, Any]:
    """Statistics of shapes-world records (``image``, ``query``, ``kind``, ``box``), with the
    image sizes and object counts by image."""
    areas, aspects, words, plural = [], [], [], []
    for r in records:
        x1, y1, x2, y2 = r["box"]
        width, height = sizes[r["image"]]
        areas.append((x2 - x1) * (y2 - y1) / (width * height))
        words.append(len(r["query"].split()))
        plural.append(r["kind"] == "plural")
        if r["kind"] != "plural":
            aspects.append((x2 - x1) / (y2 - y1))
    return _summary(areas, aspects, words, plural, objects.values())


def world_stats(protocol: str, split: str = "val", images: Optional[int] = None) -> dict[str, Any]:
    """Statistics of a split of the world, generated in memory (no files)."""
    from .dataset import PER_IMAGE, SPLITS, _record, pick_expressions, scene_for, split_seed

    count = images or SPLITS[split][1]
    records, sizes, objects = [], {}, {}
    for index in range(count):
        scene = scene_for(protocol, split, index)
        rng = np.random.default_rng([split_seed(protocol, split), index, 1])
        for k, e in enumerate(pick_expressions(scene, PER_IMAGE[protocol], rng)):
            records.append(_record(split, index, k, e, scene))
        key = f"{split}/{index:05d}.png"
        sizes[key] = (scene.width, scene.height)
        objects[key] = len(scene.objects)
    return sample_stats(records, sizes, objects)


def compare(world: dict[str, Any], real: dict[str, Any], protocol: str) -> list[str]:
    """What is outside :data:`TOLERANCE` (empty when the world matches)."""
    problems = []
    for what, key in (("area", "area_factor"), ("aspect", "aspect_factor")):
        for q, (w, r) in enumerate(zip(world[what], real[what])):
            if abs(math.log(w / r)) > math.log(TOLERANCE[key]):
                problems.append(f"{what} percentile #{q}: world {w:.3f}, real {r:.3f} (factor {TOLERANCE[key]})")
    if abs(world["words_mean"] - real["words_mean"]) > TOLERANCE["words_mean"]:
        problems.append(f"words per query: world {world['words_mean']:.2f}, real {real['words_mean']:.2f}")
    if protocol == "phrase" and abs(world["plural"] - real["plural"]) > TOLERANCE["plural"]:
        problems.append(f"plural share: world {world['plural']:.3f}, real {real['plural']:.3f}")
    return problems


def markdown(worlds: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table (real benchmark vs world) of both protocols."""
    lines = ["| statistic | " + " | ".join(f"{BENCHMARK[p]['source'].split(' (')[0]} | shapes-{p}" for p in worlds) + " | tolerance |",
             "|---|" + "---:|---:|" * len(worlds) + "---|"]

    def row(label: str, get, tol: str) -> None:
        cells = []
        for p, w in worlds.items():
            cells += [get(BENCHMARK[p]), get(w)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {tol} |")

    for i, q in enumerate(AREA_Q):
        row(f"referred area / image, p{int(q * 100)}", lambda s, i=i: f"{s['area'][i]:.3f}", f"x{TOLERANCE['area_factor']}")
    for i, q in enumerate(ASPECT_Q):
        row(f"box width / height, p{int(q * 100)}", lambda s, i=i: f"{s['aspect'][i]:.2f}", f"x{TOLERANCE['aspect_factor']}")
    row("words per query, mean", lambda s: f"{s['words_mean']:.2f}", f"+-{TOLERANCE['words_mean']}")
    row("words per query, median", lambda s: f"{s['words_median']:g}", "-")
    row("plural share", lambda s: f"{s['plural']:.2f}", f"+-{TOLERANCE['plural']} (phrase)")
    row("objects per image, median", lambda s: f"{s['objects_median']:g}", "- (real: annotated boxes, a lower bound)")
    row("queries", lambda s: f"{s['queries']}", "-")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:  # pragma: no cover - a maintenance script
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(json.dumps(benchmark_stats(args[0]), indent=1))
    worlds = {p: world_stats(p, "test") for p in ("phrase", "ref")}
    print(markdown(worlds))
    for p, w in worlds.items():
        print(p, compare(w, BENCHMARK[p], p) or "within tolerance")


if __name__ == "__main__":  # pragma: no cover
    main()
