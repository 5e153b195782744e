"""The shapes world on disk: two protocols, deterministic splits, written once.

Two datasets, one per protocol of the paper (Sec. 4.1):

* ``shapes-phrase`` (Flickr30K Entities-like): singular and plural phrases; the truth of a
  plural phrase is the union box; selection: union of the above-mean boxes;
* ``shapes-ref`` (RefCOCO-like): one object per expression; selection: the largest of the
  above-mean boxes.

Each has the splits (pure functions of their seeds):

* ``test``: 500 images, up to 6 (phrase) or 5 (ref) expressions each (> 2,000 queries);
* ``val``: 150 images, the same way (tune here, never on test);
* ``train``: unpaired, as in the paper: the images of 3,000 train scenes
  (``train_images.jsonl``) and the expressions of the SAME scenes with the pairing dropped
  (``train_queries.jsonl``, in a shuffled order, without images or boxes). The truth is kept
  apart in ``train_truth.jsonl`` for Table 7 only, and the object boxes with their category
  names in ``train_objects.jsonl`` (detection data for ``bicm train-detector``, never
  expressions).

``ensure_shapes(root, "ref")`` writes whatever is missing (atomically, split by split); the
default root is ``~/.cache/bicm/shapes-v2`` (``$XDG_CACHE_HOME`` honoured), one folder per
protocol. A folder written by another version of the world is refused, never mixed.
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
from ..jsonl import read_records
from ..safeload import regular_file
from .world import KINDS, PROFILES, WORLD_VERSION, Expression, Scene, expressions, make_scene, render

__all__ = [
    "PROTOCOLS",
    "DATASETS",
    "SPLITS",
    "default_root",
    "protocol_of",
    "ensure_shapes",
    "read_shapes",
    "scene_for",
    "pick_expressions",
]

VERSION = WORLD_VERSION
PROTOCOLS: tuple[str, ...] = ("phrase", "ref")
#: dataset name -> protocol
DATASETS: dict[str, str] = {"shapes-phrase": "phrase", "shapes-ref": "ref"}
#: split -> (seed offset, number of images); expressions per image come from PER_IMAGE
SPLITS: dict[str, tuple[int, int]] = {"test": (1, 500), "val": (2, 150), "train": (3, 3000)}
PER_IMAGE: dict[str, int] = {"phrase": 6, "ref": 5}
_PROTOCOL_SEED = {"phrase": 100, "ref": 200}
_MARKER = "WORLD"

#: The fields each record of the world's files must hold, by kind (see bicm.jsonl.FIELD_KINDS);
#: every reader of these files checks them with bicm.jsonl.read_records.
SPLIT_FIELDS = {"id": "text", "image": "path", "query": "text", "kind": "text", "boxes": "xyxy_boxes", "box": "xyxy", "world": "str"}
TRAIN_FIELDS = {
    "train_images.jsonl": {"image": "path"},
    "train_queries.jsonl": {"query": "text"},
    "train_truth.jsonl": {"image": "path", "query": "text", "box": "xyxy"},
    "train_objects.jsonl": {"image": "path", "boxes": "xyxy_boxes", "class_names": "names"},
}


def default_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bicm" / f"shapes-{VERSION}"


def protocol_of(dataset: str) -> str:
    """``"phrase"`` or ``"ref"`` for a dataset name (``shapes-phrase``, ``shapes-ref``)."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    if dataset == "shapes":
        raise BicmError("the shapes world has two protocols since v2: use --dataset shapes-ref (RefCOCO-like) or shapes-phrase (Flickr30K-like)")
    raise BicmError(f"unknown shapes dataset {dataset!r}; use shapes-ref or shapes-phrase")


def split_seed(protocol: str, split: str) -> int:
    return _PROTOCOL_SEED[protocol] + SPLITS[split][0]


def scene_for(protocol: str, split: str, index: int) -> Scene:
    """The ``index``-th scene of a split (deterministic)."""
    return make_scene(np.random.default_rng([split_seed(protocol, split), index]), protocol)


