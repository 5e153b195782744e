"""Object proposals: the one type every proposal source returns, and its checks.

Boxes are float ``xyxy`` in pixels of the original image (``x2``/``y2`` are exclusive
edges: a box ``[0, 0, 10, 10]`` covers 10x10 pixels). Conversions from other formats
happen where data enters (:meth:`Proposals.from_xywh`, the detections file reader).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch
from torchvision.ops import box_convert, clip_boxes_to_image, remove_small_boxes

from ..errors import BicmError

__all__ = ["Proposals", "Sanitized"]

BoxesLike = Union[torch.Tensor, Sequence[Sequence[float]]]


@dataclass
class Proposals:
    """Candidate boxes of one image.

    Attributes
    ----------
    boxes: ``(N, 4)`` float32, xyxy, original-image pixels.
    scores: ``(N,)`` detector confidences, or ``None``.
    class_names: one name per box (``None`` for a box without a name), or ``None`` when the
        source names no box.
    source: id of what made them (``"user"``, ``"file:dets.json"``,
        ``"selective-search(mode=fast,top_n=100)"``, ``"oracle:ground-truth"``, ...).
    name_scores: ``(N,)`` confidence of each class name when a model chose it (CLIP
        zero-shot naming: the softmax probability of the chosen name), or ``None``.
    meta: free-form extras (e.g. ``image_size``).
    """

    boxes: torch.Tensor
    scores: Optional[torch.Tensor] = None
    class_names: Optional[list[Optional[str]]] = None
    source: str = "user"
    meta: dict = field(default_factory=dict)
    name_scores: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        boxes = _numbers(self.boxes, "proposal boxes")
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise BicmError(f"proposal boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise BicmError("proposal boxes contain NaN or infinite coordinates")
        if boxes.numel() and float(boxes.abs().max()) > _FLOAT32_MAX:
            raise BicmError("proposal boxes have coordinates too large for float32 (beyond 3.4e38)")
        self.boxes = boxes.float()
        n = boxes.shape[0]
        if self.scores is not None:
            scores = _numbers(self.scores, "proposal scores").float().reshape(-1)
            if scores.shape[0] != n:
                raise BicmError(f"{n} proposal boxes but {scores.shape[0]} scores")
            if not torch.isfinite(scores).all():
                raise BicmError("proposal scores contain NaN or infinite values")
            self.scores = scores
        if self.class_names is not None:
            names = [None if c is None or str(c).strip() == "" else str(c).strip() for c in self.class_names]
            if len(names) != n:
                raise BicmError(f"{n} proposal boxes but {len(names)} class names")
            self.class_names = names if any(c is not None for c in names) or n == 0 else None
        if self.name_scores is not None:
            name_scores = _numbers(self.name_scores, "proposal name scores").float().reshape(-1)
            if name_scores.shape[0] != n:
                raise BicmError(f"{n} proposal boxes but {name_scores.shape[0]} name scores")
            self.name_scores = name_scores

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def from_xywh(cls, boxes: BoxesLike, **kwargs) -> "Proposals":
        """Build from ``[x, y, width, height]`` boxes."""
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return cls(box_convert(b, "xywh", "xyxy"), **kwargs)

    @classmethod
    def empty(cls, source: str = "user") -> "Proposals":
        return cls(torch.zeros(0, 4), source=source)

    @property
    def is_oracle(self) -> bool:
        """These are ground-truth boxes (analysis only, never a real result)."""
        return self.source.startswith("oracle")

    @property
    def fully_named(self) -> bool:
        """Every box has a class name (COM can use ``S_CQ``)."""
        return self.class_names is not None and all(c is not None for c in self.class_names)

    def subset(self, index: torch.Tensor) -> "Proposals":
        index = torch.as_tensor(index, dtype=torch.long)
        names = None if self.class_names is None else [self.class_names[i] for i in index.tolist()]
        scores = None if self.scores is None else self.scores[index]
        name_scores = None if self.name_scores is None else self.name_scores[index]
        return replace(self, boxes=self.boxes[index], scores=scores, class_names=names, meta=dict(self.meta), name_scores=name_scores)

    def with_names(self, names: list[Optional[str]], name_scores: Optional[torch.Tensor] = None) -> "Proposals":
        """A copy with these class names (and their confidences)."""
        return replace(self, class_names=names, meta=dict(self.meta), name_scores=name_scores)

    def sanitize(self, width: int, height: int, min_size: float = 1.0) -> "Sanitized":
        """Clip boxes to the image and drop degenerate ones.

        Boxes with ``x2 < x1`` or ``y2 < y1`` are degenerate, as are boxes whose clipped
        width or height is below ``min_size`` pixels (including boxes fully outside).
        """
        b = self.boxes
        clipped = clip_boxes_to_image(b, (height, width))
        changed = (clipped != b).any(dim=1)
        inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        keep = torch.zeros(len(self), dtype=torch.bool)
        keep[remove_small_boxes(clipped, min_size)] = True  # width and height >= min_size
        keep &= ~inverted
        kept = replace(self, boxes=clipped, meta=dict(self.meta)).subset(keep.nonzero().flatten())
        return Sanitized(kept, n_clipped=int((changed & keep).sum()), n_dropped=int((~keep).sum()))


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _numbers(values: object, what: str) -> torch.Tensor:
    """``values`` as a float64 tensor, or one clear error."""
    try:
        if isinstance(values, torch.Tensor):
            return values.detach().to("cpu", torch.float64)
        return torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        text = repr(values)
        raise BicmError(f"{what} must be numbers, got {text[:57] + '...' if len(text) > 60 else text}") from None


@dataclass
class Sanitized:
    """Result of :meth:`Proposals.sanitize`."""

    proposals: Proposals
    n_clipped: int
    n_dropped: int
