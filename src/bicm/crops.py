"""Box crops as CLIP inputs: cut each box out of the image, resize it with the model's
preprocessing, and encode the crops in batches (the inputs of COM's ``S_PQ``, Eq. 6, and of
KAM's ``fp``).

A box (float xyxy pixels) is rounded outward to whole pixels and kept at least 1x1 pixel
(:func:`crop_window`). Two backends cut and resize the crops:

* ``"pil"``: each crop through Pillow (open_clip's eval transform, exactly), on the host;
* ``"tensor"``: the image uploaded once to the model's device, every crop resized there by two
  matrix products with Pillow's own resampling taps (:func:`resample_taps`: the same sampling
  positions, filter and support, the 8-bit rounding after each pass), so the crops hold the
  same pixels and their values differ from Pillow's by at most a level or two (Pillow rounds
  its 22-bit fixed-point taps; ``benchmarks/README.md`` has the measured differences).

``"auto"`` (:func:`resolve_crop_backend`) picks ``"tensor"`` on CUDA and ``"pil"`` on a CPU.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone
from .errors import BicmError
from .preprocess import PreprocessSpec, fit_many, geometry_for, normalise_pixels

__all__ = [
    "CROP_BACKENDS",
    "crop",
    "crop_window",
    "crop_pixels",
    "crop_uint8",
    "encode_crops",
    "encode_crop_pixels",
    "image_tensor",
    "resample_taps",
    "resolve_crop_backend",
    "tensor_crops",
]

#: The crop backends a caller may name (``"auto"`` is resolved per device).
CROP_BACKENDS = ("pil", "tensor")


def resolve_crop_backend(backend: str, device: torch.device) -> str:
    """``"pil"`` or ``"tensor"`` for ``backend`` on ``device``.

    ``"auto"``: ``"tensor"`` on CUDA (the crops are cut where the model runs, no host work and
    no upload of 100 x 224 x 224 crops per image), ``"pil"`` on a CPU, where Pillow's uint8
    resampling measured faster than the fp32 matrix products on the shared cores
    (``benchmarks/README.md``).
    """
    if backend == "auto":
        return "tensor" if device.type == "cuda" else "pil"
    if backend not in CROP_BACKENDS:
        raise BicmError(f"unknown crop backend {backend!r}; use pil, tensor or auto")
    return backend


def crop_window(width: int, height: int, box: Sequence[float]) -> tuple[int, int, int, int]:
    """The whole pixels ``(left, top, right, bottom)`` of ``box`` (xyxy floats) in a
    ``width`` x ``height`` image: rounded outward, inside the image, at least 1x1."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(0, math.floor(x1)), width - 1)
    top = min(max(0, math.floor(y1)), height - 1)
    right = max(left + 1, min(width, math.ceil(x2)))
    bottom = max(top + 1, min(height, math.ceil(y2)))
    return left, top, right, bottom


def crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of ``box`` (xyxy floats; outward-rounded to whole pixels, at least 1x1)."""
    return image.crop(crop_window(image.width, image.height, box))


def crop_pixels(image: Image.Image, boxes: Sequence[Sequence[float]], spec: PreprocessSpec) -> torch.Tensor:
    """The model inputs of box crops: ``(N, 3, H_in, W_in)`` float32, open_clip's eval
    transform of each crop, normalised in one step."""
    return normalise_pixels(crop_uint8(image, boxes, spec), spec)


def crop_uint8(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    spec: PreprocessSpec,
    backend: str = "pil",
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Box crops cut and resized, before normalisation: ``(N, 3, H_in, W_in)`` uint8.

    ``backend`` ``"pil"`` works on the host (a CPU tensor); ``"tensor"`` on ``device``
    (default: the CPU). A quarter of the float32 inputs' memory, which is why work prepared
    ahead (:mod:`bicm.prefetch`) holds crops in this form.
    """
    if backend == "tensor":
        return tensor_crops(image_tensor(image, device or torch.device("cpu")), boxes, spec)
    if backend != "pil":
        raise BicmError(f"unknown crop backend {backend!r}; use pil or tensor")
    batch = fit_many([crop(image, box) for box in boxes], spec)  # (N, H, W, 3)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def image_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An RGB image on ``device`` as ``(3, H, W)`` float32 pixel values 0-255 (uploaded as
    uint8, converted there)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).to(device, non_blocking=True).permute(2, 0, 1).float()


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic filter (a = -0.5), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bilinear filter, support 1."""
    return (1.0 - x.abs()).clamp(min=0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


def resample_taps(in_size: int, out_size: int, positions: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Pillow's resampling weights as a matrix.

    Output pixel ``r`` (of ``out_size``) of a resize from ``in_size`` pixels takes
    ``sum_j W[r, j] * in[j]``, with Pillow's taps (``ImagingResample``: center
    ``(r + 0.5) * in/out``, the filter stretched by the scale when reducing, the taps cut at
    the support and normalised to sum 1).

    Parameters
    ----------
    positions: ``(P,)`` int64 output indices; those outside ``[0, out_size)`` get zero rows
        (padding).

    Returns
    -------
    ``(P, in_size)`` float32 on ``positions``' device.
    """
    kernel, support = _FILTERS[interpolation]
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = support * stretch
    centers = (positions.to(torch.float64) + 0.5) * scale  # (P,)
    lo = torch.trunc(centers - support + 0.5).clamp(min=0)
    hi = torch.trunc(centers + support + 0.5).clamp(max=in_size)
    j = torch.arange(in_size, device=positions.device, dtype=torch.float64)
    weights = kernel((j[None, :] - centers[:, None] + 0.5) / stretch)
    weights = weights * ((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]))
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total != 0, weights / torch.where(total != 0, total, torch.ones_like(total)), weights)
    inside = (positions >= 0) & (positions < out_size)
    return (weights * inside[:, None]).to(torch.float32)


