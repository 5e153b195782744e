"""Precision of the no-gradient image encoder (proposal crops, whole images): fp32, bf16
weights, and the "auto" choice; QAM's gradient path stays fp32 whatever it is."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bicm import devices as devices_module
from bicm.backbone import Backbone
from bicm.cli import app
from bicm.devices import resolve_precision
from bicm.errors import BicmError
from bicm.preprocess import preprocess
from bicm.qam import compute_maps

from .helpers import draw_scene, make_backbone


def test_resolve_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision(None, cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(BicmError, match=r"fp16 \(weights\) needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(BicmError, match="unknown weights precision 'int4'"):
        resolve_precision("int4", cpu)
    monkeypatch.setattr(devices_module, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(devices_module, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None


def low_precision(bb: Backbone, dtype: torch.dtype) -> Backbone:
    return dataclasses.replace(bb, precision=dtype)


def test_bf16_crops_are_close_to_fp32_and_leave_the_model_alone():
    fp32 = make_backbone()
    bf16 = low_precision(make_backbone(), torch.bfloat16)
    pixels = torch.stack([preprocess(draw_scene(320 + 8 * i, 240), fp32.spec)[0] for i in range(6)])
    a, b = fp32.encode_pixels(pixels), bf16.encode_pixels(pixels)
    assert b.dtype == torch.float32 and b.shape == a.shape
    cos = (a * b).sum(dim=1)
    assert float(cos.min()) > 0.99 and not torch.equal(a, b)  # close, but really computed in bf16
    assert bf16.image_encoder() is not bf16.model.visual
    assert next(bf16.image_encoder().parameters()).dtype == torch.bfloat16
    assert next(bf16.model.visual.parameters()).dtype == torch.float32  # QAM's model is untouched
    assert fp32.image_encoder() is fp32.model.visual
    assert bf16.fingerprint() != fp32.fingerprint() and bf16.fingerprint().endswith("-wbf16")


def test_qam_maps_do_not_depend_on_the_precision():
    fp32 = make_backbone()
    bf16 = low_precision(make_backbone(), torch.bfloat16)
    image = draw_scene()
    text = fp32.encode_text(["a red square", "a blue disc"])
    pixels, geometry = preprocess(image, fp32.spec)
    maps_a = compute_maps(fp32, pixels, geometry, text, "qa")
    maps_b = compute_maps(bf16, pixels, geometry, text, "qa")
    assert torch.equal(maps_a.raw, maps_b.raw)


def test_cli_precision_option_and_environment(scene_files, tiny_checkpoint):
    runner = CliRunner()
    image, dets = scene_files
    args = ["ground", str(image), "the red square", "-c", str(tiny_checkpoint), "-p", str(dets), "--json"]
    out = {}
    for precision in ("fp32", "bf16"):
        result = runner.invoke(app, [*args, "--precision", precision])
        assert result.exit_code == 0, result.output
        out[precision] = json.loads(result.stdout.splitlines()[0])
    a, b = out["fp32"]["candidates"], out["bf16"]["candidates"]
    assert [c["box"] for c in a] == [c["box"] for c in b]
    assert [c["s_cq"] for c in a] == [c["s_cq"] for c in b] and [c["s_td"] for c in a] == [c["s_td"] for c in b]  # text, QAM: fp32
    s_pq = [(x["s_pq"], y["s_pq"]) for x, y in zip(a, b) if x["source"] == "proposal"]
    assert all(abs(x - y) < 0.01 for x, y in s_pq) and any(x != y for x, y in s_pq)  # crops: bf16
    result = runner.invoke(app, args, env={"BICM_PRECISION": "fp16"})
    assert result.exit_code == 2 and "fp16 (weights) needs a CUDA device" in result.stderr


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_fast_tower_computes_the_same_function(quick_gelu):
    """The rewritten tower (QuickGELU folded into SiLU, patch embedding as a matmul, fused
    self-attention), kept in fp32 here, gives the original tower's output; the original is
    left as it was."""
    from open_clip.transformer import QuickGELU

    from bicm.tower import _PatchProjection, _SelfAttention, fast_image_tower

    from .helpers import TINY_CFG, make_model

    model = make_model({**TINY_CFG, "quick_gelu": quick_gelu})
    visual = model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    tower = fast_image_tower(visual, torch.float32)
    assert isinstance(tower.conv1, _PatchProjection)
    acts = [type(block.mlp.gelu) for block in tower.transformer.resblocks]
    assert acts == [torch.nn.SiLU if quick_gelu else torch.nn.GELU] * len(acts)
    assert any(isinstance(m, QuickGELU) for m in visual.modules()) == quick_gelu  # the original keeps its own
    assert {type(block.attn) for block in tower.transformer.resblocks} == {_SelfAttention}
    torch.manual_seed(1)
    pixels = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels), visual(pixels), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in visual.state_dict().items())


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_self_attention_equals_multihead_attention(batch_first):
    """Same output as nn.MultiheadAttention's self-attention; calls it was not made for (a mask,
    cross-attention, the weights asked for) go to the original module."""
    from bicm.tower import _SelfAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    attn = _SelfAttention(mha)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    other = torch.randn_like(x)
    mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn(x, x, x, attn_mask=mask)[0], mha(x, x, x, need_weights=False, attn_mask=mask)[0])
        torch.testing.assert_close(attn(x, other, other)[0], mha(x, other, other, need_weights=False)[0])
        out, weights = attn(x, x, x, need_weights=True)
        assert weights is not None
    assert not _SelfAttention.applies_to(torch.nn.MultiheadAttention(32, 4, add_bias_kv=True))
    assert not _SelfAttention.applies_to(torch.nn.MultiheadAttention(32, 4, kdim=16, vdim=16))


def test_text_transformer_is_the_models_own():
    """The text tower run block by block with the fused attention gives the model's
    Transformer output under the causal mask; a block of another kind sends the whole tower
    through the model's own forward."""
    from bicm.tower import text_transformer

    from .helpers import make_model

    model = make_model()
    torch.manual_seed(3)
    x = torch.randn(5, 9, model.transformer.width)
    mask = model.attn_mask[:9, :9]
    with torch.inference_mode():
        expected = model.transformer(x, attn_mask=mask)
        torch.testing.assert_close(text_transformer(model.transformer, x, mask), expected, rtol=1e-5, atol=1e-5)
        model.transformer.resblocks[0].attn = _Recorder(model.transformer.resblocks[0].attn)
        torch.testing.assert_close(text_transformer(model.transformer, x, mask), expected)
        assert model.transformer.resblocks[0].attn.calls == 1  # the model's own path ran


