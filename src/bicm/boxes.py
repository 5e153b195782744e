"""Box helpers shared by the method and the dataset readers (float xyxy, pixels)."""

from __future__ import annotations

from typing import Iterable, Sequence

from .errors import BicmError

__all__ = ["Box", "union_box"]

Box = tuple[float, float, float, float]


def union_box(boxes: Iterable[Sequence[float]]) -> Box:
    """Smallest ``xyxy`` box holding all ``boxes`` (rows of a list, array or ``(K, 4)`` tensor).

    Used for Flickr30K's multi-box phrases and the union-above-mean selection.
    """
    rows = [[float(v) for v in b] for b in boxes]
    if not rows:
        raise BicmError("the union of no boxes is undefined")
    return (
        min(r[0] for r in rows),
        min(r[1] for r in rows),
        max(r[2] for r in rows),
        max(r[3] for r in rows),
    )
