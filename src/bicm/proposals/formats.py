"""Foreign detections formats: ReCLIP's detector JSON and bottom-up-attention TSV.

ReCLIP (``--detector_file``): a JSON object mapping image ids to lists of ``[x, y, w, h]``
boxes (optionally ``{"boxes": [...], "scores": [...]}``), or a list of
``{"image_id": ..., "box": [x, y, w, h]}`` records. No class names.

Bottom-up attention TSV (the Visual Genome Faster R-CNN features the paper's proposals come
from): tab-separated rows without a header, in one of two layouts:

* Anderson et al.'s ``generate_tsv.py``: ``image_id, image_w, image_h, num_boxes, boxes,
  features`` (6 fields);
* LXMERT / py-bottom-up-attention: ``img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features`` (10 fields).

``boxes`` is base64 of float32 ``(num_boxes, 4)`` xyxy; ``objects_id`` base64 of int64 class ids
and ``objects_conf`` of float32 scores. Class ids name boxes through the 1600-object
vocabulary: ``name = vocabulary[id - class_offset]``. Detectron2-based extractors (LXMERT,
py-bottom-up-attention) use ids 0..1599, so the default offset is 0; the original Caffe model
counts the background as class 0 (offset 1). Unknown ids leave the box unnamed, with a warning;
id -1 means "no class" (bicm writes it for unnamed boxes).
The features are never decoded (those files are large; rows are streamed).
"""

from __future__ import annotations

import base64
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..errors import BicmError, warn
from ..safeload import json_loads
from . import Proposals
from .files import DetectionsFile

__all__ = [
    "detect_format",
    "read_reclip",
    "write_reclip",
    "read_bottom_up_tsv",
    "write_bottom_up_tsv",
    "TSV_FIELDS_ORIGINAL",
    "TSV_FIELDS_LXMERT",
]

TSV_FIELDS_ORIGINAL = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
TSV_FIELDS_LXMERT = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes", "features")


def detect_format(path: Path) -> str:
    """``"tsv"``, ``"reclip"`` or ``"bicm"`` from the extension and a look at the content."""
    if path.suffix.lower() == ".tsv":
        return "tsv"
    if path.suffix.lower() == ".jsonl":
        return "bicm"
    try:
        data = json_loads(path.read_text(encoding="utf-8-sig"), path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "bicm"  # JSON Lines with another extension; the reader reports real errors
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc}") from None
    if isinstance(data, list) and data and all(isinstance(r, dict) and "box" in r and "image_id" in r for r in data):
        return "reclip"
    if isinstance(data, dict) and data and "box_format" not in data and all(re.fullmatch(r"\d+", str(k)) for k in data):
        return "reclip"
    return "bicm"


# --------------------------------------------------------------------------------------
# ReCLIP
# --------------------------------------------------------------------------------------
def read_reclip(path: Union[str, Path]) -> DetectionsFile:
    """Read a ReCLIP detector file (boxes ``[x, y, w, h]``)."""
    path = Path(path)
    try:
        data = json_loads(path.read_text(encoding="utf-8-sig"), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BicmError(f"cannot read ReCLIP detections {path}: {exc}") from None
    grouped: dict[str, dict[str, list]] = {}
    if isinstance(data, list):
        for i, record in enumerate(data):
            if not isinstance(record, dict) or "image_id" not in record or "box" not in record:
                raise BicmError(f"{path.name} record {i}: expected {{'image_id': ..., 'box': [x, y, w, h]}}")
            entry = grouped.setdefault(str(record["image_id"]), {"boxes": [], "scores": []})
            entry["boxes"].append(record["box"])
            entry["scores"].append(record.get("score"))
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict):
                grouped[str(key)] = {"boxes": value.get("boxes", []), "scores": value.get("scores") or []}
            else:
                grouped[str(key)] = {"boxes": value, "scores": []}
    else:
        raise BicmError(f"{path.name}: a ReCLIP detector file is a JSON object or list")
    entries = {}
    source = f"file:{path.name}"
    for key, entry in grouped.items():
        boxes = _float_boxes(entry["boxes"], f"{path.name} image {key}")
        scores = entry["scores"]
        scores = None if not scores or any(s is None for s in scores) else scores
        if scores is not None and len(scores) != len(boxes):
            raise BicmError(f"{path.name} image {key}: {len(boxes)} boxes but {len(scores)} scores")
        entries[key] = Proposals.from_xywh(boxes, scores=scores, source=source)
    if not entries:
        raise BicmError(f"ReCLIP detections file {path} holds no images")
    return DetectionsFile(path, entries)


