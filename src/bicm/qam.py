"""QAM: query-aware attention maps from CLIP's last ViT block (paper Sec. 3.2, Eqs. 1-5).

For an image and Q queries:

1. ``att[h, t]`` (Eq. 1): the [CLS] row of the last block's attention probabilities, per
   head ``h`` over all tokens ``t`` (softmax over [CLS] + patches).
2. ``S_IQ = cos(f, f_q)`` (Eq. 2) with ``f`` the CLIP image embedding.
3. ``alpha[q, h, t] = dS_IQ[q] / d att[h, t]`` (Eq. 3).
4. ``a[q, u] = mean_h att[h, u] * relu(alpha[q, h, u])`` over patch tokens ``u`` (Eqs. 4-5).

The vanilla visual-attention ("VA", Table 5) map is ``mean_h att[h, u]``.

How it is made fast, exactly (measured in benchmarks/README.md):

* Everything before the last block does not depend on the query: :func:`vision_prefix`
  runs it once per image.
* Only the [CLS] row of the last block reaches ``f`` (open_clip pools the [CLS] token), so
  the last block is evaluated for that one row (:func:`cls_attention`, :func:`cls_tail`).
* The gradients of all Q similarities come from ONE batched backward
  (``torch.autograd.grad(..., is_grads_batched=True)``) through that small tail.

The tests check every shortcut against per-query autograd through the unmodified
open_clip model.

Maps live on the ViT patch grid; :func:`upsample` puts them on the original image's pixels
by composing bilinear interpolation on the model's input grid with the inverse of CLIP's
resize + crop (:class:`~bicm.preprocess.Geometry`). Pixels that CLIP's center crop cut away were
never seen by the model: their map value is 0, and min-max normalisation uses the visible
pixels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backbone import Backbone
from .config import MapKind, RegionRule
from .preprocess import Geometry

__all__ = [
    "AttentionMaps",
    "vision_prefix",
    "cls_attention",
    "cls_tail",
    "attention_and_gradients",
    "patch_maps",
    "upsample",
    "normalize",
    "threshold_box",
    "compute_maps",
    "qam_boxes",
]



@dataclass
class AttentionMaps:
    """Top-down maps of one image for Q queries.

    Attributes
    ----------
    raw: ``(Q, H, W)`` float32, the map on its own scale (QA values are ~1e-3 for ViT-B/32).
    normalized: ``(Q, H, W)`` float32 in [0, 1] (min-max over the visible pixels).
    s_iq: ``(Q,)`` cosine similarity of the whole image and each query (Eq. 2).
    visible: ``(H, W)`` bool, the pixels inside CLIP's input view.
    kind: ``"qa"`` (query-aware) or ``"va"`` (vanilla visual attention, same map for all Q).
    """

    raw: torch.Tensor
    normalized: torch.Tensor
    s_iq: torch.Tensor
    visible: torch.Tensor
    kind: str


# --------------------------------------------------------------------------------------
# The ViT pieces
# --------------------------------------------------------------------------------------
def vision_prefix(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Run an open_clip ``VisionTransformer`` up to (not including) its last block.

    Parameters
    ----------
    pixels: ``(B, 3, H_in, W_in)`` preprocessed images.

    Returns
    -------
    ``(B, T, D)`` tokens entering the last block, T = 1 + number of patches.
    """
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)
    return x


