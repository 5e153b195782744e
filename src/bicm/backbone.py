"""CLIP backbone: loading (pretrained tags and local files), preprocessing geometry, encoders.

Loading
-------
* By architecture and pretrained tag, through open_clip's own registry and downloads
  (paper default ``ViT-B-32`` + ``openai``). OpenAI weights are always built with QuickGELU:
  the tag's config says so and :func:`load_backbone` forces it (open_clip itself only warns).
* From a local file (``checkpoint=``):

  - an open_clip state dict (``.bin``/``.pt``/``.pth``, optionally ``{"state_dict": ...}``
    with ``module.`` prefixes, as open_clip training writes it);
  - an OpenAI-style state dict (``torch.save(model.state_dict())``, fp16 weights are fine);
  - an OpenAI TorchScript archive (the original ``ViT-B-32.pt`` files);
  - safetensors (``open_clip_model.safetensors`` from the hub, or files written by
    :func:`save_checkpoint`, which carry their open_clip config in the metadata).

  The architecture comes, in this order, from ``model=``, the file's embedded config, an
  ``open_clip_config.json`` beside the file, or the tensor shapes (OpenAI conventions:
  64-wide heads). Pickled files are read with ``weights_only=True`` after a scan for memory
  bombs; TorchScript archives are read as data (:mod:`bicm.safeload`), never compiled: no code
  from a checkpoint is executed.

Preprocessing
-------------
:func:`preprocess` reproduces open_clip's eval transform exactly (resize by the shortest
side + center crop, ``squash`` or ``longest`` + pad, bicubic, CLIP mean/std) and also returns
the :class:`Geometry` that maps original pixels to the model's input grid. QAM needs it to put
its patch map back on the right pixels of the original image.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_path
from .errors import BicmError, warn
from .safeload import check_torch_file, json_loads, read_torchscript, regular_file
from .safeload import is_torchscript as _is_torchscript

__all__ = [
    "Backbone",
    "Geometry",
    "PreprocessSpec",
    "load_backbone",
    "preprocess",
    "preprocess_many",
    "save_checkpoint",
    "fast_image_tower",
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
]

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
#: ``--model shapes``: the small CLIP trained on the shapes world, shipped with bicm
SHAPES_MODEL = "shapes"
SHAPES_WEIGHTS = "shapes-clip.safetensors"

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


# --------------------------------------------------------------------------------------
# Preprocessing and its geometry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessSpec:
    """open_clip's eval preprocessing, as data.

    Attributes
    ----------
    size: ``(height, width)`` of the model input.
    mean, std: per-channel normalisation.
    interpolation: ``"bicubic"`` or ``"bilinear"``.
    resize_mode: ``"shortest"`` (resize the short side, center crop), ``"squash"`` (resize
        to ``size`` ignoring aspect) or ``"longest"`` (resize the long side, pad).
    fill: pad value (0-255) for ``"longest"``.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: int = 0

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> "PreprocessSpec":
        size = cfg.get("size", 224)
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        mean = cfg.get("mean") or cls.mean
        std = cfg.get("std") or cls.std
        if not isinstance(mean, (list, tuple)):
            mean = (mean,) * 3
        if not isinstance(std, (list, tuple)):
            std = (std,) * 3
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATION:
            interpolation = "bicubic"  # open_clip maps anything else ('random') to bicubic at eval
        return cls(
            size=size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=interpolation,
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill=int(cfg.get("fill_color", 0) or 0),
        )

    def to_open_clip(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill,
        }

    def with_resize_mode(self, resize_mode: Optional[str]) -> "PreprocessSpec":
        if resize_mode is None or resize_mode == self.resize_mode:
            return self
        if resize_mode not in ("shortest", "squash", "longest"):
            raise BicmError(f"unknown resize mode {resize_mode!r}; use shortest, squash or longest")
        return PreprocessSpec(self.size, self.mean, self.std, self.interpolation, resize_mode, self.fill)


