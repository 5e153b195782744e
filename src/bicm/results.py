"""What grounding returns: :class:`GroundingResult` per query, with every candidate's scores
in :class:`Candidates`. Boxes are float xyxy pixels of the original image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

__all__ = ["Box", "Candidates", "GroundingResult", "to_detections"]

Box = tuple[float, float, float, float]


@dataclass
class Candidates:
    """The boxes one query chose from, with every component score.

    Attributes
    ----------
    boxes: ``(K, 4)`` xyxy pixels. The QAM box ``P_t`` (if any) is last.
    class_names: one per box (``None`` where unknown).
    qam_index: index of ``P_t`` in ``boxes``, or ``None``.
    s_pq, s_cq, s_td, s_kam: ``(K,)`` component scores, ``None`` where that component did not run.
    fused: ``(K,)`` the score the selection used.
    """

    boxes: torch.Tensor
    class_names: list[Optional[str]]
    qam_index: Optional[int]
    s_pq: Optional[torch.Tensor]
    s_cq: Optional[torch.Tensor]
    s_td: Optional[torch.Tensor]
    fused: torch.Tensor
    s_kam: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_list(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {
                "box": [round(float(v), 2) for v in self.boxes[i].tolist()],
                "class_name": self.class_names[i],
                "source": "qam" if i == self.qam_index else "proposal",
            }
            for name in ("s_pq", "s_cq", "s_td", "s_kam"):
                value = getattr(self, name)
                row[name] = None if value is None else float(value[i])
            row["score"] = float(self.fused[i])
            rows.append(row)
        return rows


@dataclass
class GroundingResult:
    """What :meth:`Grounder.ground` found for one query.

    Attributes
    ----------
    query: the phrase.
    box: chosen ``(x1, y1, x2, y2)`` in original-image pixels, or ``None`` when there was
        nothing to choose from (no proposals and a flat QAM map).
    score: fused score of the chosen candidate (the highest among a union).
    selected: indices into ``candidates`` that make ``box``.
    candidates: every candidate with its component scores.
    attention_raw: ``(H, W)`` map on its own scale, or ``None`` without QAM. ``(H, W)`` is the
        image's size, or its working size when it was downscaled (``BiCMConfig.max_pixels``).
    attention: ``(H, W)`` min-max normalised map, or ``None``.
    qam_box: ``P_t`` or ``None``.
    s_iq: whole-image / query cosine similarity (QAM's Eq. 2), or ``None``.
    view_box: the part of the image CLIP's whole-image view covers (its center crop), or
        ``None`` without QAM; the map is 0 outside it.
    components: the components that ran.
    image_size: ``(width, height)``.
    selection: the selection policy.
    proposal_source: id of the proposals' source (``oracle:ground-truth`` for ground truth).
    notes: things worth knowing about this result (e.g. COM without class names).
    """

    query: str
    box: Optional[Box]
    score: Optional[float]
    selected: list[int]
    candidates: Candidates
    attention_raw: Optional[torch.Tensor]
    attention: Optional[torch.Tensor]
    qam_box: Optional[Box]
    s_iq: Optional[float]
    view_box: Optional[Box]
    components: tuple[str, ...]
    image_size: tuple[int, int]
    selection: str = "argmax"
    proposal_source: str = "user"
    notes: list[str] = field(default_factory=list)

    def to_dict(self, candidates: bool = True) -> dict[str, Any]:
        """JSON-ready dict (no maps)."""
        out: dict[str, Any] = {
            "query": self.query,
            "box": None if self.box is None else [round(v, 2) for v in self.box],
            "score": self.score,
            "selected": self.selected,
            "components": list(self.components),
            "selection": self.selection,
            "proposal_source": self.proposal_source,
            "qam_box": None if self.qam_box is None else [round(v, 2) for v in self.qam_box],
            "s_iq": self.s_iq,
            "view_box": None if self.view_box is None else [round(v, 2) for v in self.view_box],
            "image_size": list(self.image_size),
            "notes": self.notes,
        }
        if candidates:
            out["candidates"] = self.candidates.to_list()
        return out

    def to_detections(self) -> Any:
        """This result as a ``supervision.Detections`` (Roboflow's detections type).

        Returns
        -------
        ``supervision.Detections`` with ``xyxy`` ``(1, 4)`` float32 pixels of the original
        image, ``confidence`` ``(1,)`` (the fused score) and ``data["phrase"]`` ``(1,)`` (the
        query); empty (0 rows) when nothing was found. :func:`to_detections` joins several.

        Raises
        ------
        BicmError
            When the ``supervision`` package is missing (``pip install 'bicm[supervision]'``).
        """
        return to_detections([self])


def to_detections(results: "Sequence[GroundingResult]") -> Any:
    """Several results (e.g. :meth:`Grounder.ground_many`'s) as ONE ``supervision.Detections``:
    a row per result that found a box, ``data["phrase"]`` saying which query it answers."""
    try:
        import supervision as sv
    except ImportError:
        from .errors import BicmError

        raise BicmError("to_detections needs the supervision package: pip install 'bicm[supervision]'") from None
    import numpy as np

    found = [r for r in results if r.box is not None]
    return sv.Detections(
        xyxy=np.array([r.box for r in found], dtype=np.float32).reshape(-1, 4),
        confidence=np.array([np.nan if r.score is None else r.score for r in found], dtype=np.float32),
        data={"phrase": np.array([r.query for r in found], dtype=object)},
    )