def cls_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] row of a block's attention (Eq. 1) and the per-head values.

    Parameters
    ----------
    block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
    x: ``(B, T, D)`` tokens entering the block.

    Returns
    -------
    att: ``(B, heads, T)`` attention probabilities of the [CLS] query over all tokens.
    v: ``(B, heads, T, D / heads)`` attention values.
    """
    mha = block.attn
    b, t, d = x.shape
    heads = mha.num_heads
    dh = d // heads
    y = block.ln_1(x)
    w = mha.in_proj_weight
    bias = mha.in_proj_bias
    bq, bk, bv = (None, None, None) if bias is None else bias.split(d)
    wq, wk, wv = w.split(d)
    q = F.linear(y[:, :1], wq, bq).view(b, heads, dh)
    k = F.linear(y, wk, bk).view(b, t, heads, dh).transpose(1, 2)
    v = F.linear(y, wv, bv).view(b, t, heads, dh).transpose(1, 2)
    logits = torch.einsum("bhd,bhtd->bht", q, k) / math.sqrt(dh)
    return logits.softmax(dim=-1), v


def cls_tail(
    visual: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor, att: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """The image embedding ``f`` as a function of the last block's [CLS] attention.

    Parameters
    ----------
    x: ``(B, T, D)`` tokens entering the last block (only ``x[:, 0]`` is used).
    att: ``(B, heads, T)``; v: ``(B, heads, T, D / heads)``.

    Returns
    -------
    ``(B, E)`` image embedding (not normalised), equal to ``visual(pixels)``.
    """
    b, heads, _ = att.shape
    out = torch.einsum("bht,bhtd->bhd", att, v).reshape(b, -1)
    out = block.attn.out_proj(out)
    h = x[:, 0] + block.ls_1(out)
    h = h + block.ls_2(block.mlp(block.ln_2(h)))
    h = visual.ln_post(h)  # LayerNorm is per token: pooling [CLS] first changes nothing
    if visual.proj is not None:
        h = h @ visual.proj
    return h


def attention_and_gradients(
    visual: torch.nn.Module, x: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. 1-3 for one image and Q queries, with one batched backward.

    Parameters
    ----------
    x: ``(1, T, D)`` float32 tokens entering the last block (from :func:`vision_prefix`).
    text: ``(Q, E)`` query embeddings (any scale).

    Returns
    -------
    att: ``(heads, T)`` [CLS] attention probabilities.
    alpha: ``(Q, heads, T)`` gradient of ``S_IQ[q]`` with respect to ``att``.
    s_iq: ``(Q,)`` image-query cosine similarity.
    """
    block = visual.transformer.resblocks[-1]
    with torch.enable_grad():
        att, v = cls_attention(block, x)
        att = att.detach().requires_grad_(True)
        f = cls_tail(visual, block, x, att, v.detach())  # (1, E)
        s_iq = F.cosine_similarity(f, text, dim=-1)  # (Q,)
        q = text.shape[0]
        eye = torch.eye(q, dtype=s_iq.dtype, device=s_iq.device)
        (alpha,) = torch.autograd.grad(s_iq, att, grad_outputs=eye, is_grads_batched=True)
    return att.detach()[0], alpha[:, 0], s_iq.detach()


def patch_maps(
    att: torch.Tensor, alpha: Optional[torch.Tensor], grid: tuple[int, int], kind: MapKind = "qa"
) -> torch.Tensor:
    """Eqs. 4-5 (``"qa"``) or the vanilla map (``"va"``) on the patch grid.

    Parameters
    ----------
    att: ``(heads, T)``; alpha: ``(Q, heads, T)`` (unused for ``"va"``).
    grid: ``(rows, cols)`` of patches, ``rows * cols == T - 1``.

    Returns
    -------
    ``(Q, rows, cols)`` for ``"qa"``; ``(1, rows, cols)`` for ``"va"``.
    """
    patches = att[:, 1:]
    if kind == "va":
        a = patches.mean(dim=0, keepdim=True)
    elif kind == "qa":
        if alpha is None:
            raise ValueError("the query-aware map needs the gradients alpha")
        a = (patches.unsqueeze(0) * alpha[:, :, 1:].clamp_min(0)).mean(dim=1)
    else:
        raise ValueError(f"unknown map kind {kind!r}")
    return a.reshape(a.shape[0], grid[0], grid[1])


def _axis_weights(n_out: int, n_grid: int, scale: float, offset: int, input_len: int) -> torch.Tensor:
    """``(n_out, n_grid)`` bilinear weights from a patch grid to original pixel centres."""
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - offset  # model-input coords
    inside = (centers >= 0) & (centers < input_len)
    g = (centers / (input_len / n_grid) - 0.5).clamp(0, n_grid - 1)
    i0 = g.floor().long()
    i1 = (i0 + 1).clamp(max=n_grid - 1)
    w1 = g - i0
    weights = torch.zeros(n_out, n_grid, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, i0), 1 - w1, accumulate=True)
    weights.index_put_((rows, i1), w1, accumulate=True)
    weights[~inside] = 0
    return weights