def write_reclip(path: Union[str, Path], entries: Mapping[str, Proposals]) -> Path:
    """Write ``{image_id: {"boxes": [[x, y, w, h], ...], "scores": [...]}}`` (atomic).

    ReCLIP indexes images by integer COCO id: keys that end in a number (file names such
    as ``COCO_train2014_000000581857.jpg``) are written as that number.
    """
    out: dict[str, Any] = {}
    for key, proposals in entries.items():
        number = re.search(r"(\d+)$", Path(key).stem)
        image_id = str(int(number.group(1))) if number else key
        if not number:
            warn(f"image {key!r} has no numeric id; ReCLIP expects integer ids")
        xyxy = proposals.boxes
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        record: dict[str, Any] = {"boxes": [[round(float(v), 2) for v in b] for b in xywh.tolist()]}
        if proposals.scores is not None:
            record["scores"] = [round(float(v), 5) for v in proposals.scores.tolist()]
        out[image_id] = record
    return atomic_write_text(Path(path), json.dumps(out))


# --------------------------------------------------------------------------------------
# Bottom-up attention TSV
# --------------------------------------------------------------------------------------
def _decode(value: str, dtype: Any, count: int, what: str, where: str) -> np.ndarray:
    try:
        array = np.frombuffer(base64.b64decode(value), dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise BicmError(f"{where}: cannot decode {what} ({exc})") from None
    if array.size % max(count, 1) != 0 and count:
        raise BicmError(f"{where}: {what} holds {array.size} values for {count} boxes")
    return array


def read_bottom_up_tsv(
    path: Union[str, Path], vocabulary: str = "vg1600", class_offset: int = 0
) -> DetectionsFile:
    """Read the boxes (and class ids, where present) of a bottom-up-attention TSV file."""
    from .naming import Vocabulary

    path = Path(path)
    names_list = Vocabulary.load(vocabulary).names
    csv.field_size_limit(sys.maxsize)
    entries: dict[str, Proposals] = {}
    unknown: set[int] = set()
    source = f"file:{path.name}"
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc}") from None
    with handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            where = f"{path.name} row {number}"
            if not row:
                continue
            if len(row) == len(TSV_FIELDS_ORIGINAL):
                fields = dict(zip(TSV_FIELDS_ORIGINAL, row))
                key, width, height = fields["image_id"], fields["image_w"], fields["image_h"]
            elif len(row) == len(TSV_FIELDS_LXMERT):
                fields = dict(zip(TSV_FIELDS_LXMERT, row))
                key, width, height = fields["img_id"], fields["img_w"], fields["img_h"]
            else:
                raise BicmError(f"{where}: {len(row)} fields; expected 6 (bottom-up attention) or 10 (LXMERT layout)")
            try:
                n = int(fields["num_boxes"])
                size = [int(float(width)), int(float(height))]
            except ValueError:
                raise BicmError(f"{where}: num_boxes / image size are not numbers") from None
            boxes = _decode(fields["boxes"], np.float32, n, "boxes", where)
            if boxes.size != 4 * n:
                raise BicmError(f"{where}: boxes hold {boxes.size} values, expected 4 x {n}")
            names: Optional[list[Optional[str]]] = None
            scores = None
            if "objects_id" in fields and fields["objects_id"]:
                ids = _decode(fields["objects_id"], np.int64, n, "objects_id", where)
                names = []
                for class_id in ids.tolist():
                    index = int(class_id) - class_offset
                    if 0 <= index < len(names_list):
                        names.append(names_list[index])
                    else:
                        names.append(None)
                        if class_id >= 0:  # -1 is "no class" (what bicm writes for unnamed boxes)
                            unknown.add(int(class_id))
                if fields.get("objects_conf"):
                    scores = _decode(fields["objects_conf"], np.float32, n, "objects_conf", where).astype(np.float32)
            proposals = Proposals(
                torch.from_numpy(boxes.reshape(n, 4).copy()),
                scores=None if scores is None else torch.from_numpy(scores.copy()),
                class_names=names,
                source=source,
                meta={"image_size": size} if size[0] > 0 and size[1] > 0 else {},
            )
            _warn_outside(proposals, size, where)
            if key in entries:
                raise BicmError(f"{where}: image {key!r} appears twice")
            entries[str(key)] = proposals
    if unknown:
        shown = ", ".join(str(i) for i in sorted(unknown)[:5])
        warn(f"{path.name}: class ids outside the {len(names_list)}-name vocabulary (offset {class_offset}): {shown}; those boxes have no name")
    if not entries:
        raise BicmError(f"TSV file {path} holds no images")
    return DetectionsFile(path, entries)


