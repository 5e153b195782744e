"""Selective search proposals (OpenCV contrib), class-agnostic and weight-free.

OpenCV returns a deterministic SET of regions but in a random order (its ranking multiplies
the hierarchy level by a random number). bicm therefore ranks the regions itself, by how
many regions of the raw output overlap each one with IoU >= ``support_iou``: a region that
several grouping strategies and colour spaces rediscover is more likely an object. Then:
size filters, non-maximum suppression at ``nms_iou`` (near-duplicates go), the top ``top_n``.
Ties break by area (larger first) and coordinates, so the output is deterministic.
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, nms

from ..errors import BicmError
from . import Proposals
from .sources import ProposalSource, register_source

__all__ = ["SelectiveSearch"]


@register_source("selective-search")
class SelectiveSearch(ProposalSource):
    """Selective search proposals.

    Parameters
    ----------
    mode: ``"fast"`` or ``"quality"`` (OpenCV's two presets; quality is ~3-10x slower).
    top_n: how many proposals to keep.
    max_side: the image is downscaled so its longer side is at most this before the search
        (selective search is slow on large images); boxes are scaled back.
    min_size: drop boxes narrower or shorter than this (original pixels).
    min_area: drop boxes smaller than this fraction of the image area.
    nms_iou: near-duplicate threshold for the suppression.
    support_iou: overlap that counts as "the same region found again" for the ranking.
    """

    def __init__(
        self,
        mode: Literal["fast", "quality"] = "fast",
        top_n: int = 100,
        max_side: int = 500,
        min_size: float = 10.0,
        min_area: float = 0.001,
        nms_iou: float = 0.7,
        support_iou: float = 0.7,
    ) -> None:
        super().__init__()
        if mode not in ("fast", "quality"):
            raise BicmError(f"selective search mode must be fast or quality, not {mode!r}")
        if top_n < 1:
            raise BicmError("top_n must be at least 1")
        self.mode, self.top_n, self.max_side = mode, int(top_n), int(max_side)
        self.min_size, self.min_area = float(min_size), float(min_area)
        self.nms_iou, self.support_iou = float(nms_iou), float(support_iou)

    @property
    def id(self) -> str:
        return f"selective-search(mode={self.mode},top_n={self.top_n},max_side={self.max_side})"

    def raw_regions(self, image: Image.Image) -> torch.Tensor:
        """OpenCV's regions as ``(R, 4)`` xyxy in original pixels, sorted deterministically."""
        try:
            import cv2
        except ImportError:  # pragma: no cover - a dependency of bicm
            raise BicmError("selective search needs OpenCV contrib: pip install opencv-contrib-python-headless") from None
        if not hasattr(cv2, "ximgproc"):
            raise BicmError("OpenCV without the contrib modules: pip install opencv-contrib-python-headless")
        scale = min(1.0, self.max_side / max(image.width, image.height))
        work = image
        if scale < 1.0:
            work = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(work)[:, :, ::-1])
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        if self.mode == "fast":
            search.switchToSelectiveSearchFast()
        else:
            search.switchToSelectiveSearchQuality()
        try:
            rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)
        except cv2.error as exc:  # one odd image must not stop a dataset run
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cv2.error"
            raise BicmError(f"selective search failed on a {image.width}x{image.height} image: {first}") from None
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.height)
        boxes = np.unique(boxes, axis=0)  # sorted, duplicates gone: the order no longer depends on OpenCV's RNG
        return torch.from_numpy(boxes).float()

    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        boxes = self.raw_regions(image)
        if boxes.shape[0] == 0:
            return Proposals(torch.zeros(0, 4), scores=torch.zeros(0), source=self.id)
        support = (box_iou(boxes, boxes) >= self.support_iou).sum(dim=1).float()
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        area = w * h
        keep = (w >= self.min_size) & (h >= self.min_size) & (area >= self.min_area * image.width * image.height)
        boxes, support, area = boxes[keep], support[keep], area[keep]
        if boxes.shape[0] == 0:
            return Proposals(torch.zeros(0, 4), scores=torch.zeros(0), source=self.id)
        # deterministic ranking: support, then area, then (already sorted) coordinates
        order = sorted(range(boxes.shape[0]), key=lambda i: (-float(support[i]), -float(area[i]), i))
        rank_score = torch.empty(boxes.shape[0])
        rank_score[torch.tensor(order)] = torch.linspace(1.0, 0.0, boxes.shape[0] + 1)[:-1]
        kept = nms(boxes, rank_score, self.nms_iou)[: self.top_n]
        return Proposals(boxes[kept], scores=support[kept] / float(support.max()), source=self.id)