def upsample(maps: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear upsampling of patch maps onto the ORIGINAL image's pixels.

    Parameters
    ----------
    maps: ``(Q, rows, cols)`` on the patch grid.

    Returns
    -------
    up: ``(Q, H, W)`` float32; 0 outside the model's view.
    visible: ``(H, W)`` bool, pixels inside the model's view.
    """
    rows, cols = maps.shape[-2:]
    wy = _axis_weights(geometry.height, rows, geometry.scale_y, geometry.top, geometry.input_height)
    wx = _axis_weights(geometry.width, cols, geometry.scale_x, geometry.left, geometry.input_width)
    wy, wx = wy.to(maps.device, torch.float32), wx.to(maps.device, torch.float32)
    up = torch.einsum("yr,qrc,xc->qyx", wy, maps.float(), wx)
    visible = (wy.sum(1) > 0)[:, None] & (wx.sum(1) > 0)[None, :]
    return up, visible


def normalize(maps: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``(H, W)`` map over its visible pixels; invisible pixels -> 0.

    A flat map (max == min) normalises to all zeros.
    """
    q = maps.shape[0]
    inside = maps[:, visible] if visible.any() else maps.reshape(q, -1)
    lo = inside.min(dim=1).values.view(q, 1, 1)
    hi = inside.max(dim=1).values.view(q, 1, 1)
    span = hi - lo
    out = torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    return out * visible


def threshold_box(
    normalized: torch.Tensor, threshold: float = 0.7, rule: RegionRule = "largest"
) -> Optional[tuple[float, float, float, float]]:
    """The box ``P_t`` of a normalised map: pixels ``>= threshold``, then a region rule.

    Rules (8-connected regions):

    * ``"largest"`` (default): the bounding box of the largest connected region;
    * ``"peak"``: the region that contains the map's maximum;
    * ``"all"``: the bounding box of every pixel above the threshold.

    Parameters
    ----------
    normalized: ``(H, W)`` map in [0, 1].

    Returns
    -------
    ``(x1, y1, x2, y2)`` in pixels (x2/y2 exclusive edges), or ``None`` when no pixel passes.
    """
    values = normalized.detach().cpu().numpy()
    mask = values >= threshold
    if not mask.any() or values.max() <= 0:
        return None
    if rule == "all":
        ys, xs = np.nonzero(mask)
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if rule == "largest":
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        chosen = int(sizes.argmax())
    elif rule == "peak":
        peak = np.unravel_index(int(np.argmax(np.where(mask, values, -np.inf))), values.shape)
        chosen = int(labels[peak])
    else:
        raise ValueError(f"unknown region rule {rule!r}; use largest, peak or all")
    ys, xs = ndimage.find_objects(labels)[chosen - 1]
    return float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)


def compute_maps(
    backbone: Backbone,
    pixels: torch.Tensor,
    geometry: Geometry,
    text: torch.Tensor,
    kind: MapKind = "qa",
) -> AttentionMaps:
    """QAM (or VA) maps of one image for all queries, on the original pixels.

    Parameters
    ----------
    pixels: ``(3, H_in, W_in)`` preprocessed image (see :func:`bicm.preprocess.preprocess`).
    geometry: its :class:`~bicm.preprocess.Geometry`.
    text: ``(Q, E)`` L2-normalised query embeddings.
    """
    visual = backbone.model.visual
    with torch.no_grad(), backbone.autocast():
        x = vision_prefix(visual, pixels.unsqueeze(0).to(backbone.device))
    x = x.float()
    att, alpha, s_iq = attention_and_gradients(visual, x, text.float())
    grid = tuple(int(g) for g in visual.grid_size)
    maps = patch_maps(att, alpha, grid, kind)
    up, visible = upsample(maps, geometry)
    if kind == "va":
        up = up.expand(text.shape[0], -1, -1)
    return AttentionMaps(raw=up, normalized=normalize(up, visible), s_iq=s_iq, visible=visible, kind=kind)


def qam_boxes(maps: AttentionMaps, thr_a: float, rule: RegionRule = "largest") -> list[Optional[tuple[float, float, float, float]]]:
    """QAM's box ``P_t`` for each of the Q maps (:func:`threshold_box` at ``thr_a``), in the
    maps' pixels; ``None`` for a flat map. A ``"va"`` map is the same for every query, so it
    is thresholded once."""
    if maps.kind == "va":
        box = threshold_box(maps.normalized[0], thr_a, rule)
        return [box] * maps.normalized.shape[0]
    return [threshold_box(m, thr_a, rule) for m in maps.normalized]
