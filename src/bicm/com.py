"""COM: cross-modal object matching (paper Sec. 3.3, Eqs. 6-8).

* ``S_PQ[q, r] = cos(fp_r, f_q)`` (Eq. 6): CLIP embedding of the crop of proposal ``r``
  against the query. Crops are taken once per image and encoded in batches.
* ``S_CQ[q, r] = cos(fc_r, f_q)`` (Eq. 7): CLIP text embedding of the proposal's class name
  (optionally through a prompt template such as ``"a photo of a {}."``).
* ``S_BU = S_PQ + S_CQ`` (Eq. 8). Table 6's variants use one term alone
  (``mode="class"`` or ``"visual"``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, Optional, Sequence

import torch
from PIL import Image

from .backbone import Backbone
from .errors import BicmError
from .preprocess import PreprocessSpec, preprocess_many

__all__ = ["ComMode", "crop", "crop_pixels", "encode_crops", "ClassNameEncoder", "bottom_up"]

ComMode = Literal["both", "class", "visual"]


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


class ClassNameEncoder:
    """Text embeddings of class names through a prompt template, cached by name.

    Parameters
    ----------
    template: a format string with one ``{}``, e.g. ``"{}"`` (the paper: the bare name)
        or ``"a photo of a {}."``.
    encode_text: how texts become embeddings (default: the backbone; a cached encoder
        can be passed).
    """

    def __init__(
        self,
        backbone: Backbone,
        template: str = "{}",
        encode_text: Optional[Callable[[list[str]], torch.Tensor]] = None,
    ) -> None:
        if template.count("{}") != 1:
            raise BicmError(f"class prompt template must contain exactly one {{}}, got {template!r}")
        self.backbone = backbone
        self.template = template
        self.encode_text = encode_text or backbone.encode_text
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """``(N, E)`` L2-normalised embeddings of ``names``."""
        missing = sorted({n for n in names if n not in self._cache})
        if missing:
            feats = self.encode_text([self.template.format(n) for n in missing])
            self._cache.update(zip(missing, feats))
        if not names:
            return torch.zeros(0, self.backbone.embed_dim, device=self.backbone.device)
        return torch.stack([self._cache[n] for n in names])


def bottom_up(s_pq: Optional[torch.Tensor], s_cq: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``S_BU = S_PQ + S_CQ`` (Eq. 8) over whichever terms are present; shapes ``(Q, K)``."""
    terms = [s for s in (s_pq, s_cq) if s is not None]
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
