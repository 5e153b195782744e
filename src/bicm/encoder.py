"""Text, crop and proposal computations routed through the optional feature cache."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from PIL import Image

from .backbone import Backbone
from .cache import CacheKey, FeatureCache, MemoryFeatureCache
from .crops import encode_crop_pixels, encode_crops, resolve_crop_backend
from .imageio import image_digest
from .preprocess import PreprocessSpec, preprocess
from .proposals import Proposals
from .proposals.sources import ProposalSource

__all__ = ["Encoder"]


def _spec_key(spec: PreprocessSpec) -> str:
    return f"{spec.size[0]}x{spec.size[1]},{spec.resize_mode},{spec.interpolation},{spec.fill},{spec.mean},{spec.std}"


class Encoder:
    """What the pipeline encodes, with a feature cache when given.

    Without a cache every call computes; with one (a :class:`~bicm.cache.FeatureCache` or a
    :class:`~bicm.cache.MemoryFeatureCache`), results are looked up by
    :class:`~bicm.cache.CacheKey` first and the missing ones computed in a batch and stored.
    """

    def __init__(self, backbone: Backbone, cache: Union[FeatureCache, MemoryFeatureCache, None] = None) -> None:
        self.backbone = backbone
        self.cache = cache

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, E)`` L2-normalised text embeddings."""
        texts = list(texts)
        if self.cache is None or not texts:
            return self.backbone.encode_text(texts)
        model = self.backbone.fingerprint()
        keys = [CacheKey("text", model, None, t) for t in texts]
        found = self.cache.get_many(keys)
        missing = sorted({t for t, k in zip(texts, keys) if k not in found})
        if missing:
            feats = self.backbone.encode_text(missing)
            new = {CacheKey("text", model, None, t): ({"f": f}, {}) for t, f in zip(missing, feats)}
            self.cache.put_many(new)
            found.update(new)
        return torch.stack([found[k][0]["f"] for k in keys]).to(self.backbone.device)

    def crops(
        self,
        image: Image.Image,
        boxes: torch.Tensor,
        spec: PreprocessSpec,
        batch_size: int = 64,
        digest: Optional[str] = None,
        backend: str = "pil",
        pixels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(N, E)`` L2-normalised crop embeddings of ``(N, 4)`` xyxy boxes.

        ``backend`` cuts and resizes the crops (:mod:`bicm.crops`; part of the cache key when
        it is not ``"pil"``, so caches written before it existed stay valid). ``pixels``: the
        crops already cut by :func:`~bicm.crops.crop_uint8` (``(N, 3, H, W)`` uint8, the same
        backend), e.g. prepared ahead by :mod:`bicm.prefetch`.
        """
        backend = resolve_crop_backend(backend, self.backbone.device)

        def encode(index: Optional[list[int]]) -> torch.Tensor:
            if pixels is not None:
                return encode_crop_pixels(self.backbone, pixels if index is None else pixels[index], spec, batch_size)
            return encode_crops(self.backbone, image, boxes if index is None else boxes[index], spec, batch_size, backend)

        if self.cache is None or boxes.shape[0] == 0:
            return encode(None)
        digest = digest or image_digest(image)
        model = f"{self.backbone.fingerprint()} {_spec_key(spec)}" + ("" if backend == "pil" else f",crops={backend}")
        keys = [CacheKey("crop", model, digest, ",".join(f"{v:.2f}" for v in box)) for box in boxes.tolist()]
        found = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            feats = encode(todo)
            new = {keys[i]: ({"f": f}, {}) for i, f in zip(todo, feats)}
            self.cache.put_many(new)
            found.update(new)
        return torch.stack([found[k][0]["f"] for k in keys]).to(self.backbone.device)

    def image(self, image: Image.Image, spec: PreprocessSpec, digest: Optional[str] = None) -> torch.Tensor:
        """``(E,)`` L2-normalised whole-image embedding under ``spec``."""
        if self.cache is None:
            return self.backbone.encode_pixels(preprocess(image, spec)[0][None])[0]
        digest = digest or image_digest(image)
        key = CacheKey("image", f"{self.backbone.fingerprint()} {_spec_key(spec)}", digest)
        hit = self.cache.get_many([key]).get(key)
        if hit is None:
            feat = self.backbone.encode_pixels(preprocess(image, spec)[0][None])[0]
            self.cache.put_many({key: ({"f": feat}, {})})
            return feat
        return hit[0]["f"].to(self.backbone.device)

    def proposals(self, source: ProposalSource, image: Image.Image, key: Optional[str], digest: Optional[str] = None) -> Proposals:
        """``source``'s proposals of ``image``."""
        digest = digest or image_digest(image)
        if self.cache is None:
            return source(image, key, digest)
        cache_key = CacheKey("props", source.id, digest)
        hit = self.cache.get_many([cache_key]).get(cache_key)
        if hit is not None:
            tensors, meta = hit
            return Proposals(
                tensors["boxes"],
                tensors.get("scores"),
                meta.get("class_names"),
                meta["source"],
                dict(meta.get("meta", {})),
                tensors.get("name_scores"),
            )
        found = source(image, key, digest)
        tensors = {"boxes": found.boxes}
        if found.scores is not None:
            tensors["scores"] = found.scores
        if found.name_scores is not None:
            tensors["name_scores"] = found.name_scores
        meta = {"class_names": found.class_names, "source": found.source, "meta": found.meta}
        self.cache.put_many({cache_key: (tensors, meta)})
        return found
