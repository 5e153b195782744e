"""Your own dataset as JSON Lines: one image-query pair per line.

::

    {"image": "photos/1.jpg", "query": "the dog on the left", "box": [x1, y1, x2, y2]}
    {"image": "photos/1.jpg", "query": "two people", "boxes": [[...], [...]], "box_format": "xywh", "id": "q7"}

``box`` or ``boxes`` (several boxes: the ground truth is their union); ``box_format`` is
``xyxy`` (default, exclusive ``x2``/``y2``) or ``xywh``; ``id`` defaults to the line number.
Lines may carry a ``split`` field; then only the lines of the asked split are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..errors import BicmError
from ..safeload import regular_file
from ..jsonl import check_field, read_records
from .sample import GroundingSample, is_proper_box, to_xyxy

__all__ = ["read_jsonl_dataset"]


def read_jsonl_dataset(path: Union[str, Path], split: Optional[str] = None) -> list[GroundingSample]:
    """Read a JSON Lines dataset (see the module docs)."""
    path = Path(path)
    regular_file(path, "dataset file", missing=f"dataset file not found: {path}")
    samples = []
    seen: set[str] = set()
    optional = {"box_format": "str", "split": "str"}
    for number, (where, record) in enumerate(read_records(path, {"image": "path", "query": "text"}, optional), start=1):
        if split is not None and "split" in record and record["split"] != split:
            continue
        if "boxes" in record:
            raw = check_field(record, "boxes", "boxes", where)
        else:
            raw = [check_field(record, "box", "box", where)]
        fmt = record.get("box_format", "xyxy")
        if fmt not in ("xyxy", "xywh"):
            raise BicmError(f"{where}: unknown box_format {fmt!r}")
        boxes = [to_xyxy(b, fmt) for b in raw]
        if not all(is_proper_box(b) for b in boxes):
            raise BicmError(f"{where}: a box is empty or inverted")
        if "id" in record and not isinstance(record["id"], (str, int)) or isinstance(record.get("id"), bool):
            raise BicmError(f"{where}: 'id' must be a string or an integer")
        sample_id = str(record.get("id", number))
        if sample_id in seen:
            raise BicmError(f"{where}: id {sample_id!r} appears twice")
        seen.add(sample_id)
        samples.append(GroundingSample.from_boxes(sample_id, Path(record["image"]).stem, record["image"], record["query"], boxes))
    if not samples:
        raise BicmError(f"{path} holds no samples" + (f" of split {split!r}" if split else ""))
    return samples
