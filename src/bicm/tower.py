"""The fast low-precision image tower: a bf16/fp16 copy of an open_clip image tower,
rewritten to compute the same function with fewer passes over memory.

:func:`fast_image_tower` makes the copy that :meth:`bicm.backbone.Backbone.image_encoder`
runs on proposal crops and whole images when a ``precision`` is set. The rewrites
(QuickGELU folded into SiLU, the fused oneDNN linear+SiLU, the patch embedding as a matmul)
and what each one gains are measured in benchmarks/README.md (``bench_tower.py``).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["fast_image_tower", "text_transformer"]

#: QuickGELU's constant: ``quick_gelu(y) = y * sigmoid(1.702 * y)`` (open_clip, OpenAI CLIP).
_QUICK_GELU_ALPHA = 1.702


class _PatchProjection(torch.nn.Module):
    """A ViT patch embedding (a convolution whose stride equals its kernel, no padding) as one
    matrix product over the image's patches.

    Same function as the convolution: ``(N, C, H, W) -> (N, width, H // p, W // p)``. In the
    CPU profile of benchmarks/README.md (``bench_tower.py``), oneDNN ran that convolution at a
    lower rate than the tower's matmuls, so the matmul form is faster.
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.kernel = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        # (width, C, kh, kw) -> (width, C * kh * kw): the order the patches are flattened in
        self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def applies_to(conv: torch.nn.Module) -> bool:
        return (
            type(conv) is torch.nn.Conv2d
            and tuple(conv.stride) == tuple(conv.kernel_size)
            and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kh, kw = self.kernel
        gh, gw = h // kh, w // kw  # a convolution drops the remainder too
        patches = x[:, :, : gh * kh, : gw * kw].reshape(n, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(n, gh * gw, c * kh * kw), self.weight, self.bias)  # (N, gh*gw, width)
        return out.view(n, gh, gw, -1).permute(0, 3, 1, 2)  # the convolution's layout, as a view


class _LinearSiLU(torch.nn.Module):
    """``silu(linear(x))`` as ONE oneDNN matmul with the activation as its post-op
    (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend emits):
    the activation is applied while the output tile is still in registers, in fp32, before
    the result is rounded to bf16. CPU only; see :func:`_fused_silu_available`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "swish", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


class _SelfAttention(torch.nn.Module):
    """An unmasked ``nn.MultiheadAttention`` self-attention as one input projection, PyTorch's
    fused ``scaled_dot_product_attention`` and the output projection.

    Same function as the module it replaces (``(N, L, D)``, or ``(L, N, D)`` when not
    batch-first). PyTorch's own inference path for ``nn.MultiheadAttention`` materialises the
    ``L x L`` scores per head and runs its softmax as a separate pass; the fused kernel keeps
    them in cache (``benchmarks/README.md``, ``bench_tower.py``). Calls it was not made for (a
    mask, cross-attention, attention weights asked for) go to the original module.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.original = mha
        self.batch_first = mha.batch_first

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        return (
            type(module) is torch.nn.MultiheadAttention
            and module._qkv_same_embed_dim
            and module.in_proj_weight is not None
            and module.bias_k is None
            and module.bias_v is None
            and not module.add_zero_attn
        )

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if key is not query or value is not query or need_weights or attn_mask is not None or kwargs:
            return self.original(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, D)
        out = _self_attention(x, self.original)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _self_attention(x: torch.Tensor, mha: torch.nn.MultiheadAttention, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mha``'s self-attention of batch-first ``x`` ``(N, L, D)``: one input projection (a 2-D
    matrix product), ``scaled_dot_product_attention`` (``attn_mask`` ``(L, L)``, additive or
    boolean), the output projection."""
    n, length, width = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(n, length, 3, mha.num_heads, width // mha.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_width)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(n, length, width)
    return mha.out_proj(out)


def text_transformer(transformer: torch.nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """open_clip's text ``Transformer`` on batch-first ``x`` ``(N, L, D)`` (no gradients), with
    each block's self-attention as :func:`_self_attention`: the same function as
    ``transformer(x, attn_mask=attn_mask)``.

    ``nn.MultiheadAttention`` works sequence-first inside, so the input projection of a
    batch-first input ran as a batched matrix product over a broadcast weight (a quarter of a
    16 x 4-token forward of ViT-B-32's text tower on the 2-core Xeon); here it is one plain
    matrix product. Blocks of other kinds (cross-attention, custom blocks) go through
    ``transformer`` unchanged.
    """
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(transformer, "resblocks", None)
    plain = (
        getattr(transformer, "batch_first", False)
        and blocks is not None
        and all(
            type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") and _SelfAttention.applies_to(b.attn)
            for b in blocks
        )
    )
    if not plain:
        return transformer(x, attn_mask=attn_mask)
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # as the block does
    for block in blocks:
        x = x + block.ls_1(_self_attention(block.ln_1(x), block.attn, mask))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


_FUSED_SILU: dict[torch.dtype, bool] = {}


def _fused_silu_available(dtype: torch.dtype) -> bool:
    """Whether this torch build runs :class:`_LinearSiLU` in ``dtype`` on the CPU and agrees
    with the unfused ``silu(linear(x))`` (checked once per dtype on a small case; a private
    op, so any failure means: use the unfused form)."""
    if dtype not in _FUSED_SILU:
        ok = False
        try:
            op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
            if op is not None and torch.backends.mkldnn.is_available():
                gen = torch.Generator().manual_seed(0)
                linear = torch.nn.Linear(64, 48).to(dtype)
                x = torch.randn(5, 7, 64, generator=gen).to(dtype)
                with torch.inference_mode():
                    fused = _LinearSiLU(linear)(x).float()
                    plain = F.silu(linear(x).float())
                ok = fused.shape == plain.shape and bool(torch.allclose(fused, plain, rtol=0.05, atol=0.05))
        except Exception:  # noqa: BLE001 - a private op: any failure means "not available"
            ok = False
        _FUSED_SILU[dtype] = ok
    return _FUSED_SILU[dtype]


def fast_image_tower(
    visual: torch.nn.Module,
    dtype: torch.dtype,
    fuse: bool = True,
    *,
    silu: bool = True,
    patch_matmul: bool = True,
    fused_attention: bool = True,
) -> torch.nn.Module:
    """A no-gradient copy of an open_clip image tower with weights in ``dtype``, rewritten to
    compute the same function faster; ``visual`` itself is left untouched.

    * Every QuickGELU MLP ``c_proj(quick_gelu(c_fc(x)))`` becomes
      ``(c_proj / 1.702)(silu((1.702 c_fc)(x)))``: since ``silu(z) = z sigmoid(z)``,
      ``silu(1.702 y) / 1.702 = y sigmoid(1.702 y)`` exactly. The scales are folded into the
      weights in fp32, before the cast, so one in-place SiLU kernel replaces QuickGELU's three
      passes (``1.702 * y``, ``sigmoid``, ``*``) and their temporaries.
    * On a CPU in bf16, ``c_fc`` and that SiLU run as one oneDNN matmul with a fused
      activation (:class:`_LinearSiLU`), where this torch build has it and ``fuse`` is set
      (not for ``torch.compile``, which fuses by itself and cannot lower that op).
    * The patch embedding becomes a matrix product (:class:`_PatchProjection`).
    * Self-attention runs through ``scaled_dot_product_attention`` (:class:`_SelfAttention`).

    Any other tower (a ResNet, other activations) is only copied and cast. ``silu``,
    ``patch_matmul`` and ``fused_attention`` switch the rewrites off (benchmarks/bench_tower.py compares them; the
    fused activation needs ``silu``). What each step gains, and how close the embeddings stay
    to fp32: see benchmarks/README.md (``bench_tower.py``).

    Parameters
    ----------
    visual: an open_clip image tower, ``(N, 3, H, W)`` pixels -> ``(N, E)`` features.
    dtype: the copy's weight dtype (``torch.bfloat16``, ``torch.float16``; ``torch.float32``
        keeps the rewrites in full precision).
    fuse: allow the fused oneDNN linear+SiLU (:class:`_LinearSiLU`).

    Returns
    -------
    The copy: same shapes in and out as ``visual``; it takes inputs in ``dtype``.
    """
    from open_clip.transformer import QuickGELU

    on_cpu = all(p.device.type == "cpu" for p in visual.parameters())
    fuse = fuse and silu and on_cpu and dtype == torch.bfloat16 and _fused_silu_available(dtype)
    tower = copy.deepcopy(visual).float().eval().requires_grad_(False)
    with torch.no_grad():
        for module in list(tower.modules()):
            if fused_attention and _SelfAttention.applies_to(getattr(module, "attn", None)):
                module.attn = _SelfAttention(module.attn)
            mlp = module
            if not isinstance(mlp, torch.nn.Sequential):
                continue
            c_fc, act, c_proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
            if silu and isinstance(c_fc, torch.nn.Linear) and isinstance(act, QuickGELU) and isinstance(c_proj, torch.nn.Linear):
                c_fc.weight.mul_(_QUICK_GELU_ALPHA)
                if c_fc.bias is not None:
                    c_fc.bias.mul_(_QUICK_GELU_ALPHA)
                c_proj.weight.div_(_QUICK_GELU_ALPHA)
                mlp.gelu = torch.nn.SiLU(inplace=True)
                if fuse:
                    mlp.c_fc, mlp.gelu = _LinearSiLU(c_fc), torch.nn.Identity()
        if patch_matmul and _PatchProjection.applies_to(getattr(tower, "conv1", None)):
            tower.conv1 = _PatchProjection(tower.conv1)
    return tower.to(dtype).eval().requires_grad_(False)