def tensor_crops(image: torch.Tensor, boxes: Sequence[Sequence[float]], spec: PreprocessSpec) -> torch.Tensor:
    """Box crops cut and resized on ``image``'s device, in Pillow's geometry.

    Each box is cut as :func:`crop_window`, then resized and center-cropped / squashed /
    padded as :func:`bicm.preprocess.preprocess` would (:func:`~bicm.preprocess.geometry_for`
    of the crop's size): a horizontal pass ``crop @ Wx^T`` and a vertical pass ``Wy @ .`` (in
    Pillow's order: a reducing vertical pass before an enlarging horizontal one), each rounded to 8 bits
    as Pillow does, with only the output rows and columns the model sees
    computed (an extreme aspect ratio costs no more than the visible part).

    Parameters
    ----------
    image: ``(3, H, W)`` float32 pixel values 0-255 (:func:`image_tensor`).
    boxes: ``N`` xyxy boxes in pixels of ``image``.

    Returns
    -------
    ``(N, 3, H_in, W_in)`` uint8 on ``image``'s device.
    """
    _, height, width = image.shape
    ih, iw = spec.size
    out = torch.empty(len(boxes), 3, ih, iw, dtype=torch.uint8, device=image.device)
    rows = torch.arange(ih, device=image.device)
    cols = torch.arange(iw, device=image.device)
    for n, box in enumerate(boxes):
        left, top, right, bottom = crop_window(width, height, box)
        h, w = bottom - top, right - left
        g = geometry_for(w, h, spec)
        ys, xs = rows + g.top, cols + g.left  # positions on the resized crop
        piece = image[:, top:bottom, left:right]  # (3, h, w)
        wx = wy = None
        if g.resized_width != w or (g.left, iw) != (0, w):
            wx = resample_taps(w, g.resized_width, xs, spec.interpolation)  # (iw, w)
        if g.resized_height != h or (g.top, ih) != (0, h):
            wy = resample_taps(h, g.resized_height, ys, spec.interpolation)  # (ih, h)
        # Pillow 13 reduces before it enlarges: the vertical pass first when only it reduces (when
        # both reduce its order was not pinned down: "longest" crops of noise then differ by up
        # to ~22 levels on 0.03% of pixels)
        vertical_first = wx is not None and wy is not None and g.resized_height < h and g.resized_width >= w
        for taps, horizontal in ((wy, False), (wx, True)) if vertical_first else ((wx, True), (wy, False)):
            if taps is not None:
                piece = torch.matmul(piece, taps.T) if horizontal else torch.matmul(taps, piece)
                piece = piece.add_(0.5).floor_().clamp_(0, 255)  # 8 bits after each pass, as Pillow
        crop_out = out[n]
        crop_out.copy_(piece.to(torch.uint8))
        pad_y = (ys < 0) | (ys >= g.resized_height)
        pad_x = (xs < 0) | (xs >= g.resized_width)
        if bool(pad_y.any()) or bool(pad_x.any()):
            crop_out[:, pad_y, :] = spec.fill
            crop_out[:, :, pad_x] = spec.fill
    return out


def encode_crop_pixels(backbone: Backbone, pixels: torch.Tensor, spec: PreprocessSpec, batch_size: int = 64) -> torch.Tensor:
    """CLIP embeddings of crops prepared by :func:`crop_uint8`: ``(N, 3, H, W)`` uint8 ->
    ``(N, E)`` L2-normalised, normalised and encoded ``batch_size`` at a time (the same batches,
    hence the same values, as :func:`encode_crops`)."""
    if pixels.shape[0] == 0:
        return torch.zeros(0, backbone.embed_dim, device=backbone.device)
    out = [
        backbone.encode_pixels(normalise_pixels(pixels[start : start + batch_size], spec), batch_size)
        for start in range(0, pixels.shape[0], batch_size)
    ]
    return torch.cat(out)


def encode_crops(
    backbone: Backbone,
    image: Image.Image,
    boxes: torch.Tensor,
    spec: Optional[PreprocessSpec] = None,
    batch_size: int = 64,
    backend: str = "pil",
) -> torch.Tensor:
    """CLIP embeddings of box crops.

    ``backend="pil"``: crops are cut and resized in batches of ``batch_size``; the next batch
    is prepared on a worker thread while the current one is encoded (Pillow and torch both
    release the GIL). ``"tensor"``: all crops are cut on the backbone's device, then encoded
    (``"auto"``: :func:`resolve_crop_backend`).

    Parameters
    ----------
    boxes: ``(N, 4)`` xyxy in pixels of ``image``.
    spec: preprocessing of the crops (default: the backbone's).

    Returns
    -------
    ``(N, E)`` L2-normalised float32.
    """
    spec = spec or backbone.spec
    backend = resolve_crop_backend(backend, backbone.device)
    if boxes.shape[0] == 0:
        return torch.zeros(0, backbone.embed_dim, device=backbone.device)
    if backend == "tensor":
        return encode_crop_pixels(backbone, crop_uint8(image, boxes.tolist(), spec, "tensor", backbone.device), spec, batch_size)
    chunks = [boxes[start : start + batch_size].tolist() for start in range(0, boxes.shape[0], batch_size)]
    if len(chunks) == 1:
        return backbone.encode_pixels(crop_pixels(image, chunks[0], spec), batch_size)
    out = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bicm-crops") as pool:
        pending = pool.submit(crop_pixels, image, chunks[0], spec)
        for following in chunks[1:] + [None]:
            pixels = pending.result()
            if following is not None:
                pending = pool.submit(crop_pixels, image, following, spec)
            out.append(backbone.encode_pixels(pixels, batch_size))
    return torch.cat(out)