class _Recorder(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_patch_projection_equals_the_convolution_on_any_size():
    """Also where the image is not a whole number of patches (the convolution drops the rest)."""
    from bicm.tower import _PatchProjection

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=(4, 5), stride=(4, 5), bias=True)
    proj = _PatchProjection(conv)
    for h, w in [(16, 20), (18, 23), (4, 5)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(proj(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not _PatchProjection.applies_to(torch.nn.Conv2d(3, 8, kernel_size=4, stride=2))
    assert not _PatchProjection.applies_to(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1))


def test_fused_activation_of_the_bf16_cpu_tower(monkeypatch):
    """Where this torch has oneDNN's fused linear+SiLU, the bf16 CPU tower uses it and agrees
    with the unfused bf16 tower and with fp32; where it does not, the tower falls back."""
    from bicm import tower as bb
    from bicm.tower import _LinearSiLU, fast_image_tower

    from .helpers import make_model

    visual = make_model().visual  # QuickGELU
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fused = fast_image_tower(visual, torch.bfloat16)
    kinds = {type(block.mlp.c_fc) for block in fused.transformer.resblocks}
    assert kinds == ({_LinearSiLU} if bb._fused_silu_available(torch.bfloat16) else {torch.nn.Linear})
    monkeypatch.setattr(bb, "_fused_silu_available", lambda dtype: False)
    plain = fast_image_tower(visual, torch.bfloat16)
    assert {type(block.mlp.c_fc) for block in plain.transformer.resblocks} == {torch.nn.Linear}
    with torch.inference_mode():
        ref = F.normalize(visual(pixels), dim=-1)
        for tower in (fused, plain):
            out = F.normalize(tower(pixels.bfloat16()).float(), dim=-1)
            assert float((out * ref).sum(-1).min()) > 0.999