@dataclass(frozen=True)
class Geometry:
    """How the pixels of an original image sit on the model's input grid.

    An original pixel coordinate ``x`` (0..width, continuous) lands on the model input at
    ``u = x * resized_width / width - left``; likewise for ``y``. ``left``/``top`` are
    negative when the image was padded. Input coordinates outside ``[0, input_w)`` were
    cropped away: CLIP never saw those pixels.
    """

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    input_width: int
    input_height: int

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.height

    def visible_box(self) -> tuple[float, float, float, float]:
        """The part of the original image (xyxy, original pixels) that the model sees."""
        x1 = max(0.0, self.left / self.scale_x)
        y1 = max(0.0, self.top / self.scale_y)
        x2 = min(float(self.width), (self.left + self.input_width) / self.scale_x)
        y2 = min(float(self.height), (self.top + self.input_height) / self.scale_y)
        return (x1, y1, x2, y2)


def _resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    target_h, target_w = spec.size
    if spec.resize_mode == "squash":
        return target_w, target_h
    if spec.resize_mode == "shortest" and target_h == target_w:
        # torchvision Resize(int): short side -> size, long side floored
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    # open_clip ResizeKeepRatio (timm): longest=1 for 'longest', 0 for 'shortest'
    longest = 1.0 if spec.resize_mode == "longest" else 0.0
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return max(1, round(width / ratio)), max(1, round(height / ratio))  # a 1x5000 image keeps a 1 px side


def _crop_offset(size: int, crop: int) -> int:
    if crop > size:  # padded first, symmetric with the extra pixel on the right/bottom
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def geometry_for(width: int, height: int, spec: PreprocessSpec) -> Geometry:
    """The :class:`Geometry` of an image of ``width`` x ``height`` under ``spec``."""
    rw, rh = _resized_size(width, height, spec)
    ih, iw = spec.size
    if spec.resize_mode == "squash":
        left = top = 0
    else:
        left, top = _crop_offset(rw, iw), _crop_offset(rh, ih)
    return Geometry(width, height, rw, rh, left, top, iw, ih)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> tuple[torch.Tensor, Geometry]:
    """open_clip's eval transform of an RGB image, plus its geometry.

    Returns
    -------
    pixels: ``(3, H_in, W_in)`` float32, normalised.
    geometry: where the original pixels went.
    """
    fitted, geometry = _fit(image, spec)
    return _normalise(np.array(fitted, dtype=np.uint8)[None], spec)[0], geometry


