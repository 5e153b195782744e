"""A naive fp32 BiCM (QAM + COM + SF), kept as the baseline of `bench_pipeline.py`.

This is how the method reads on paper when each query is handled on its own, with none of
the engine's sharing: per query it

* encodes the query and the proposals' class names with the full 77-token text encoder;
* runs the WHOLE image encoder forward and backward for the query-aware map (autograd
  through the unmodified open_clip model; hooks read the last block's attention);
* crops, preprocesses and encodes every proposal again (and QAM's box P_t);
* fuses S = S_PQ + S_CQ + lambda_t * S_TD with S_TD the mean of the raw map inside each
  box (plain slicing) and takes the argmax.

It shares bicm's small post-processing functions (map upsampling, normalisation, P_t), so
it computes the same answer as `Grounder.ground_many` with the default config, which
`bench_pipeline.py` checks. Not part of the library: it is a yardstick, not a feature.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from torch.nn import functional as F

from bicm.backbone import Backbone
from bicm.crops import crop
from bicm.preprocess import preprocess
from bicm.qam import normalize, patch_maps, threshold_box, upsample

Box = tuple[float, float, float, float]


def _encode_text(backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
    tokens = backbone.tokenizer(list(texts)).to(backbone.device)  # full context length, padding included
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def _encode_crops(backbone: Backbone, image: Image.Image, boxes: Sequence[Box], batch_size: int = 64) -> torch.Tensor:
    out = []
    for start in range(0, len(boxes), batch_size):
        pixels = torch.stack([preprocess(crop(image, b), backbone.spec)[0] for b in boxes[start : start + batch_size]])
        with torch.no_grad():
            out.append(F.normalize(backbone.model.encode_image(pixels.to(backbone.device)).float(), dim=-1))
    return torch.cat(out)


def _query_map(backbone: Backbone, image: Image.Image, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and normalised query-aware map ``(H, W)`` of one query: one full forward and one
    full backward through the image encoder."""
    model = backbone.model
    mha = model.visual.transformer.resblocks[-1].attn
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["input"] = args[0]
        out = output[0]
        out.retain_grad()
        captured["output"] = out

    pixels, geometry = preprocess(image, backbone.spec)
    params = list(model.visual.parameters())
    for p in params:
        p.requires_grad_(True)
    handle = mha.register_forward_hook(hook)
    try:
        f = model.encode_image(pixels[None].to(backbone.device))
        s = F.cosine_similarity(f, text[None])[0]
        s.backward()
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    with torch.no_grad():
        g = captured["output"].grad[0, 0]  # (D,) gradient at the [CLS] row of the attention output
        y = captured["input"][0].detach()  # (T, D) = ln_1(x)
        d, heads = y.shape[-1], mha.num_heads
        v = F.linear(y, mha.in_proj_weight[2 * d :], mha.in_proj_bias[2 * d :])
        g_heads = (mha.out_proj.weight.T @ g).view(heads, d // heads)
        alpha = torch.einsum("hd,thd->ht", g_heads, v.view(-1, heads, d // heads))  # (H, T) = dS/d att
        _, weights = mha(y[None], y[None], y[None], need_weights=True, average_attn_weights=False)
        att = weights[0, :, 0, :]  # (H, T): the [CLS] row
        grid = tuple(int(x) for x in model.visual.grid_size)
        raw, visible = upsample(patch_maps(att, alpha[None], grid, "qa"), geometry)
        return raw[0], normalize(raw, visible)[0]


def naive_ground(
    backbone: Backbone,
    image: Image.Image,
    queries: Sequence[str],
    boxes: Sequence[Box],
    class_names: Sequence[str],
    *,
    thr_a: float = 0.7,
    lambda_t: float = 1000.0,
) -> list[Optional[Box]]:
    """The chosen box of each query (xyxy pixels), computed query by query."""
    chosen: list[Optional[Box]] = []
    for query in queries:
        text = _encode_text(backbone, [query])[0]  # (E,)
        names = _encode_text(backbone, list(class_names))  # (N, E), again for every query
        raw, norm = _query_map(backbone, image, text)
        p_t = threshold_box(norm, thr_a)
        candidates = list(boxes) + ([p_t] if p_t is not None else [])
        crops = _encode_crops(backbone, image, candidates)  # every crop, again for every query
        s_pq = crops @ text
        s_cq = names @ text
        if p_t is not None:  # P_t takes the class name that matches the query best
            s_cq = torch.cat([s_cq, s_cq.max()[None]])
        s_td = torch.stack([raw[int(y1) : max(int(y1) + 1, int(-(-y2 // 1))), int(x1) : max(int(x1) + 1, int(-(-x2 // 1)))].mean()
                            for x1, y1, x2, y2 in candidates])
        score = s_pq + s_cq + lambda_t * s_td
        chosen.append(tuple(float(v) for v in candidates[int(score.argmax())]))
    return chosen
