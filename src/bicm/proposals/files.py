"""Detections files: image -> boxes (+ optional scores and class names).

Accepted layouts (JSON or JSON Lines; the box format must be declared, in the file as
``"box_format": "xyxy"`` or ``"xywh"``, per record or at the top, or by the caller):

JSON Lines, one image per line::

    {"image": "img.png", "box_format": "xyxy", "boxes": [[x1, y1, x2, y2], ...],
     "scores": [0.9, ...], "class_names": ["dog", ...]}

JSON, a mapping of images (or a list of records as above)::

    {"box_format": "xywh",
     "images": {"img.png": {"boxes": [[x, y, w, h], ...], "class_names": [...]}}}

A record may also list detections one by one: ``"detections": [{"box": [...],
"score": 0.9, "class_name": "dog"}, ...]``; a bare list of boxes is accepted as a record.
Image keys are matched against an image path exactly, then by file name, then by stem, then
by the number that ends the stem (``COCO_train2014_000000581857.jpg`` -> ``581857``).

bicm writes JSON Lines (:func:`write_detections`, :class:`DetectionsAppender` for resumable
extraction); :func:`read_proposals_file` also reads the ReCLIP and bottom-up-attention TSV
formats (:mod:`bicm.proposals.formats`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from ..atomic import atomic_write_text
from ..errors import BicmError
from ..safeload import json_loads, regular_file
from ..jsonl import JsonlAppender
from . import Proposals

__all__ = [
    "DetectionsFile",
    "DetectionsAppender",
    "read_detections",
    "read_proposals_file",
    "write_detections",
    "to_record",
    "BOX_FORMATS",
]

BOX_FORMATS = ("xyxy", "xywh")
_IMAGE_KEYS = ("image", "image_id", "file_name", "filename", "img")
_NAME_KEYS = ("class_names", "classes", "labels", "names")
_ONE_NAME_KEYS = ("class_name", "class", "label", "name")


@dataclass
class DetectionsFile:
    """The proposals of every image in a detections file."""

    path: Path
    entries: dict[str, Proposals]

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, image: Union[str, Path]) -> Proposals:
        """The proposals of ``image`` (matched by path, then file name, then stem)."""
        image = Path(image)
        for key in (str(image), image.as_posix(), image.name, image.stem):
            if key in self.entries:
                return self.entries[key]
        by_name = {Path(k).name: k for k in self.entries}
        if image.name in by_name:
            return self.entries[by_name[image.name]]
        by_stem = {Path(k).stem: k for k in self.entries}
        if image.stem in by_stem:
            return self.entries[by_stem[image.stem]]
        number = re.search(r"(\d+)$", image.stem)
        if number and str(int(number.group(1))) in self.entries:
            return self.entries[str(int(number.group(1)))]
        examples = ", ".join(list(self.entries)[:3])
        raise BicmError(f"no detections for {image.name} in {self.path.name} (it has {len(self)} images, e.g. {examples})")


def read_detections(path: Union[str, Path], box_format: Optional[str] = None) -> DetectionsFile:
    """Read a detections file (JSON or JSONL, see the module docs).

    Parameters
    ----------
    box_format: ``"xyxy"`` or ``"xywh"`` for files that do not declare it.
    """
    path = Path(path)
    if box_format is not None and box_format not in BOX_FORMATS:
        raise BicmError(f"unknown box format {box_format!r}; use xyxy or xywh")
    regular_file(path, "detections file", missing=f"detections file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not content
    except (OSError, UnicodeDecodeError) as exc:
        raise BicmError(f"cannot read detections file {path}: {exc}") from None
    source = f"file:{path.name}"
    records = list(_records(text, path))
    entries: dict[str, Proposals] = {}
    for where, record, default_format in records:
        key, proposals = _parse_record(record, default_format or box_format, source, f"{path.name}{where}")
        if key in entries:
            raise BicmError(f"{path.name}{where}: image {key!r} appears twice")
        entries[key] = proposals
    if not entries:
        raise BicmError(f"detections file {path} holds no images")
    return DetectionsFile(path, entries)


def _records(text: str, path: Path) -> Iterable[tuple[str, Any, Optional[str]]]:
    stripped = text.strip()
    if not stripped:
        raise BicmError(f"detections file {path} is empty")
    try:
        data = json_loads(stripped, path)
    except json.JSONDecodeError:
        data = None
    if data is None:  # JSON Lines
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json_loads(line, path)
            except json.JSONDecodeError as exc:
                raise BicmError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from None
            yield f" line {number}", record, None
        return
    if isinstance(data, list):
        for i, record in enumerate(data):
            yield f" record {i}", record, None
        return
    if not isinstance(data, dict):
        raise BicmError(f"{path.name}: expected a JSON object or list, got {type(data).__name__}")
    if any(k in data for k in _IMAGE_KEYS) and ("boxes" in data or "detections" in data):
        yield " record 0", data, None  # a single JSONL-style record
        return
    top_format = data.get("box_format")
    images = data.get("images", None)
    if images is None:
        images = {k: v for k, v in data.items() if k != "box_format"}
    if not isinstance(images, dict):
        raise BicmError(f"{path.name}: 'images' must map image names to detections")
    for key, value in images.items():
        record = dict(value) if isinstance(value, dict) else {"boxes": value}
        record.setdefault("image", key)
        yield f" image {key!r}", record, top_format


def _parse_record(record: Any, box_format: Optional[str], source: str, where: str) -> tuple[str, Proposals]:
    if not isinstance(record, Mapping):
        raise BicmError(f"{where}: expected an object with an image and boxes, got {type(record).__name__}")
    key = next((record[k] for k in _IMAGE_KEYS if k in record), None)
    if key is None:
        raise BicmError(f"{where}: no image name (one of {', '.join(_IMAGE_KEYS)})")
    key = str(key)
    fmt = record.get("box_format", box_format)
    if fmt is None:
        raise BicmError(f"{where}: the box format is not declared; add \"box_format\": \"xyxy\" (or xywh) or pass --box-format")
    if fmt not in BOX_FORMATS:
        raise BicmError(f"{where}: unknown box_format {fmt!r}; use xyxy or xywh")
    scores: Optional[list[Any]]
    names: Optional[list[Any]]
    if "detections" in record:
        dets = record["detections"]
        if not isinstance(dets, list):
            raise BicmError(f"{where}: 'detections' must be a list")
        boxes, scores, names = [], [], []
        for i, det in enumerate(dets):
            if not isinstance(det, Mapping) or "box" not in det:
                raise BicmError(f"{where}: detection {i} has no 'box'")
            boxes.append(det["box"])
            scores.append(det.get("score"))
            names.append(next((det[k] for k in _ONE_NAME_KEYS if k in det), None))
        if all(s is None for s in scores):
            scores = None
        elif any(s is None for s in scores):
            raise BicmError(f"{where}: some detections have a 'score' and some do not")
        names = None if all(n is None for n in names) else names
    else:
        boxes = record.get("boxes")
        if boxes is None:
            raise BicmError(f"{where}: no 'boxes' (or 'detections')")
        scores = record.get("scores")
        names = next((record[k] for k in _NAME_KEYS if k in record), None)
    boxes = _check_boxes(boxes, where)
    if scores is not None:
        if not isinstance(scores, list) or not all(_is_number(s) for s in scores):
            raise BicmError(f"{where}: 'scores' must be a list of numbers (one per box)")
        if not all(math.isfinite(s) for s in scores):
            raise BicmError(f"{where}: 'scores' holds NaN or infinite values")
        if len(scores) != len(boxes):
            raise BicmError(f"{where}: {len(boxes)} boxes but {len(scores)} scores")
    if names is not None:
        if not isinstance(names, list) or not all(n is None or isinstance(n, str) for n in names):
            raise BicmError(f"{where}: class names must be a list of strings (one per box)")
        if len(names) != len(boxes):
            raise BicmError(f"{where}: {len(boxes)} boxes but {len(names)} class names")
    name_scores = record.get("name_scores")
    if name_scores is not None and (
        not isinstance(name_scores, list)
        or len(name_scores) != len(boxes)
        or not all(_is_number(s) and math.isfinite(s) for s in name_scores)
    ):
        raise BicmError(f"{where}: 'name_scores' must be a list with one finite number per box")
    meta = {"origin": record["source"]} if isinstance(record.get("source"), str) else {}
    if isinstance(record.get("image_size"), list) and len(record["image_size"]) == 2:
        meta["image_size"] = list(record["image_size"])
    kwargs = dict(scores=scores, class_names=names, source=source, meta=meta, name_scores=name_scores)
    if fmt == "xywh":
        return key, Proposals.from_xywh(boxes if boxes else [], **kwargs)
    return key, Proposals(boxes if boxes else [], **kwargs)


def _check_boxes(boxes: Any, where: str) -> list[list[float]]:
    if not isinstance(boxes, list):
        raise BicmError(f"{where}: 'boxes' must be a list of [4 numbers]")
    out = []
    for i, box in enumerate(boxes):
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(_is_number(v) for v in box)
        ):
            raise BicmError(f"{where}: box {i} is not 4 numbers: {json.dumps(box)[:60]}")
        if not all(math.isfinite(v) for v in box):
            raise BicmError(f"{where}: box {i} has a non-finite coordinate")
        if any(abs(v) > _LARGEST for v in box):
            raise BicmError(f"{where}: box {i} has a coordinate beyond +-1e15 pixels: {json.dumps(box)[:60]}")
        out.append([float(v) for v in box])
    return out


#: Coordinates beyond this are not pixels (float32, the box type, rounds them to nonsense or inf).
_LARGEST = 1e15


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_proposals_file(
    path: Union[str, Path],
    file_format: str = "auto",
    box_format: Optional[str] = None,
    vocabulary: str = "vg1600",
    class_offset: int = 0,
) -> DetectionsFile:
    """Read any supported detections file.

    Parameters
    ----------
    file_format: ``"auto"`` (by extension and content), ``"bicm"``, ``"reclip"`` or ``"tsv"``.
    box_format: for bicm files that do not declare it.
    vocabulary, class_offset: how TSV class ids become names (see
        :func:`bicm.proposals.formats.read_bottom_up_tsv`).
    """
    from .formats import detect_format, read_bottom_up_tsv, read_reclip

    path = Path(path)
    regular_file(path, "detections file", missing=f"detections file not found: {path}")
    fmt = detect_format(path) if file_format == "auto" else file_format
    if fmt == "bicm":
        return read_detections(path, box_format)
    if fmt == "reclip":
        return read_reclip(path)
    if fmt == "tsv":
        return read_bottom_up_tsv(path, vocabulary=vocabulary, class_offset=class_offset)
    raise BicmError(f"unknown detections file format {file_format!r}; use auto, bicm, reclip or tsv")


def to_record(key: str, proposals: Proposals) -> dict[str, Any]:
    """One bicm JSONL record (boxes in xyxy)."""
    record: dict[str, Any] = {
        "image": key,
        "source": proposals.source,
        "box_format": "xyxy",
        "boxes": [[round(float(v), 2) for v in box] for box in proposals.boxes.tolist()],
    }
    if proposals.scores is not None:
        record["scores"] = [round(float(v), 5) for v in proposals.scores.tolist()]
    if proposals.class_names is not None:
        record["class_names"] = list(proposals.class_names)
    if proposals.name_scores is not None:
        record["name_scores"] = [round(float(v), 5) for v in proposals.name_scores.tolist()]
    if "image_size" in proposals.meta:
        record["image_size"] = list(proposals.meta["image_size"])
    if "versions" in proposals.meta:  # what made them (bicm proposals extract)
        record["versions"] = dict(proposals.meta["versions"])
    return record


def write_detections(path: Union[str, Path], entries: Mapping[str, Proposals]) -> Path:
    """Write bicm JSONL (one record per image), atomically."""
    text = "".join(json.dumps(to_record(key, proposals)) + "\n" for key, proposals in entries.items())
    return atomic_write_text(path, text)


class DetectionsAppender(JsonlAppender):
    """Append bicm JSONL records one image at a time, so long runs can resume.

    Opening an existing file reads the images it already holds (:attr:`done`); a last line
    cut short by a crash is removed. Every record is flushed and fsynced before
    :meth:`add` returns, so at most the image in flight is lost.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        super().__init__(path, key_field="image")

    def add(self, key: str, proposals: Proposals) -> None:
        self.append([to_record(key, proposals)])
