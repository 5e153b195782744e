"""SF: similarity fusion (paper Sec. 3.4, Eqs. 9-10), and the selection policies of Sec. 4.1.

* ``S_TD[r]`` (Eq. 9): the mean of the attention map over the pixels of box ``r``. Computed
  from an integral image, so every box costs O(1). Pixel ``(i, j)`` belongs to a box when it
  overlaps it (columns ``floor(x1) .. ceil(x2) - 1``).
* ``S = S_BU + lambda_t * S_TD`` (Eq. 10); with KAM, ``+ lambda_k * S_KAM`` (Eq. 11).

About ``lambda_t = 1000``: the paper sets it "to make the three scores have
similar orders of magnitude". Cosine similarities are O(0.1-1); the RAW query-aware map is
O(1e-3) (attention ~1/T times a small gradient), so 1000 only balances them on the raw
scale. The raw map is therefore the default; the min-max normalised map is an option.

Selection (Sec. 4.1):

* ``"argmax"``: the candidate with the highest fused score (the method as described);
* ``"union-above-mean"``: the union box of all candidates scoring above the mean (the
  Flickr30K protocol, where one phrase may cover several boxes);
* ``"largest-above-mean"``: the largest box among the above-mean candidates (ReferItGame and
  RefCOCOg, "to fairly compare with [25]").

When no candidate is strictly above the mean (one candidate, or all equal), the policies fall
back to the argmax.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from torchvision.ops import box_area

from .boxes import union_box
from .config import SELECTION_POLICIES, SelectionPolicy

__all__ = ["integral_image", "box_means", "fuse", "calibrate_lambda_t", "select", "union_box"]



def integral_image(maps: torch.Tensor) -> torch.Tensor:
    """Summed-area tables of ``(Q, H, W)`` maps: ``(Q, H + 1, W + 1)`` float64."""
    q, h, w = maps.shape
    table = torch.zeros(q, h + 1, w + 1, dtype=torch.float64, device=maps.device)
    table[:, 1:, 1:] = maps.double().cumsum(1).cumsum(2)
    return table


def box_means(table: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean map value inside each box (Eq. 9).

    Parameters
    ----------
    table: ``(Q, H + 1, W + 1)`` from :func:`integral_image`.
    boxes: ``(K, 4)`` (same boxes for every map) or ``(Q, K, 4)``, xyxy pixels.

    Returns
    -------
    ``(Q, K)`` float32.
    """
    q, hp, wp = table.shape
    h, w = hp - 1, wp - 1
    if boxes.ndim == 2:
        boxes = boxes.unsqueeze(0).expand(q, -1, -1)
    k = boxes.shape[1]
    if k == 0:
        return torch.zeros(q, 0, device=table.device)
    b = boxes.to(table.device, torch.float64)
    x1 = b[..., 0].floor().clamp(0, w - 1).long()
    y1 = b[..., 1].floor().clamp(0, h - 1).long()
    x2 = torch.maximum(b[..., 2].ceil().clamp(0, w).long(), x1 + 1)
    y2 = torch.maximum(b[..., 3].ceil().clamp(0, h).long(), y1 + 1)
    flat = table.reshape(q, -1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, yy * wp + xx)

    sums = at(y2, x2) - at(y1, x2) - at(y2, x1) + at(y1, x1)
    area = ((x2 - x1) * (y2 - y1)).double()
    return (sums / area).float()


def fuse(
    s_bu: Optional[torch.Tensor],
    s_td: Optional[torch.Tensor],
    lambda_t: float = 1000.0,
    s_kam: Optional[torch.Tensor] = None,
    lambda_k: float = 1.0,
) -> torch.Tensor:
    """``S = S_BU + lambda_t * S_TD (+ lambda_k * S_KAM)`` over the terms given (Eqs. 10-11)."""
    total: Optional[torch.Tensor] = None
    for term, weight in ((s_bu, 1.0), (s_td, lambda_t), (s_kam, lambda_k)):
        if term is None:
            continue
        total = term * weight if total is None else total + term * weight
    if total is None:
        raise ValueError("fuse needs at least one score")
    return total


def calibrate_lambda_t(s_bu: torch.Tensor, s_td: torch.Tensor) -> float:
    """``lambda_t`` by the paper's rule: the power of ten that gives ``lambda_t * S_TD`` the
    order of magnitude of ``S_BU`` (Sec. 4.1: "to make the three scores have similar orders
    of magnitude").

    Parameters
    ----------
    s_bu, s_td: the scores of the candidates of unlabelled images and queries (any shape,
        the same number of values); no ground truth is involved.

    Returns
    -------
    ``10 ** round(log10(median |S_BU| / median |S_TD|))``.
    """
    bu = s_bu.detach().double().abs().flatten()
    td = s_td.detach().double().abs().flatten()
    if bu.numel() == 0 or td.numel() == 0:
        raise ValueError("calibrate_lambda_t needs scores")
    bu_median, td_median = float(bu.median()), float(td.median())
    if not (bu_median > 0 and td_median > 0):
        raise ValueError("calibrate_lambda_t needs non-zero scores")
    return float(10.0 ** round(math.log10(bu_median / td_median)))


def select(
    boxes: torch.Tensor, scores: torch.Tensor, policy: SelectionPolicy = "argmax"
) -> tuple[tuple[float, float, float, float], list[int]]:
    """Pick the output box from candidates.

    Parameters
    ----------
    boxes: ``(K, 4)`` xyxy; scores: ``(K,)`` fused scores, K >= 1.

    Returns
    -------
    box: the chosen ``(x1, y1, x2, y2)``.
    indices: the candidates that make it (one, or several for the union).
    """
    if boxes.shape[0] == 0:
        raise ValueError("select needs at least one candidate")
    best = int(scores.argmax())
    if policy == "argmax":
        return _box(boxes[best]), [best]
    if policy not in SELECTION_POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; use one of {', '.join(SELECTION_POLICIES)}")
    # in float64: the float32 mean of equal scores can round below them and make all "above"
    wide = scores.double()
    above = (wide > wide.mean()).nonzero().flatten()
    if above.numel() == 0:
        return _box(boxes[best]), [best]
    if policy == "union-above-mean":
        return union_box(boxes[above]), sorted(above.tolist())
    areas = box_area(boxes[above])
    chosen = int(above[int(areas.argmax())])
    return _box(boxes[chosen]), [chosen]


def _box(t: torch.Tensor) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in t.tolist())
    return (x1, y1, x2, y2)