def _warn_outside(proposals: Proposals, size: list[int], where: str) -> None:
    if size[0] <= 0 or size[1] <= 0 or len(proposals) == 0:
        return
    b = proposals.boxes
    outside = (b[:, 0] < -1) | (b[:, 1] < -1) | (b[:, 2] > size[0] + 1) | (b[:, 3] > size[1] + 1)
    if outside.any():
        warn(f"{where}: {int(outside.sum())} box(es) reach outside the recorded {size[0]}x{size[1]} image")


def write_bottom_up_tsv(
    path: Union[str, Path], entries: Mapping[str, Proposals], vocabulary: str = "vg1600", class_offset: int = 0
) -> Path:
    """Write the LXMERT TSV layout (no features: that field is empty), atomically.

    Class names outside the vocabulary are written as id -1 (with a warning); the image size
    comes from ``proposals.meta["image_size"]`` (0 when unknown).
    """
    from .naming import Vocabulary

    names_list = Vocabulary.load(vocabulary).names
    index = {name: i for i, name in enumerate(names_list)}
    missing: set[str] = set()
    rows = []
    for key, proposals in entries.items():
        n = len(proposals)
        width, height = proposals.meta.get("image_size", [0, 0])
        ids = np.full(n, -1, dtype=np.int64)
        if proposals.class_names is not None:
            for i, name in enumerate(proposals.class_names):
                if name in index:
                    ids[i] = index[name] + class_offset
                elif name is not None:
                    missing.add(name)
        conf = (proposals.scores if proposals.scores is not None else torch.ones(n)).numpy().astype(np.float32)
        empty = base64.b64encode(b"").decode()
        rows.append(
            [
                key,
                str(int(height)),
                str(int(width)),
                base64.b64encode(ids.tobytes()).decode(),
                base64.b64encode(conf.tobytes()).decode(),
                empty,
                empty,
                str(n),
                base64.b64encode(proposals.boxes.numpy().astype(np.float32).tobytes()).decode(),
                empty,
            ]
        )
    if missing:
        warn(f"{len(missing)} class name(s) are not in {vocabulary} (e.g. {sorted(missing)[0]!r}); written as id -1")
    text = "".join("\t".join(row) + "\n" for row in rows)
    return atomic_write_text(Path(path), text)


def _float_boxes(boxes: Any, where: str) -> list[list[float]]:
    if not isinstance(boxes, list):
        raise BicmError(f"{where}: boxes must be a list of [x, y, w, h]")
    out = []
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise BicmError(f"{where}: box {i} is not 4 numbers")
        out.append([float(v) for v in box])
    return out