def pick_expressions(scene: Scene, limit: int, rng: np.random.Generator) -> list[Expression]:
    """Up to ``limit`` expressions of a scene, drawn by the kind weights of its profile
    (without replacement; a kind the scene cannot say is skipped), phrased in its style."""
    weights = PROFILES[scene.profile].kind_weights
    by_kind: dict[str, list[Expression]] = {}
    for e in expressions(scene, rng=rng):
        if weights.get(e.kind, 0) > 0:
            by_kind.setdefault(e.kind, []).append(e)
    for items in by_kind.values():
        rng.shuffle(items)  # type: ignore[arg-type]
    chosen: list[Expression] = []
    while len(chosen) < limit and any(by_kind.values()):
        kinds = [k for k in KINDS if by_kind.get(k)]
        p = np.array([weights[k] for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
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
        "world": VERSION,
    }


def _write_split(root: Path, protocol: str, split: str, progress: Optional[Callable[[int, int], None]], count: Optional[int]) -> None:
    seed = split_seed(protocol, split)
    count = SPLITS[split][1] if count is None else count
    per_image = PER_IMAGE[protocol]
    tmp = root / f".{split}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / split).mkdir(parents=True)
    lines, truth, queries, objects = [], [], [], []
    for index in range(count):
        scene = scene_for(protocol, split, index)
        render(scene).save(tmp / split / f"{index:05d}.png")
        rng = np.random.default_rng([seed, index, 1])
        chosen = pick_expressions(scene, per_image, rng)
        if split == "train":
            truth.extend(_record(split, index, k, e, scene) for k, e in enumerate(chosen))
            queries.extend(e.text for e in chosen)
            objects.append({"image": f"{split}/{index:05d}.png", "width": scene.width, "height": scene.height,
                            "boxes": [list(o.box) for o in scene.objects], "class_names": [o.shape for o in scene.objects]})
        else:
            lines.extend(_record(split, index, k, e, scene) for k, e in enumerate(chosen))
        if progress:
            progress(index + 1, count)
    if split == "train":
        # the queries of the same scenes, pairing dropped: a seeded shuffle, text only
        order = np.random.default_rng([seed, 2]).permutation(len(queries))
        rows = [{"id": f"q-{n:05d}", "query": queries[int(i)]} for n, i in enumerate(order)]
        images = [{"image": f"train/{i:05d}.png"} for i in range(count)]
        atomic_write_text(tmp / "train_images.jsonl", "".join(json.dumps(r) + "\n" for r in images))
        atomic_write_text(tmp / "train_queries.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(tmp / "train_truth.jsonl", "".join(json.dumps(r) + "\n" for r in truth))
        atomic_write_text(tmp / "train_objects.jsonl", "".join(json.dumps(r) + "\n" for r in objects))
    else:
        atomic_write_text(tmp / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    for item in tmp.iterdir():  # move the finished split into place
        target = root / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
    tmp.rmdir()


def _complete(folder: Path, split: str) -> bool:
    marker = folder / ("train_objects.jsonl" if split == "train" else f"{split}.jsonl")
    return marker.is_file() and (folder / split).is_dir()


def _check_version(root: Path) -> None:
    marker = root / _MARKER
    if marker.is_file():
        found = marker.read_text().strip()
        if found != VERSION:
            raise BicmError(f"{root} holds the shapes world {found}, this bicm makes {VERSION}: use another folder (the default is {default_root()})")
        return
    legacy = [p.name for p in root.glob("*.jsonl")] if root.is_dir() else []
    if legacy:
        raise BicmError(f"{root} holds an older shapes world (v1: {legacy[0]}); this bicm makes {VERSION}: use another folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, VERSION + "\n")


def ensure_shapes(
    root: Union[str, Path, None] = None,
    protocol: str = "ref",
    splits: tuple[str, ...] = ("test", "val", "train"),
    progress: Optional[Callable[[str, int, int], None]] = None,
    counts: Optional[dict[str, int]] = None,
) -> Path:
    """Write the splits of ``protocol`` that are not on disk yet; returns the protocol's folder.

    ``counts`` overrides the number of images of a split (small worlds for tests; the first
    images are the same as in the full split).
    """
    if protocol not in PROTOCOLS:
        raise BicmError(f"unknown shapes protocol {protocol!r}; use phrase or ref")
    root = Path(root) if root is not None else default_root()
    _check_version(root)
    folder = root / protocol
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        if split not in SPLITS:
            raise BicmError(f"unknown shapes split {split!r}; use {', '.join(SPLITS)}")
        if not _complete(folder, split):
            report = None if progress is None else (lambda i, n, s=split: progress(s, i, n))
            _write_split(folder, protocol, split, report, (counts or {}).get(split))
    return folder


def shapes_folder(annotations: Union[str, Path, None], protocol: str, split: str) -> Path:
    """The folder of ``protocol`` holding ``split``, generated on first use.

    ``annotations`` may be the world's root (holding ``phrase/`` and ``ref/``) or a
    protocol folder itself.
    """
    if annotations is not None:
        given = Path(annotations)
        if given.name == protocol and (given.parent / _MARKER).is_file():
            return ensure_shapes(given.parent, protocol, (split,))
    return ensure_shapes(annotations, protocol, (split,))


def read_shapes(root: Union[str, Path, None], split: str, protocol: str = "ref"):
    """The paired samples of ``val`` or ``test`` of a protocol (generated on first use).

    Image paths are relative to the protocol's folder (``root/protocol``).
    """
    from ..data.sample import GroundingSample

    if split == "train":
        raise BicmError("the shapes train split is unpaired (images and queries apart, for KAM); evaluate val or test")
    if split not in SPLITS:
        raise BicmError(f"unknown shapes split {split!r}; use test, val or train")
    folder = shapes_folder(root, protocol, split)
    path = regular_file(folder / f"{split}.jsonl", "shapes split file")
    samples = []
    for where, r in read_records(path, SPLIT_FIELDS):
        if r["world"] != VERSION:
            raise BicmError(f"{where} is not shapes world {VERSION}; use another folder")
        if r["kind"] not in KINDS:
            raise BicmError(f"{where}: unknown kind {r['kind']!r}")
        samples.append(GroundingSample.from_boxes(r["id"], Path(r["image"]).stem, r["image"], r["query"], r["boxes"], kind=r["kind"]))
    return samples
