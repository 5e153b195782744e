"""Does a CLIP's attention localise? The map diagnostics of a shapes CLIP.

For the first images of a split of the shapes world (generated in memory, no files), with the
queries of the split:

* pointing game: the share of queries whose map maximum lies inside a true box (any box of
  a plural), for the query-aware map (QA, Eqs. 1-5) and vanilla attention (VA);
* QAM's box ``P_t`` (Thr_a 0.7, largest region): IoU with the truth (share > 0.5, median)
  and its area relative to the truth;
* how concentrated the last block's [CLS] attention is (per head, over the patches): the share
  the top patch takes and the effective number of patches ``exp(entropy)``, and the share of
  the patch grid that the query-aware map holds at >= 0.7 of its range. A map that sits on one
  patch gives a ``P_t`` of about one patch, however large the object;

each overall, by query kind and by the truth's area as a share of the image
(:data:`AREA_BINS`). Used to choose a shapes CLIP (``bicm train-clip`` reports it in the
model card) and by ``benchmarks/shapes_diagnostics.py``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import numpy as np
import torch

from ..backbone import Backbone
from ..preprocess import preprocess
from ..qam import cls_attention, compute_maps, patch_maps, threshold_box, vision_prefix
from .world import iou, render

__all__ = ["AREA_BINS", "area_bin", "map_metrics"]

#: Truth area as a share of the image: bin edges and names.
AREA_BINS: tuple[tuple[float, str], ...] = ((0.05, "<5%"), (0.15, "5-15%"), (0.35, "15-35%"), (float("inf"), ">=35%"))


def area_bin(fraction: float) -> str:
    """The :data:`AREA_BINS` name of an area fraction."""
    for edge, name in AREA_BINS:
        if fraction < edge:
            return name
    return AREA_BINS[-1][1]  # pragma: no cover


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    ious = np.array([r["iou"] for r in rows])
    return {
        "n": len(rows),
        "pointing_qa": round(float(np.mean([r["point_qa"] for r in rows])), 4),
        "pointing_va": round(float(np.mean([r["point_va"] for r in rows])), 4),
        "pt_iou_gt_0.5": round(float(np.mean(ious > 0.5)), 4),
        "pt_iou_median": round(float(np.median(ious)), 4),
        "pt_area_ratio_median": round(float(np.median([r["area_ratio"] for r in rows])), 4),
    }


def map_metrics(
    backbone: Backbone,
    protocol: str = "ref",
    split: str = "val",
    images: int = 60,
    thr_a: float = 0.7,
    rows_out: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Pointing game (QA and VA) and QAM box quality on ``images`` scenes of a split.

    Returns ``{"all": {...}, "by_kind": {kind: {...}}, "by_area": {bin: {...}}}`` where each
    entry has ``n``, ``pointing_qa``, ``pointing_va``, ``pt_iou_gt_0.5``, ``pt_iou_median``
    and ``pt_area_ratio_median``. ``rows_out`` receives one row per query when given.
    """
    from .dataset import PER_IMAGE, pick_expressions, scene_for, split_seed

    rows: list[dict[str, Any]] = []
    top_share, effective, hot = [], [], []
    visual = backbone.model.visual
    for index in range(images):
        scene = scene_for(protocol, split, index)
        exprs = pick_expressions(scene, PER_IMAGE[protocol], np.random.default_rng([split_seed(protocol, split), index, 1]))
        if not exprs:
            continue
        pixels, geometry = preprocess(render(scene), backbone.spec)
        text = backbone.encode_text([e.text for e in exprs])
        qa = compute_maps(backbone, pixels, geometry, text, "qa")
        with torch.no_grad():
            att, _ = cls_attention(visual.transformer.resblocks[-1], vision_prefix(visual, pixels[None].to(backbone.device)))
        patches = att[0, :, 1:] / att[0, :, 1:].sum(-1, keepdim=True)  # (heads, U) over the patches
        top_share += patches.max(-1).values.tolist()
        effective += torch.exp(-(patches * patches.clamp_min(1e-12).log()).sum(-1)).tolist()
        va = compute_maps(backbone, pixels, geometry, text[:1], "va")
        va_y, va_x = divmod(int(va.raw[0].argmax()), va.raw.shape[2])
        grid_maps = _grid_maps(backbone, pixels, text)
        span = grid_maps.amax((1, 2), keepdim=True) - grid_maps.amin((1, 2), keepdim=True)
        hot += (((grid_maps - grid_maps.amin((1, 2), keepdim=True)) >= 0.7 * span).float().mean((1, 2))).tolist()
        for i, e in enumerate(exprs):
            boxes = [scene.objects[t].box for t in e.targets]
            y, x = divmod(int(qa.raw[i].argmax()), qa.raw.shape[2])
            pt = threshold_box(qa.normalized[i], thr_a, "largest")
            truth_area = (e.box[2] - e.box[0]) * (e.box[3] - e.box[1])
            row = {
                "kind": e.kind,
                "area": area_bin(truth_area / (scene.width * scene.height)),
                "point_qa": any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes),
                "point_va": any(b[0] <= va_x < b[2] and b[1] <= va_y < b[3] for b in boxes),
                "iou": 0.0 if pt is None else iou(pt, e.box),
                "area_ratio": 0.0 if pt is None else (pt[2] - pt[0]) * (pt[3] - pt[1]) / truth_area,
            }
            rows.append(row)
    if rows_out is not None:
        rows_out.extend(rows)
    by_kind: dict[str, list] = defaultdict(list)
    by_area: dict[str, list] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
        by_area[r["area"]].append(r)
    return {
        "protocol": protocol,
        "split": split,
        "images": images,
        "attention": {
            "top_patch_share_median": round(float(np.median(top_share)), 4),
            "effective_patches_median": round(float(np.median(effective)), 2),
            "patches": int(visual.grid_size[0] * visual.grid_size[1]),
            "qa_hot_patch_share_median": round(float(np.median(hot)), 4),
        },
        "all": _summarise(rows),
        "by_kind": {k: _summarise(v) for k, v in sorted(by_kind.items())},
        "by_area": {name: _summarise(by_area[name]) for _, name in AREA_BINS if by_area.get(name)},
    }


def _grid_maps(backbone: Backbone, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(Q, rows, cols)`` query-aware maps on the patch grid (Eqs. 1-5, before upsampling)."""
    from ..qam import attention_and_gradients

    visual = backbone.model.visual
    with torch.no_grad():
        x = vision_prefix(visual, pixels[None].to(backbone.device))
    att, alpha, _ = attention_and_gradients(visual, x.float(), text.float())
    return patch_maps(att, alpha, tuple(int(g) for g in visual.grid_size), "qa")


def backbone_of(model: torch.nn.Module, spec: Any, context_length: int) -> Backbone:
    """A :class:`~bicm.backbone.Backbone` around a model being trained (a frozen copy)."""
    import copy

    import open_clip

    frozen = copy.deepcopy(model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return Backbone(frozen, tokenizer, spec, torch.device("cpu"), "shapes (training)")
