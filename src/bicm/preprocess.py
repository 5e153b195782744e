"""Preprocessing geometry: open_clip's eval transform, and where the original pixels go.

:func:`preprocess` reproduces open_clip's eval transform exactly (resize by the shortest
side + center crop, ``squash`` or ``longest`` + pad, bicubic, CLIP mean/std) and also returns
the :class:`Geometry` that maps original pixels to the model's input grid. QAM needs it to put
its patch map back on the right pixels of the original image.

Holds :class:`PreprocessSpec` (the transform as data, read from and written to open_clip's
``preprocess_cfg``), :class:`Geometry`, :func:`geometry_for`, :func:`preprocess` and
:func:`preprocess_many`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import BicmError

__all__ = ["Geometry", "PreprocessSpec", "fit_many", "geometry_for", "normalise_pixels", "preprocess", "preprocess_many"]

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


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
    return _normalise(fit_many(images, spec), spec)


def fit_many(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """The resized and cropped/padded pixels of many RGB images, before normalisation.

    Returns
    -------
    ``(N, H_in, W_in, 3)`` uint8.
    """
    ih, iw = spec.size
    batch = np.empty((len(images), ih, iw, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(_fit(image, spec)[0], dtype=np.uint8)
    return batch


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
    return normalise_pixels(torch.from_numpy(batch).permute(0, 3, 1, 2), spec)


def normalise_pixels(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``(N, 3, H, W)`` pixel values 0-255 (uint8 or float) -> ``(N, 3, H, W)`` float32 with
    CLIP's mean/std, on ``pixels``' device."""
    pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.div_(255.0).sub_(mean).div_(std)
