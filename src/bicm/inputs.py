"""What goes into grounding, made ready: phrases cleaned, proposals coerced, clipped and
capped, and the working image (very large images downscaled, with the factor to map boxes back).
"""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from .errors import BicmError, warn
from .proposals import Proposals

__all__ = ["ProposalsLike", "check_queries", "as_proposals", "working_image", "scaled", "capped"]

ProposalsLike = Union[Proposals, torch.Tensor, Sequence[Sequence[float]], None]


def check_queries(queries: Iterable[str]) -> list[str]:
    """Clean the phrases: control characters count as spaces, runs of whitespace become one
    space, lone surrogates (undecodable bytes of a command line) become U+FFFD. A phrase with
    nothing visible left is an error."""
    if isinstance(queries, str):
        queries = [queries]
    out = []
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BicmError(f"query {i + 1} is not text: {_short_repr(query)}")
        cleaned = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in query).split())
        if any(unicodedata.category(c) == "Cs" for c in cleaned):
            cleaned = "".join("\ufffd" if unicodedata.category(c) == "Cs" else c for c in cleaned)
            warn(f"query {i + 1} held bytes that are not valid text; replaced by U+FFFD")
        if not any(unicodedata.category(c)[0] not in "CZ" for c in cleaned):
            raise BicmError(f"query {i + 1} is empty")
        out.append(cleaned)
    if not out:
        raise BicmError("no query given")
    return out


def as_proposals(proposals: ProposalsLike) -> Proposals:
    if proposals is None:
        return Proposals.empty()
    if isinstance(proposals, Proposals):
        return proposals
    try:
        boxes = torch.as_tensor(proposals, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise BicmError(f"proposals must be (N, 4) numbers (xyxy pixels), got {_short_repr(proposals)}") from None
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BicmError(f"proposal boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    return Proposals(boxes)


def working_image(image: Image.Image, max_pixels: Optional[int]) -> tuple[Image.Image, tuple[float, float]]:
    """``image`` downscaled to at most ``max_pixels`` pixels (aspect kept), and ``(sx, sy)``:
    original pixels per working pixel."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image, (1.0, 1.0)
    factor = (max_pixels / (width * height)) ** 0.5
    new_w, new_h = max(1, int(width * factor)), max(1, int(height * factor))
    warn(
        f"image of {width}x{height} = {width * height:,} pixels downscaled to {new_w}x{new_h} to work on at most "
        f"{max_pixels:,} pixels (max_pixels / --max-pixels); boxes are in the original pixels"
    )
    work = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    return work, (width / new_w, height / new_h)


def scaled(proposals: Proposals, scale: tuple[float, float]) -> Proposals:
    """The same proposals with x multiplied by ``scale[0]`` and y by ``scale[1]``."""
    if scale == (1.0, 1.0):
        return proposals
    factor = torch.tensor([scale[0], scale[1]] * 2, dtype=torch.float32)
    return replace(proposals, boxes=proposals.boxes * factor, meta=dict(proposals.meta))


def capped(proposals: Proposals, limit: Optional[int]) -> Proposals:
    """At most ``limit`` proposals: the highest-scoring (or the first) ones, in their order."""
    n = len(proposals)
    if limit is None or n <= limit:
        return proposals
    if proposals.scores is not None:
        order = torch.argsort(proposals.scores, descending=True, stable=True)[:limit]
        keep, which = order.sort().values, "highest-scoring"
    else:
        keep, which = torch.arange(limit), "first"
    warn(f"{n} proposals are more than max_proposals / --max-proposals = {limit}; kept the {limit} {which}")
    return proposals.subset(keep)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
