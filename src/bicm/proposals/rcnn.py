"""What bicm sets on torchvision's R-CNN detectors so that no image changes the next one.

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
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pin_roi_scales"]

#: side of the blank image whose feature maps give the strides (a multiple of 2**8)
_PROBE_SIDE = 256


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
    levels = [features[name] for name in pooler.featmap_names]
    pooler.scales, pooler.map_levels = _setup_scales(levels, [(_PROBE_SIDE, _PROBE_SIDE)], pooler.canonical_scale, pooler.canonical_level)
    return model
