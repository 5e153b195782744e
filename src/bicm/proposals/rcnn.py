"""What bicm sets on torchvision's R-CNN detectors: no image changes the next one, and no
image shape breaks them (:func:`steady_rcnn`).

torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` (the box head's pooler of every
Faster R-CNN) works out the scale of each feature level on its *first* call, from the first
image's size and feature map sizes, and keeps it for the life of the model
(``pooler.scales``, ``pooler.map_levels``; ``_infer_scale`` reads only the height). After a
first image whose resized height is a pixel or two (a 3000x8 image goes to 384x1), the
stride-4 level is taken for scale 8 instead of 1/4 and every later image's RoIs are pooled
from the wrong place: garbage boxes, all with one score, and no error.

:func:`pin_roi_scales` fixes the scales once, when the model is built, from the backbone
itself (one forward of a blank square image whose side is a multiple of every stride), so
they are the backbone's true strides whatever the images and their order. For a normal
image they are exactly what torchvision would have inferred: predictions do not change.

torchvision's resize (``GeneralizedRCNNTransform``) scales both sides by one factor and
floors them, so a side that is thin next to the other (1x10000, or 1x400 with the shapes
detector's 288/384 sizes) becomes 0 pixels and ``interpolate`` raises. :func:`clamp_resize`
keeps every side at least 1 pixel there; other images go through torchvision's own code.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["steady_rcnn", "pin_roi_scales", "clamp_resize"]

#: side of the blank image whose feature maps give the strides (a multiple of 2**8)
_PROBE_SIDE = 256


def steady_rcnn(model: nn.Module) -> nn.Module:
    """:func:`pin_roi_scales` and :func:`clamp_resize` on a torchvision ``GeneralizedRCNN``
    (call it when the model is built, before any image). Returns ``model``."""
    return clamp_resize(pin_roi_scales(model))


def pin_roi_scales(model: nn.Module) -> nn.Module:
    """Set the RoI pooler's level scales of a torchvision ``GeneralizedRCNN`` from its backbone.

    Works for any backbone (ResNet and MobileNet FPNs, bicm's shapes backbone): the levels'
    sizes on a ``256 x 256`` blank input give their strides. No weights, buffers or random
    state change (eval mode, no grad). Returns ``model``.
    """
    from torchvision.ops.poolers import MultiScaleRoIAlign, _setup_scales

    pooler = getattr(getattr(model, "roi_heads", None), "box_roi_pool", None)
    if not isinstance(pooler, MultiScaleRoIAlign):
        return model
    param = next(model.backbone.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.backbone(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    if any(name not in features for name in pooler.featmap_names):
        return model  # a backbone the pooler does not fit as built: left to torchvision's own first-call setup
    levels = [features[name] for name in pooler.featmap_names]
    pooler.scales, pooler.map_levels = _setup_scales(levels, [(_PROBE_SIDE, _PROBE_SIDE)], pooler.canonical_scale, pooler.canonical_level)
    return model


def clamp_resize(model: nn.Module) -> nn.Module:
    """Make the model's input resize keep every side at least 1 pixel. Returns ``model``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform) and not isinstance(transform, _ClampedTransform):
        transform.__class__ = _ClampedTransform  # the same module and settings, one method more careful
    return model


def _resized_sides(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """torchvision's resized ``(height, width)``: one factor, sides floored (as ``interpolate``
    with ``recompute_scale_factor``)."""
    import math

    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def _make_clamped() -> type:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    class ClampedTransform(GeneralizedRCNNTransform):
        """torchvision's transform whose resize never makes a side 0 pixels."""

        def resize(self, image, target=None):  # type: ignore[no-untyped-def]
            h, w = image.shape[-2:]
            if not self.training and self.fixed_size is None:  # training draws its size at random: left alone
                out_h, out_w = _resized_sides(int(h), int(w), float(self.min_size[-1]), float(self.max_size))
                if out_h < 1 or out_w < 1:  # torchvision would ask interpolate for an empty image
                    out = (max(1, out_h), max(1, out_w))
                    image = torch.nn.functional.interpolate(image[None], size=out, mode="bilinear", align_corners=False)[0]
                    if target is not None and "boxes" in target:
                        target["boxes"] = resize_boxes(target["boxes"], (h, w), out)
                    return image, target
            return super().resize(image, target)

    return ClampedTransform


_ClampedTransform = _make_clamped()
