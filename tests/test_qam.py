"""QAM: the fast path equals the plain computation; maps, geometry, threshold-to-box."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bicm.preprocess import Geometry, PreprocessSpec, geometry_for, preprocess
from bicm.qam import (
    attention_and_gradients,
    cls_attention,
    cls_tail,
    compute_maps,
    normalize,
    patch_maps,
    threshold_box,
    upsample,
    vision_prefix,
)

from .helpers import draw_scene, make_backbone, make_model


def plain_alpha(model, pixels, text):
    """Per-query autograd through the UNMODIFIED open_clip model.

    The last block's attention output is ``out_proj(concat_h sum_t att[h, t] v[h, t])``, linear in
    ``att``, so ``dS/d att[h, t] = <W_out^T dS/d(attn output), v[h, t]>`` restricted to head ``h``.
    Hooks capture the block's attention input and output; ``S`` is backpropagated once per query.
    """
    block = model.visual.transformer.resblocks[-1]
    mha = block.attn
    captured = {}

    def hook(module, args, output):
        captured["input"] = args[0]
        out = output[0]
        out.retain_grad()
        captured["output"] = out

    handle = mha.register_forward_hook(hook)
    alphas, sims = [], []
    try:
        for q in range(text.shape[0]):
            f = model.encode_image(pixels)
            s = F.cosine_similarity(f, text[q : q + 1])[0]
            s.backward()
            g = captured["output"].grad[0, 0]  # (D,) grad at the [CLS] row
            y = captured["input"][0].detach()  # (T, D) = ln_1(x)
            d = y.shape[-1]
            heads = mha.num_heads
            v = F.linear(y, mha.in_proj_weight[2 * d :], mha.in_proj_bias[2 * d :])  # (T, D)
            g_heads = (mha.out_proj.weight.T @ g).view(heads, d // heads)  # (H, dh)
            alphas.append(torch.einsum("hd,thd->ht", g_heads, v.view(-1, heads, d // heads)))
            sims.append(s.detach())
    finally:
        handle.remove()
    return torch.stack(alphas), torch.stack(sims)


@pytest.fixture(scope="module")
def model():
    m = make_model()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def test_prefix_and_cls_tail_reproduce_encode_image(model):
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(pixels)
        x = vision_prefix(model.visual, pixels)
        block = model.visual.transformer.resblocks[-1]
        att, v = cls_attention(block, x)
        fast = cls_tail(model.visual, block, x, att, v)
    assert x.shape == (3, 17, 64)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_cls_attention_equals_torch_multihead_weights(model):
    pixels = torch.randn(2, 3, 64, 64)
    block = model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = vision_prefix(model.visual, pixels)
        att, _ = cls_attention(block, x)
        y = block.ln_1(x)
        _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    assert att.shape == (2, 4, 17)
    assert torch.allclose(att, weights[:, :, 0, :], atol=1e-6)
    assert torch.allclose(att.sum(-1), torch.ones(2, 4), atol=1e-6)


@pytest.mark.parametrize("n_queries", [1, 5])
def test_batched_gradient_equals_per_query_autograd(model, n_queries):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    text = torch.randn(n_queries, 32)
    ref_alpha, ref_sims = plain_alpha(model, pixels, text)
    with torch.no_grad():
        x = vision_prefix(model.visual, pixels)
    att, alpha, s_iq = attention_and_gradients(model.visual, x, text)
    assert alpha.shape == (n_queries, 4, 17)
    assert ref_alpha.abs().max() > 1e-4  # the comparison is not between zeros
    assert torch.allclose(alpha, ref_alpha, atol=1e-5, rtol=0)
    assert torch.allclose(s_iq, ref_sims, atol=1e-6)


def test_gradient_matches_finite_differences():
    torch.manual_seed(2)
    model = make_model().double()
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    text = torch.randn(1, 32, dtype=torch.float64)
    with torch.no_grad():
        x = vision_prefix(visual, torch.randn(1, 3, 64, 64, dtype=torch.float64))
        att, v = cls_attention(block, x)
    _, alpha, _ = attention_and_gradients(visual, x, text)
    eps = 1e-6
    with torch.no_grad():
        base = F.cosine_similarity(cls_tail(visual, block, x, att, v), text)
        for h, t in [(0, 0), (1, 5), (3, 16)]:
            bumped = att.clone()
            bumped[0, h, t] += eps
            moved = F.cosine_similarity(cls_tail(visual, block, x, bumped, v), text)
            assert math.isclose(float((moved - base) / eps), float(alpha[0, h, t]), rel_tol=1e-4, abs_tol=1e-8)


def test_patch_maps_qa_and_va():
    att = torch.rand(4, 17)
    alpha = torch.randn(3, 4, 17)
    qa = patch_maps(att, alpha, (4, 4), "qa")
    va = patch_maps(att, None, (4, 4), "va")
    assert qa.shape == (3, 4, 4) and va.shape == (1, 4, 4)
    expected = (att[None, :, 1:] * alpha[:, :, 1:].clamp_min(0)).mean(1).view(3, 4, 4)
    assert torch.allclose(qa, expected)
    assert torch.allclose(va[0], att[:, 1:].mean(0).view(4, 4))
    assert (qa >= 0).all()
    # row-major patch order: token 1 is the top-left patch, token 4 the top-right
    att2 = torch.zeros(1, 17)
    att2[0, 4] = 1.0
    assert patch_maps(att2, None, (4, 4), "va")[0, 0, 3] == 1.0


def test_upsample_without_geometry_change_is_bilinear_interpolation():
    maps = torch.rand(2, 4, 4)
    geometry = geometry_for(64, 64, PreprocessSpec(size=(64, 64)))
    up, visible = upsample(maps, geometry)
    ref = F.interpolate(maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert up.shape == (2, 64, 64)
    assert visible.all()
    assert torch.allclose(up, ref, atol=1e-6)


def test_upsample_undoes_resize_and_center_crop():
    # 320x240 image, 64 px model input: resized to 85x64, 10 px cut on the left, 11 on the right
    geometry = geometry_for(320, 240, PreprocessSpec(size=(64, 64)))
    assert (geometry.resized_width, geometry.resized_height, geometry.left, geometry.top) == (85, 64, 10, 0)
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0  # patch row 1, column 2: input pixels x 32..48, y 16..32
    up, visible = upsample(maps, geometry)
    scale = 85 / 320
    x_lo, x_hi = (10 + 32) / scale, (10 + 48) / scale
    y_lo, y_hi = 16 / scale, 32 / scale
    peak_y, peak_x = divmod(int(up[0].argmax()), 320)
    assert x_lo <= peak_x <= x_hi and y_lo <= peak_y <= y_hi
    # the columns CLIP never saw: first ~37.6 and last ~41 pixels
    assert not visible[:, :37].any() and visible[:, 38:278].all() and not visible[:, 280:].any()
    assert (up[0][~visible] == 0).all()
    x1, _, x2, _ = geometry.visible_box()
    assert x1 == pytest.approx(10 / scale) and x2 == pytest.approx(74 / scale)


def test_normalize_range_flat_and_invisible():
    maps = torch.rand(2, 10, 12) * 0.003
    maps[1] = 0.5  # flat
    visible = torch.ones(10, 12, dtype=torch.bool)
    visible[:, :2] = False
    out = normalize(maps, visible)
    inside = out[0][visible]
    assert inside.min() == 0 and inside.max() == pytest.approx(1.0)
    assert (out[:, ~visible] == 0).all()
    assert (out[1] == 0).all()


def blobs():
    m = torch.zeros(40, 50)
    m[5:10, 5:10] = 0.9  # small, contains the peak below
    m[7, 7] = 1.0
    m[20:35, 20:45] = 0.8  # large
    return m


def test_threshold_box_rules():
    m = blobs()
    assert threshold_box(m, 0.7, "largest") == (20.0, 20.0, 45.0, 35.0)
    assert threshold_box(m, 0.7, "peak") == (5.0, 5.0, 10.0, 10.0)
    assert threshold_box(m, 0.7, "all") == (5.0, 5.0, 45.0, 35.0)
    assert threshold_box(m, 0.85, "largest") == (5.0, 5.0, 10.0, 10.0)
    assert threshold_box(torch.zeros(5, 5), 0.7) is None


def test_threshold_box_is_eight_connected():
    m = torch.zeros(6, 6)
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0  # a diagonal line
    m[0, 5] = 1.0
    assert threshold_box(m, 0.7, "largest") == (1.0, 1.0, 4.0, 4.0)


def test_compute_maps_on_image():
    backbone = make_backbone()
    image = draw_scene()
    pixels, geometry = preprocess(image, backbone.spec)
    text = backbone.encode_text(["a red square", "a blue ball", "grass"])
    maps = compute_maps(backbone, pixels, geometry, text, "qa")
    assert maps.raw.shape == (3, 240, 320) and maps.normalized.shape == (3, 240, 320)
    assert (maps.raw >= 0).all()
    assert maps.normalized.min() == 0 and maps.normalized.max() == pytest.approx(1.0)
    assert not torch.allclose(maps.raw[0], maps.raw[1])  # query-aware: maps differ by query
    va = compute_maps(backbone, pixels, geometry, text, "va")
    assert torch.equal(va.raw[0], va.raw[2])  # vanilla attention does not depend on the query
    image_feat = backbone.encode_images([image])
    assert torch.allclose(maps.s_iq, (text @ image_feat.T)[:, 0], atol=1e-5)
    assert isinstance(geometry, Geometry)
