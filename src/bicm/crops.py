"""Box crops as CLIP inputs: cut each box out of the image, resize it with the model's
preprocessing, and encode the crops in batches (the inputs of COM's ``S_PQ``, Eq. 6, and of
KAM's ``fp``).

A box (float xyxy pixels) is rounded outward to whole pixels and kept at least 1x1 pixel.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
from PIL import Image

from .backbone import Backbone
from .preprocess import PreprocessSpec, preprocess_many

__all__ = ["crop", "crop_pixels", "encode_crops"]


def crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of ``box`` (xyxy floats; outward-rounded to whole pixels, at least 1x1)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(0, math.floor(x1)), image.width - 1)
    top = min(max(0, math.floor(y1)), image.height - 1)
    right = max(left + 1, min(image.width, math.ceil(x2)))
    bottom = max(top + 1, min(image.height, math.ceil(y2)))
    return image.crop((left, top, right, bottom))


def crop_pixels(image: Image.Image, boxes: Sequence[Sequence[float]], spec: PreprocessSpec) -> torch.Tensor:
    """The model inputs of box crops: ``(N, 3, H_in, W_in)`` float32, open_clip's eval
    transform of each crop, normalised in one step."""
    return preprocess_many([crop(image, box) for box in boxes], spec)


def encode_crops(
    backbone: Backbone,
    image: Image.Image,
    boxes: torch.Tensor,
    spec: Optional[PreprocessSpec] = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """CLIP embeddings of box crops.

    Crops are cut and resized in batches of ``batch_size``; the next batch is prepared on a
    worker thread while the current one is encoded (Pillow and torch both release the GIL).

    Parameters
    ----------
    boxes: ``(N, 4)`` xyxy in pixels of ``image``.
    spec: preprocessing of the crops (default: the backbone's).

    Returns
    -------
    ``(N, E)`` L2-normalised float32.
    """
    spec = spec or backbone.spec
    if boxes.shape[0] == 0:
        return torch.zeros(0, backbone.embed_dim, device=backbone.device)
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
