"""The shapes dataset on disk: deterministic splits, written once and read like the others.

Splits (each a pure function of its seed):

* ``test``: 600 images, up to 4 expressions each, types balanced (>= 2,000 queries);
* ``val``: 150 images, the same way;
* ``train``: unpaired, for KAM: 2,000 images (``train_images.jsonl``) and the expressions of
  2,000 OTHER scenes (``train_queries.jsonl``). The images' own ground truth is kept apart in
  ``train_truth.jsonl`` for analysis only.

``ensure_shapes(root)`` writes whatever is missing (atomically, split by split); the default
root is ``~/.cache/bicm/shapes-v1`` (``$XDG_CACHE_HOME`` honoured). ``bicm eval --dataset
shapes --split test`` uses it without further options.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..atomic import atomic_write_text
from ..errors import BicmError
from .world import Expression, Scene, expressions, make_scene, render

__all__ = ["SPLITS", "default_root", "ensure_shapes", "read_shapes", "scene_for", "pick_expressions"]

VERSION = "v1"
#: split -> (seed, number of images, expressions per image)
SPLITS: dict[str, tuple[int, int, int]] = {"test": (1, 600, 4), "val": (2, 150, 4), "train": (3, 2000, 1)}
KIND_ORDER = ("position", "plural", "category", "attribute")


def default_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bicm" / f"shapes-{VERSION}"


def scene_for(seed: int, index: int) -> Scene:
    """The ``index``-th scene of a split (deterministic)."""
    return make_scene(np.random.default_rng([seed, index]))


def pick_expressions(scene: Scene, limit: int, rng: np.random.Generator) -> list[Expression]:
    """Up to ``limit`` expressions of a scene, spreading over the four types (rarer types first)."""
    by_kind: dict[str, list[Expression]] = {}
    for e in expressions(scene):
        by_kind.setdefault(e.kind, []).append(e)
    for items in by_kind.values():
        rng.shuffle(items)  # type: ignore[arg-type]
    chosen: list[Expression] = []
    while len(chosen) < limit and any(by_kind.values()):
        for kind in KIND_ORDER:
            if by_kind.get(kind) and len(chosen) < limit:
                chosen.append(by_kind[kind].pop())
    return chosen


def _record(split: str, index: int, k: int, e: Expression, scene: Scene) -> dict:
    return {
        "id": f"{split}-{index:05d}-{k}",
        "image": f"{split}/{index:05d}.png",
        "query": e.text,
        "kind": e.kind,
        "boxes": [list(scene.objects[t].box) for t in e.targets],
        "box": list(e.box),
        "split": split,
    }


def _write_split(root: Path, split: str, progress: Optional[Callable[[int, int], None]], count: Optional[int] = None) -> None:
    seed, default_count, per_image = SPLITS[split]
    count = default_count if count is None else count
    tmp = root / f".{split}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / split).mkdir(parents=True)
    lines, truth, queries = [], [], []
    for index in range(count):
        scene = scene_for(seed, index)
        render(scene).save(tmp / split / f"{index:05d}.png")
        rng = np.random.default_rng([seed, index, 1])
        chosen = pick_expressions(scene, per_image, rng)
        if split == "train":
            truth.extend(_record(split, index, k, e, scene) for k, e in enumerate(expressions(scene)))
            other = scene_for(seed + 1000, index)  # the queries come from OTHER scenes: unpaired
            queries.extend({"id": f"q-{index:05d}-{k}", "query": e.text, "kind": e.kind}
                           for k, e in enumerate(pick_expressions(other, 1, rng)))
        else:
            lines.extend(_record(split, index, k, e, scene) for k, e in enumerate(chosen))
        if progress:
            progress(index + 1, count)
    if split == "train":
        images = [{"image": f"train/{i:05d}.png"} for i in range(count)]
        atomic_write_text(tmp / "train_images.jsonl", "".join(json.dumps(r) + "\n" for r in images))
        atomic_write_text(tmp / "train_queries.jsonl", "".join(json.dumps(r) + "\n" for r in queries))
        atomic_write_text(tmp / "train_truth.jsonl", "".join(json.dumps(r) + "\n" for r in truth))
    else:
        atomic_write_text(tmp / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    for item in tmp.iterdir():  # move the finished split into place
        target = root / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
    tmp.rmdir()


def _complete(root: Path, split: str) -> bool:
    marker = root / ("train_truth.jsonl" if split == "train" else f"{split}.jsonl")
    return marker.is_file() and (root / split).is_dir()


def ensure_shapes(
    root: Union[str, Path, None] = None,
    splits: tuple[str, ...] = ("test", "val", "train"),
    progress: Optional[Callable[[str, int, int], None]] = None,
    counts: Optional[dict[str, int]] = None,
) -> Path:
    """Write the splits that are not on disk yet; returns the root.

    ``counts`` overrides the number of images of a split (small worlds for tests; the
    first images are the same as in the full split).
    """
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        if split not in SPLITS:
            raise BicmError(f"unknown shapes split {split!r}; use {', '.join(SPLITS)}")
        if not _complete(root, split):
            report = None if progress is None else (lambda i, n, s=split: progress(s, i, n))
            _write_split(root, split, report, (counts or {}).get(split))
    return root


def read_shapes(root: Union[str, Path, None], split: str):
    """The paired samples of ``val`` or ``test`` (generated on first use)."""
    from ..data.sample import GroundingSample

    if split == "train":
        raise BicmError("the shapes train split is unpaired (images and queries apart, for KAM); evaluate val or test")
    if split not in SPLITS:
        raise BicmError(f"unknown shapes split {split!r}; use test, val or train")
    root = ensure_shapes(root, (split,))
    samples = []
    for line in (root / f"{split}.jsonl").read_text().splitlines():
        r = json.loads(line)
        samples.append(GroundingSample.from_boxes(r["id"], Path(r["image"]).stem, r["image"], r["query"], r["boxes"], kind=r["kind"]))
    return samples