def preprocess_many(images: Sequence[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    """:func:`preprocess` of many RGB images into one batch, normalised in one step.

    Returns
    -------
    ``(N, 3, H_in, W_in)`` float32, normalised.
    """
    ih, iw = spec.size
    batch = np.empty((len(images), ih, iw, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(_fit(image, spec)[0], dtype=np.uint8)
    return _normalise(batch, spec)


def _fit(image: Image.Image, spec: PreprocessSpec) -> tuple[Image.Image, Geometry]:
    """The resized and cropped/padded RGB image the model sees (``spec.size``), and its geometry."""
    geometry = geometry_for(image.width, image.height, spec)
    ih, iw = spec.size
    rw, rh = geometry.resized_width, geometry.resized_height
    if rw * rh > _FULL_RESIZE_LIMIT * iw * ih:
        # An extreme aspect ratio (a 1x5000 image or crop becomes 224x1,120,000 pixels, 750 MB,
        # when its short side is resized): resize only the part that lands on the model's input.
        # Pillow samples the same positions with the same filter (the 8-bit rounding between its
        # two passes may differ, and Pillow 13 was seen to differ by up to ~15 levels on some
        # upsampling boxes: this is why ordinary images and crops are resized whole), in
        # constant memory.
        x0, y0 = max(geometry.left, 0), max(geometry.top, 0)
        x1, y1 = min(geometry.left + iw, rw), min(geometry.top + ih, rh)
        region = (x0 / geometry.scale_x, y0 / geometry.scale_y, x1 / geometry.scale_x, y1 / geometry.scale_y)
        part = image.resize((x1 - x0, y1 - y0), _INTERPOLATION[spec.interpolation], box=region)
        canvas = Image.new("RGB", (iw, ih), (spec.fill,) * 3)
        canvas.paste(part, (x0 - geometry.left, y0 - geometry.top))
        return canvas, geometry
    resized = image
    if (rw, rh) != image.size:
        resized = image.resize((rw, rh), _INTERPOLATION[spec.interpolation])
    if (geometry.left, geometry.top, iw, ih) != (0, 0, resized.width, resized.height):
        canvas = Image.new("RGB", (iw, ih), (spec.fill,) * 3)
        canvas.paste(resized, (-geometry.left, -geometry.top))
        resized = canvas
    return resized, geometry


#: Above this many times the model's input area (aspect ratios beyond 64:1 under "shortest"),
#: :func:`preprocess` resizes only the visible part.
_FULL_RESIZE_LIMIT = 64


def _normalise(batch: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 with CLIP's mean/std."""
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.div_(255.0).sub_(mean).div_(std)


# --------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------
@dataclass
class Backbone:
    """A loaded CLIP model with its tokenizer, preprocessing and device settings.

    Use :func:`load_backbone` to make one. All ``encode_*`` methods return L2-normalised
    float32 embeddings on the backbone's device.
    """

    model: torch.nn.Module
    tokenizer: Any
    spec: PreprocessSpec
    device: torch.device
    name: str
    amp: Optional[torch.dtype] = None
    model_cfg: dict[str, Any] = field(default_factory=dict)
    #: Weight dtype of the no-gradient image encoder (proposal crops, whole images): ``None``
    #: is fp32; ``torch.bfloat16`` / ``torch.float16`` run a low-precision COPY of the image
    #: tower. QAM's gradient path and the text encoder always use the fp32 model.
    precision: Optional[torch.dtype] = None
    #: Run the no-gradient image encoder through ``torch.compile`` (the first batch compiles:
    #: tens of seconds on a CPU; worth it for long runs). Falls back to eager, with a warning,
    #: where compiling fails (no C++ compiler, unsupported model).
    compiled: bool = False

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self._fast_visual: Optional[torch.nn.Module] = None
        self._compiled_visual: Optional[torch.nn.Module] = None

    # ---- facts -----------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return proj.out_features
        if proj is not None:
            return int(proj.shape[1])
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model, "context_length", None) or getattr(self.tokenizer, "context_length", 77))

    def qam_unsupported_reason(self) -> Optional[str]:
        """Why QAM cannot run on this image tower, or ``None`` when it can."""
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            return (
                f"QAM needs a ViT image encoder, but {self.name} has a {type(visual).__name__}; "
                "run COM alone (--components com)"
            )
        block = visual.transformer.resblocks[-1]
        if not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            return f"QAM supports standard open_clip ViT blocks; {self.name} uses {type(block).__name__}"
        if visual.attn_pool is not None or visual.pool_type != "tok":
            return f"QAM needs [CLS]-token pooling; {self.name} pools with {visual.pool_type!r}/attention pooling"
        return None

    def fingerprint(self) -> str:
        """Hash of the weights (and the autocast dtype): changes whenever the features would.

        Computed once (about a second for ViT-B/32) and remembered.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.blake2b(digest_size=12)
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            cached = f"{digest.hexdigest()}-{str(self.amp).replace('torch.', '') if self.amp else 'fp32'}"
            if self.precision is not None:  # low-precision crop/image features are other features
                cached += f"-w{dtype_name(self.precision)}"
            self._fingerprint = cached
        return cached

    def image_encoder(self) -> torch.nn.Module:
        """The image tower that :meth:`encode_pixels` runs: the model's own (fp32), or a copy
        with weights in :attr:`precision`, made on first use and kept; wrapped by
        ``torch.compile`` when :attr:`compiled` (same weights, compiled on the first call)."""
        visual = self.model.visual
        if self.precision is not None:
            if self._fast_visual is None:
                self._fast_visual = fast_image_tower(self.model.visual, self.precision, fuse=not self.compiled)
            visual = self._fast_visual
        if not self.compiled:
            return visual
        if self._compiled_visual is None:
            self._compiled_visual = torch.compile(visual)
        return self._compiled_visual

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the encoders (no-op in fp32)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    # ---- text --------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize ``texts`` to ``(N, context_length)`` ids, warning about truncation."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            limit = self.context_length - 2  # start and end tokens
            for text in texts:
                n = len(encode(text))
                if n > limit:
                    warn(f"query {_clip_text(text)!r} has {n} tokens; truncated to the model's {limit}")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Encode texts. Returns ``(N, E)`` L2-normalised float32."""
        if len(texts) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        out = []
        tokens = self.tokenize(texts)
        for start in range(0, len(texts), batch_size):
            with self.autocast():
                feats = encode_tokens(self.model, tokens[start : start + batch_size])
            out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    # ---- images -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Encode preprocessed images ``(N, 3, H, W)``. Returns ``(N, E)`` L2-normalised."""
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start : start + batch_size].to(self.device, non_blocking=True)
            out.append(F.normalize(self._encode_chunk(chunk).float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        visual = self.image_encoder()
        if self.precision is not None:
            chunk = chunk.to(self.precision)
        if visual is self._compiled_visual:
            torch._dynamo.maybe_mark_dynamic(chunk, 0)  # one graph for every batch size
            try:
                return visual(chunk)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model still works
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                warn(f"torch.compile failed ({type(exc).__name__}: {first}); encoding images without it")
                self.compiled, self._compiled_visual = False, None
                visual = self.image_encoder()
        if self.precision is not None:
            return visual(chunk)
        with self.autocast():
            return visual(chunk)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Preprocess and encode RGB images. Returns ``(N, E)`` L2-normalised."""
        if not images:
            return torch.zeros(0, self.embed_dim, device=self.device)
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_many(images[start : start + batch_size], self.spec)
            out.append(self.encode_pixels(pixels, batch_size))
        return torch.cat(out)


# --------------------------------------------------------------------------------------
# The low-precision image tower
# --------------------------------------------------------------------------------------
#: QuickGELU's constant: ``quick_gelu(y) = y * sigmoid(1.702 * y)`` (open_clip, OpenAI CLIP).
_QUICK_GELU_ALPHA = 1.702


class _PatchProjection(torch.nn.Module):
    """A ViT patch embedding (a convolution whose stride equals its kernel, no padding) as one
    matrix product over the image's patches.

    Same function as the convolution: ``(N, C, H, W) -> (N, width, H // p, W // p)``. In a
    profile of a bf16 ViT-B-32 batch on an AMX CPU, oneDNN ran that convolution at about 280
    GFLOP/s while the tower's matmuls ran at about 580, so the matmul form is faster
    (benchmarks/README.md).
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
    visual: torch.nn.Module, dtype: torch.dtype, fuse: bool = True, *, silu: bool = True, patch_matmul: bool = True
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

    Any other tower (a ResNet, other activations) is only copied and cast. ``silu`` and
    ``patch_matmul`` switch the rewrites off (benchmarks/bench_tower.py compares them; the
    fused activation needs ``silu``). On a 2-core AMX Xeon (bf16, ViT-B-32, batches of 64,
    interleaved paired rounds) each step was faster than the one before it: x1.04-1.13 for the
    SiLU fold, x1.03 for the patch matmul, x1.05-1.08 for the fused activation; embeddings
    within cosine 0.9999 of fp32 (benchmarks/README.md, ``bench_tower.py``).
    """
    from open_clip.transformer import QuickGELU

    on_cpu = all(p.device.type == "cpu" for p in visual.parameters())
    fuse = fuse and silu and on_cpu and dtype == torch.bfloat16 and _fused_silu_available(dtype)
    tower = copy.deepcopy(visual).float().eval().requires_grad_(False)
    with torch.no_grad():
        for module in list(tower.modules()):
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


def _clip_text(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` without the padding after the longest end-of-text token.

    CLIP's text transformer is causal and pools at the EOT token, so positions after the
    last EOT in the batch cannot change any pooled feature: dropping them is exact and
    saves most of the work (queries are ~5-15 tokens of 77). Models this does not hold for
    (bidirectional or CLS-pooled text towers) go through ``model.encode_text`` unchanged.

    Parameters
    ----------
    tokens: ``(N, L)`` token ids.

    Returns
    -------
    ``(N, E)`` text features, not normalised.
    """
    from open_clip.transformer import text_global_pool

    import open_clip

    pool = getattr(model, "text_pool_type", None)
    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or pool not in ("argmax", "eos") or mask is None:
        return model.encode_text(tokens)
    if pool == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    length = int(ends.max().item()) + 1 if tokens.numel() else 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``/``None`` -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BicmError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BicmError("device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def _half_dtype(name: Optional[str], device: torch.device, kind: str, choices: str) -> Optional[torch.dtype]:
    """``None``/"none"/"fp32" -> None (fp32); "bf16", "fp16" (CUDA only) -> the dtype.
    ``kind`` names the setting in errors ("autocast", "weights")."""
    if name in (None, "none", "fp32"):
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise BicmError(f"fp16 ({kind}) needs a CUDA device; on CPU use fp32 or bf16")
        return torch.float16
    raise BicmError(f"unknown {kind} precision {name!r}; use {choices}")


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` in (None, "none", "bf16", "fp16")."""
    return _half_dtype(amp, device, "autocast", "none, bf16 or fp16")


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; ``None`` / float32 -> ``"fp32"``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX-512 BF16).

    Without them PyTorch emulates bf16 GEMMs, many times slower than fp32 (measured on an
    AVX2-only EPYC: 1.3 GFLOP/s bf16 vs 170 GFLOP/s fp32), so ``"auto"`` keeps fp32 there.
    """
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except Exception:  # a private torch API: treat failure as "no"
                pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Weight dtype of the image encoder for crops and whole images (``None`` = fp32).

    ``"auto"``: bf16 on a CUDA GPU that supports it and on CPUs with native bf16 matrix units
    (:func:`cpu_has_fast_bf16`), else fp32. ``"fp16"`` needs CUDA.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    return _half_dtype(precision, device, "weights", ", ".join(PRECISIONS))


def load_backbone(
    model: Optional[str] = None,
    pretrained: Optional[str] = None,
    checkpoint: Union[str, Path, None] = None,
    *,
    device: Union[str, torch.device, None] = "auto",
    amp: Optional[str] = None,
    quick_gelu: Optional[bool] = None,
    cache_dir: Optional[str] = None,
    precision: Optional[str] = "fp32",
    compile: bool = False,
) -> Backbone:
    """Load a CLIP backbone.

    Parameters
    ----------
    model:
        open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``RN50``, ...), or
        ``"shapes"`` for the small CLIP trained on the shapes world that ships with bicm. With
        a ``checkpoint`` it is optional (taken from the file when absent).
    pretrained:
        open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...). Defaults to
        ``openai`` when neither a tag nor a checkpoint is given.
    checkpoint:
        A local weights file or an open_clip model folder (see the module docs).
    device:
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    amp:
        Autocast for the encoders: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` (CUDA only).
    quick_gelu:
        Force the activation (``True`` = QuickGELU, as OpenAI CLIP). ``None``: decided by
        the tag, the file or the config.
    precision:
        Weights of the image encoder for proposal crops and whole images: ``"fp32"``,
        ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"`` (see :func:`resolve_precision`). QAM's
        gradient path stays fp32 whatever this is.
    compile:
        Run that image encoder through ``torch.compile`` (see :attr:`Backbone.compiled`).
    """
    import open_clip

    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    weights_dtype = resolve_precision(precision, dev)
    display_name = None
    if model == SHAPES_MODEL and checkpoint is None and pretrained is None:
        checkpoint, model, display_name = shapes_weights(), None, SHAPES_MODEL
    if checkpoint is not None:
        if pretrained is not None:
            raise BicmError("pass either a pretrained tag or a checkpoint file, not both")
        clip, cfg, spec, name, tokenizer_name = _load_from_file(Path(checkpoint), model, quick_gelu)
    else:
        clip, cfg, spec, name, tokenizer_name = _load_from_tag(model or DEFAULT_MODEL, pretrained, quick_gelu, cache_dir)
    context_length = getattr(clip, "context_length", None)
    if tokenizer_name:
        tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=context_length)
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length or 77)
    clip = clip.to(dev).float()
    return Backbone(clip, tokenizer, spec, dev, display_name or name, amp_dtype, cfg, precision=weights_dtype, compiled=compile)


def recorded_lambda_t(model: Optional[str] = None, checkpoint: Union[str, Path, None] = None) -> Optional[float]:
    """The ``lambda_t`` calibrated for a model by the paper's rule, when its card records one.

    The card is the JSON file beside the weights (``<weights stem>.json``, as ``bicm
    train-clip`` writes), with ``"lambda_t": {"value": ...}``; for ``model="shapes"`` (or no
    model and no checkpoint) the shipped shapes CLIP's card. ``None`` when there is none.
    """
    if checkpoint is None and model not in (None, SHAPES_MODEL):
        return None
    weights = Path(checkpoint) if checkpoint is not None else shapes_weights()
    card = weights.with_suffix(".json")
    if not card.is_file():
        return None
    try:
        found = json_loads(card.read_text(), card).get("lambda_t")
        value = float(found["value"] if isinstance(found, dict) else found)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, BicmError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def shapes_weights() -> Path:
    """Where the CLIP trained on the shapes world lies inside the installed package."""
    from importlib import resources

    path = Path(str(resources.files("bicm.shapes").joinpath("model", SHAPES_WEIGHTS)))
    regular_file(path, "shapes model", missing=f"the shapes model is not in this installation ({SHAPES_WEIGHTS}); train one with 'bicm train-clip'")
    return path


def _load_from_tag(arch: str, tag: Optional[str], quick_gelu: Optional[bool], cache_dir: Optional[str]):
    import open_clip

    arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        raise BicmError(f"unknown model architecture {arch!r}; open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is None:
        if DEFAULT_PRETRAINED not in tags:
            raise BicmError(f"pass a pretrained tag for {arch} (known: {', '.join(tags) or 'none'}) or --checkpoint PATH")
        tag = DEFAULT_PRETRAINED
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        raise BicmError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        clip = open_clip.create_model(
            arch, pretrained=tag, device="cpu", precision="fp32", force_quick_gelu=quick_gelu, cache_dir=cache_dir
        )
    except RuntimeError as exc:
        if "download" in str(exc).lower() or "connection" in str(exc).lower():
            raise BicmError(
                f"could not download the {arch}/{tag} weights (offline?); download them where there is "
                "internet and pass the file with --checkpoint PATH (OpenAI .pt, open_clip .bin/.pt or .safetensors)"
            ) from None
        raise
    cfg = open_clip.get_model_config(arch) or {}
    cfg = dict(cfg, quick_gelu=quick_gelu)
    spec = PreprocessSpec.from_open_clip(open_clip.get_model_preprocess_cfg(clip))
    return clip, cfg, spec, f"{arch}/{tag}", arch


def _load_from_file(path: Path, arch: Optional[str], quick_gelu: Optional[bool]):
    import open_clip

    if not path.exists():
        raise BicmError(f"checkpoint not found: {path}")
    config: Optional[dict[str, Any]] = None
    if path.is_dir():
        config = _read_sidecar_config(path / "open_clip_config.json")
        weights = _find_weights_in_dir(path)
        if weights is None:
            raise BicmError(f"no weights file (.safetensors, .bin, .pt, .pth) in folder {path}")
        path = weights
    contents = read_state_dict(path)
    state_dict, is_torchscript = contents.state, contents.is_torchscript
    config = contents.config or config or _read_sidecar_config(path.parent / "open_clip_config.json")

    if arch is not None:
        arch = arch.replace("/", "-")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise BicmError(f"unknown model architecture {arch!r}")
        preprocess_cfg: dict[str, Any] = {}
        tokenizer_name: Optional[str] = arch
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False)) or is_torchscript
    elif config is not None:
        model_cfg = dict(config["model_cfg"])
        preprocess_cfg = dict(config.get("preprocess_cfg", {}))
        tokenizer_name = None
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False))
    else:
        model_cfg = infer_model_cfg(state_dict, path)
        preprocess_cfg = {}
        tokenizer_name = None
        if quick_gelu is None:
            quick_gelu = True
            if not is_torchscript:
                warn(
                    f"{path.name} does not record its activation; assuming QuickGELU (OpenAI CLIP weights). "
                    "Pass --quick-gelu or --no-quick-gelu (Python: quick_gelu=) to choose"
                )
    model_cfg = dict(model_cfg, quick_gelu=bool(quick_gelu))
    build_cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    try:
        if model_cfg.get("custom_text") or "hf_model_name" in model_cfg.get("text_cfg", {}):
            clip = open_clip.CustomTextCLIP(**build_cfg)
        else:
            clip = open_clip.CLIP(**build_cfg)
    except (TypeError, ValueError, AssertionError) as exc:
        raise BicmError(f"cannot build a model from the config of {path}: {exc}") from None
    _load_state_dict(clip, state_dict, path, contents.optional)
    spec_cfg = dict(size=clip.visual.image_size)
    spec_cfg.update(preprocess_cfg)
    spec = PreprocessSpec.from_open_clip(spec_cfg)
    return clip, model_cfg, spec, f"file:{path.name}", tokenizer_name


@dataclass
class CheckpointContents:
    """What :func:`read_state_dict` found in a weights file.

    Attributes
    ----------
    state: parameter name -> tensor (``module.`` prefixes and OpenAI extras removed).
    config: an embedded open_clip config (``{"model_cfg": ..., "preprocess_cfg": ...}``) or None.
    is_torchscript: the file is a TorchScript archive (the OpenAI format).
    optional: names that may be left unused (buffers of a TorchScript archive, such as
        its attention mask).
    """

    state: dict[str, torch.Tensor]
    config: Optional[dict[str, Any]] = None
    is_torchscript: bool = False
    optional: frozenset[str] = frozenset()


def read_state_dict(path: Path) -> CheckpointContents:
    """Read the tensors of a checkpoint file without executing any pickled code."""
    config = None
    is_torchscript_file = False
    optional: frozenset[str] = frozenset()
    path = regular_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                state = {k: handle.get_tensor(k) for k in handle.keys()}
            if "open_clip_config" in meta:
                config = json_loads(meta["open_clip_config"], path)
        elif _is_torchscript(path):
            # never torch.jit.load: that compiles and runs the archive's code
            is_torchscript_file = True
            state, optional = read_torchscript(path)
        else:
            check_torch_file(path)
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, Mapping):
                raise BicmError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
            state = dict(loaded)
    except BicmError:
        raise
    except Exception as exc:  # corrupt zip, foreign pickle, bad header, ...
        raise BicmError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise BicmError(f"checkpoint {path} contains no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return CheckpointContents(state, config, is_torchscript_file, optional)


def _load_failure(exc: Exception) -> str:
    """Why torch.load refused, in bicm's words (torch's own message advises weights_only=False,
    which would run the file's code)."""
    import pickle
    import re

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text.lower():
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|but got <class ')([\w.]+)", text)
        what = f"it asks for {found.group(1)}" if found else "it holds objects other than tensors and plain containers"
        return (
            f"refusing its pickle: {what}, which model weights never need (nothing from the file was run). "
            "If you trust the file, convert it to safetensors where it came from"
        )
    detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return detail[:200]


def _read_sidecar_config(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        config = json_loads(path.read_text(encoding="utf-8"), path)
    except (OSError, json.JSONDecodeError) as exc:
        raise BicmError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise BicmError(f"{path} has no 'model_cfg' entry")
    return config


def _find_weights_in_dir(folder: Path) -> Optional[Path]:
    preferred = [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    return found[0] if found else None


def infer_model_cfg(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Infer an open_clip ``model_cfg`` from the tensor shapes of a standard CLIP state dict.

    Follows OpenAI's conventions (64-wide attention heads), which every OpenAI and the
    standard open_clip CLIP architectures share. Models with other head widths need a config
    (``model=`` or an embedded/sidecar ``open_clip_config``).
    """
    try:
        if "visual.proj" in state:  # ViT
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
            vision_cfg: dict[str, Any] = dict(
                layers=layers, width=width, patch_size=patch, image_size=patch * grid, mlp_ratio=mlp
            )
        elif "visual.attnpool.positional_embedding" in state:  # ModifiedResNet
            counts = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            out = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_cfg = dict(layers=counts, width=width, image_size=out * 32)
        else:
            raise KeyError("visual.proj")
        text_width = state["ln_final.weight"].shape[0]
        text_cfg = dict(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // 64,
            layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        )
        embed_dim = state["text_projection"].shape[1]
    except KeyError as exc:
        raise BicmError(
            f"cannot infer the architecture of {path} (missing {exc}); pass --model ARCH "
            "or put an open_clip_config.json beside it"
        ) from None
    return {"embed_dim": int(embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _load_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, optional: frozenset[str] = frozenset()
) -> None:
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k not in optional}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if "logit_scale" in wrong and state["logit_scale"].numel() == own["logit_scale"].numel():
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
        wrong.remove("logit_scale")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise BicmError(f"checkpoint {path.name} does not fit the architecture: " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    model: torch.nn.Module,
    path: Union[str, Path],
    model_cfg: Mapping[str, Any],
    preprocess: Optional[PreprocessSpec] = None,
) -> Path:
    """Save an open_clip model as safetensors that carries its own config (atomic write).

    The file loads with ``load_backbone(checkpoint=path)`` and with open_clip itself
    (``open_clip.create_model(..., pretrained=path)`` given the same architecture).
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = {"model_cfg": dict(model_cfg)}
    if preprocess is not None:
        config["preprocess_cfg"] = preprocess.to_open_clip()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        # one metadata entry: safetensors writes its metadata map in no fixed order, and a single
        # entry keeps the file byte-identical from run to run
        save_file(tensors, str(tmp), metadata={"open_clip_config": json.dumps(config)})
    return path
