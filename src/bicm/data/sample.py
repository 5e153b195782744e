"""The one sample type every dataset reader returns, box conventions, and the image check.

Boxes are float ``xyxy`` in pixels of the original image with exclusive ``x2``/``y2`` edges
(a box ``(0, 0, 10, 10)`` covers 10x10 pixels), as everywhere in bicm. Annotation files use
other conventions; :func:`to_xyxy` converts from each of them, and only the readers call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..boxes import Box, union_box
from ..errors import BicmError

__all__ = [
    "BOX_CONVENTIONS",
    "Box",
    "GroundingSample",
    "check_images",
    "coco_image_id",
    "is_proper_box",
    "missing_report",
    "to_xyxy",
    "union_box",
]

PathLike = Union[str, Path]

#: Box conventions of annotation files and what :func:`to_xyxy` does with each.
BOX_CONVENTIONS: dict[str, str] = {
    "xyxy": "x1, y1, x2, y2 edges, x2/y2 exclusive (bicm's own; taken as is)",
    "xywh": "x, y, width, height (COCO): x2 = x + width, y2 = y + height",
    "xyxy_inclusive": "0-based pixel indices, last pixel included: x2 + 1, y2 + 1",
    "xyxy_inclusive_1based": "1-based pixel indices, last pixel included (PASCAL VOC, MATLAB): "
    "x1 - 1, y1 - 1, x2 and y2 as is",
}


def to_xyxy(values: Sequence[float], convention: str) -> Box:
    """Convert one annotation box to bicm's float ``xyxy`` (exclusive ``x2``/``y2``).

    Parameters
    ----------
    values
        Four numbers (list, tuple, ``(4,)`` numpy array or tensor).
    convention
        A key of :data:`BOX_CONVENTIONS`.

    Returns
    -------
    tuple of 4 floats ``(x1, y1, x2, y2)``. Nothing is clipped or checked here; see
    :func:`is_proper_box`.

    Raises
    ------
    BicmError
        When ``values`` are not four numbers or the convention is unknown.
    """
    if hasattr(values, "tolist"):
        values = values.tolist()  # numpy array or tensor
    try:
        a, b, c, d = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise BicmError(f"a box must be 4 numbers, got {values!r}") from exc
    if convention == "xyxy":
        return (a, b, c, d)
    if convention == "xywh":
        return (a, b, a + c, b + d)
    if convention == "xyxy_inclusive":
        return (a, b, c + 1.0, d + 1.0)
    if convention == "xyxy_inclusive_1based":
        return (a - 1.0, b - 1.0, c, d)
    raise BicmError(f"unknown box convention {convention!r}; choose one of {', '.join(BOX_CONVENTIONS)}")


def is_proper_box(box: Sequence[float]) -> bool:
    """True when all coordinates are finite, ``x2 > x1`` and ``y2 > y1``."""
    return all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]


def coco_image_id(stem: str) -> str:
    """``"COCO_train2014_000000000309"`` -> ``"309"`` (the COCO id); other stems as is."""
    head, _, digits = stem.rpartition("_")
    if head.startswith("COCO_") and digits.isdigit():
        return str(int(digits))
    return stem


@dataclass(frozen=True)
class GroundingSample:
    """One image-query pair with its ground truth.

    Attributes
    ----------
    sample_id
        Stable id of the sample within its dataset and split (e.g. ``"unc_val:17"``,
        ``"1011572216:0:2"``); the same file always gives the same ids.
    image_id
        Id of the image (Flickr30K id, COCO id, SAIAPR id), as a string.
    image_file
        Path of the image relative to the image root (usually just the file name).
    query
        The referring expression or phrase.
    boxes
        The individual ground-truth boxes, float ``xyxy`` (exclusive ``x2``/``y2``), original
        image pixels; one element for single-box datasets.
    box
        The box that Acc@0.5 is measured against: the union of ``boxes`` when there are several.
    kind
        The query's type where a dataset knows it (the shapes world: ``category``,
        ``attribute``, ``position``, ``plural``); evaluation reports accuracy per kind.
    """

    sample_id: str
    image_id: str
    image_file: str
    query: str
    boxes: tuple[Box, ...]
    box: Box
    kind: Optional[str] = None

    @classmethod
    def from_boxes(
        cls,
        sample_id: str,
        image_id: str,
        image_file: str,
        query: str,
        boxes: Sequence[Sequence[float]],
        kind: Optional[str] = None,
    ) -> "GroundingSample":
        """Build a sample whose :attr:`box` is the union of ``boxes``."""
        boxes_t = tuple(tuple(float(v) for v in b) for b in boxes)
        return cls(sample_id, image_id, image_file, query, boxes_t, union_box(boxes_t), kind)  # type: ignore[arg-type]

    def image_path(self, root: PathLike) -> Path:
        """Where the image lies under the image folder ``root``."""
        return Path(root) / self.image_file


def missing_report(missing: Sequence[str], total: int, kind: str, where: PathLike, show: int = 5) -> str:
    """``"3 of 999 images are missing under /x: a.jpg, b.jpg, c.jpg"`` (first ``show`` names)."""
    names = ", ".join(missing[:show]) + (", ..." if len(missing) > show else "")
    verb = "is" if len(missing) == 1 else "are"
    return f"{len(missing)} of {total} {kind} {verb} missing under {where}: {names}"


def _escapes(image_file: str) -> bool:
    """An annotation's image path that is absolute or climbs out of the image folder."""
    import ntpath
    from pathlib import PurePosixPath

    text = str(image_file)
    if "\x00" in text or PurePosixPath(text).is_absolute() or ntpath.isabs(text) or ntpath.splitdrive(text)[0]:
        return True
    return ".." in PurePosixPath(text.replace("\\", "/")).parts


def check_images(samples: Iterable[GroundingSample], root: PathLike) -> None:
    """Check that every image of ``samples`` exists under ``root``, before any work starts.

    Raises
    ------
    BicmError
        When ``root`` is not a folder, or naming how many images are missing and the first 5,
        e.g. ``"3 of 999 images are missing under /data/flickr30k: a.jpg, b.jpg, c.jpg"``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BicmError(f"image folder {root} does not exist or is not a folder")
    files = list(dict.fromkeys(s.image_file for s in samples))
    escaping = [f for f in files if _escapes(f)]
    if escaping:
        names = ", ".join(repr(f) for f in escaping[:3]) + (", ..." if len(escaping) > 3 else "")
        raise BicmError(
            f"{len(escaping)} of {len(files)} image paths in the annotations leave the image folder {root} "
            f"(absolute, or through '..'): {names}; refusing to read them"
        )
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise BicmError(missing_report(missing, len(files), "images", root))
