"""Reader for the refer-API format (lichengunc/refer): RefCOCO, RefCOCO+, RefCOCOg, RefCLEF.

A dataset folder (``refer/data/refcoco/`` ...) holds:

- ``refs(<split_by>).p``: a (Python 2) pickle of a list of refs, each a dict with ``ref_id``,
  ``ann_id``, ``image_id``, ``split``, ``file_name`` and ``sentences``, a list of
  ``{"sent": ..., "raw": ..., "sent_id": ..., "tokens": [...]}``;
- ``instances.json``: COCO-style ``images`` (``id``, ``file_name``, ``width``, ``height``)
  and ``annotations`` (``id``, ``image_id``, ``bbox`` as ``[x, y, w, h]``).

Partitions (``split_by``): RefCOCO ``unc`` (train/val/testA/testB) or ``google``; RefCOCO+
``unc``; RefCOCOg ``umd`` (train/val/test) or ``google`` (train/val); RefCLEF ``unc`` or
``berkeley``. One sample per sentence. The refs pickle is read with an allow-list of builtin
types only (no pickled code runs). The ``file_name`` of a ref carries the annotation id
(``COCO_train2014_000000581857_16.jpg``); the image file comes from ``instances.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import BicmError, warn
from ..safeload import json_loads, regular_file
from ._pickle import BUILTIN_NAMES, load_pickle
from .sample import GroundingSample, is_proper_box, to_xyxy

__all__ = ["REFER_DATASETS", "read_refer"]

#: Default ``split_by`` of each dataset and the ones it is released with.
REFER_DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}

PathLike = Union[str, Path]


def read_refer(
    folder: PathLike,
    split: str,
    split_by: str = "unc",
    *,
    query_field: str = "sent",
    instances: Optional[PathLike] = None,
) -> list[GroundingSample]:
    """Read one split of a refer-API dataset folder.

    Parameters
    ----------
    folder
        Folder holding ``refs(<split_by>).p`` and ``instances.json``.
    split
        A value of the refs' ``split`` field (``val``, ``testA``, ...).
    split_by
        The partition: ``unc``, ``umd``, ``google`` or ``berkeley``.
    query_field
        ``"sent"`` (the refer API's cleaned, lower-cased text, the default) or ``"raw"``.
    instances
        The ``instances.json`` to use instead of ``folder / "instances.json"``.

    Returns
    -------
    One :class:`GroundingSample` per sentence of the refs of ``split``, in file order, with
    ``sample_id`` = ``"<ref_id>:<sent_id>"``, ``image_id`` the COCO/SAIAPR image id and the
    annotation's box (``[x, y, w, h]`` -> ``xyxy``).

    Raises
    ------
    BicmError
        When a file is missing or unsafe, the split is not in the file (the message lists the
        ones that are), or a ref names an image or annotation that ``instances.json`` lacks.
    """
    folder = Path(folder).expanduser()
    if query_field not in ("sent", "raw"):
        raise BicmError(f"query_field must be 'sent' or 'raw', got {query_field!r}")
    refs_path = folder / f"refs({split_by}).p"
    if refs_path.exists():
        regular_file(refs_path, "refs file")
    if not refs_path.is_file():
        found = sorted(p.name for p in folder.glob("refs(*).p")) if folder.is_dir() else []
        hint = f" (the folder has {', '.join(found)})" if found else ""
        raise BicmError(f"refs file {refs_path} does not exist{hint}")
    refs = load_pickle(refs_path, BUILTIN_NAMES)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise BicmError(f"{refs_path} is not a refer-API refs file: expected a list of dicts")
    splits = sorted({str(r.get("split")) for r in refs})
    if split not in splits:
        raise BicmError(f"split {split!r} is not in {refs_path.name}; it has {', '.join(splits)}")

    images, boxes = _read_instances(Path(instances).expanduser() if instances else folder / "instances.json")
    samples: list[GroundingSample] = []
    empty = degenerate = 0
    for ref in refs:
        if ref.get("split") != split:
            continue
        ref_id, ann_id, image_id = (_field(ref, key, refs_path) for key in ("ref_id", "ann_id", "image_id"))
        if image_id not in images:
            raise BicmError(f"ref {ref_id} of {refs_path.name} names image {image_id}, which instances.json lacks")
        if ann_id not in boxes:
            raise BicmError(f"ref {ref_id} of {refs_path.name} names annotation {ann_id}, which instances.json lacks")
        box = boxes[ann_id]
        if not is_proper_box(box):
            degenerate += 1
            continue
        for sentence in _field(ref, "sentences", refs_path):
            if not isinstance(sentence, dict):
                kind = type(sentence).__name__
                raise BicmError(f"ref {ref_id} of {refs_path.name}: a sentence is a {kind}, not a dict")
            text = sentence.get(query_field)
            if text is None and query_field == "sent":
                text = sentence.get("raw")
            query = str(text or "").strip()
            if not query:
                empty += 1
                continue
            samples.append(
                GroundingSample(
                    f"{ref_id}:{sentence.get('sent_id')}", str(image_id), images[image_id], query, (box,), box
                )
            )
    if empty:
        warn(f"{refs_path.name} ({split}): dropped {empty} empty sentences")
    if degenerate:
        warn(f"{refs_path.name} ({split}): dropped the sentences of {degenerate} refs with a degenerate box")
    return samples


def _field(ref: dict, key: str, path: Path) -> Any:
    try:
        return ref[key]
    except KeyError:
        raise BicmError(f"{path.name}: a ref has no {key!r} field (keys: {', '.join(map(str, ref))})") from None


def _read_instances(path: Path) -> tuple[dict[Any, str], dict[Any, tuple[float, float, float, float]]]:
    """``(image id -> file name, annotation id -> xyxy box)`` from a COCO-style instances file."""
    regular_file(path, "instances file", missing=f"instances file {path} does not exist")
    try:
        data = json_loads(path.read_text(encoding="utf-8"), path)
        images = {img["id"]: str(img["file_name"]) for img in data["images"]}
        boxes = {ann["id"]: to_xyxy(ann["bbox"], "xywh") for ann in data["annotations"]}
    except json.JSONDecodeError as exc:
        raise BicmError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (KeyError, TypeError) as exc:
        raise BicmError(f"{path} is not a COCO-style instances file (missing {exc})") from None
    return images, boxes
