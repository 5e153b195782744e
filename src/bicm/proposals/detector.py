"""torchvision Faster R-CNN proposals with COCO class names.

Weights come through torchvision's own weights API: with internet they download (and are
cached) automatically; offline, pass the same ``.pth`` file with ``checkpoint=`` (CLI
``--detector-checkpoint``). torchvision's heads already apply a score floor, per-class NMS and
a cap; bicm sets them to ``score_floor``, ``nms_iou`` and ``top_n`` (default 100, as the paper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from PIL import Image

from ..devices import resolve_device
from ..errors import BicmError
from ..safeload import read_torch_file, regular_file
from . import Proposals
from .rcnn import steady_rcnn
from .sources import ProposalSource, register_source

__all__ = ["FasterRCNN", "DETECTOR_ARCHS"]

DETECTOR_ARCHS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)


def _builder(arch: str) -> tuple[Any, Any]:
    from torchvision.models import detection

    if arch not in DETECTOR_ARCHS:
        raise BicmError(f"unknown detector {arch!r}; use one of {', '.join(DETECTOR_ARCHS)}")
    weights_name = {
        "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights",
        "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
        "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
        "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
    }[arch]
    return getattr(detection, arch), getattr(detection, weights_name).DEFAULT


@register_source("faster-rcnn")
class FasterRCNN(ProposalSource):
    """COCO Faster R-CNN detections as named proposals.

    Parameters
    ----------
    arch: one of :data:`DETECTOR_ARCHS`.
    checkpoint: a local weights file (torchvision state dict) instead of the download.
    top_n: at most this many detections per image.
    score_floor: drop detections scoring below this.
    nms_iou: torchvision's per-class NMS threshold.
    device: ``"auto"``, ``"cpu"``, ``"cuda"``.
    """

    def __init__(
        self,
        arch: str = "fasterrcnn_resnet50_fpn_v2",
        checkpoint: Union[str, Path, None] = None,
        top_n: int = 100,
        score_floor: float = 0.05,
        nms_iou: float = 0.5,
        device: str = "auto",
    ) -> None:
        super().__init__()
        builder, weights = _builder(arch)
        self.arch, self.top_n, self.score_floor = arch, int(top_n), float(score_floor)
        self.device = resolve_device(device)
        self.categories: list[str] = list(weights.meta["categories"])
        heads = dict(box_score_thresh=self.score_floor, box_detections_per_img=self.top_n, box_nms_thresh=nms_iou)
        if checkpoint is not None:
            path = Path(checkpoint)
            regular_file(path, "detector checkpoint", missing=f"detector checkpoint not found: {path}")
            model = builder(weights=None, weights_backbone=None, num_classes=len(self.categories), **heads)
            try:
                # bicm's capped reader: torch's own weights_only allow-list can build gigabytes from a few bytes
                state = read_torch_file(path, "detector checkpoint")
                if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                    state = state["model"]
                model.load_state_dict(state)
            except BicmError as exc:
                text = str(exc)
                if text.startswith("cannot read"):  # unreadable, not refused: say which file it was meant to be
                    raise BicmError(f"cannot load detector checkpoint {path}: {text.split(': ', 1)[-1]}") from None
                raise
            except Exception as exc:
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise BicmError(f"cannot load detector checkpoint {path} into {arch}: {detail}") from None
            self.weights_id = f"file:{path.name}"
        else:
            try:
                model = builder(weights=weights, **heads)
            except Exception as exc:  # URLError, HTTPError, hash mismatch, ...
                raise BicmError(
                    f"could not download torchvision's {arch} weights ({type(exc).__name__}; offline?); "
                    f"fetch {weights.url} where there is internet and pass it with --detector-checkpoint PATH"
                ) from None
            self.weights_id = str(weights)
        self.model = steady_rcnn(model.eval().requires_grad_(False).to(self.device))  # no image decides the next one's

    @property
    def id(self) -> str:
        return f"faster-rcnn(arch={self.arch},weights={self.weights_id},top_n={self.top_n},score_floor={self.score_floor:g})"

    @torch.inference_mode()
    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        import torchvision.transforms.functional as TF

        pixels = TF.pil_to_tensor(image).float().div_(255.0).to(self.device)
        out = self.model([pixels])[0]
        boxes = out["boxes"].float().cpu()
        scores = out["scores"].float().cpu()
        names = [self._name(int(label)) for label in out["labels"].tolist()]
        return Proposals(boxes, scores=scores, class_names=names, source=self.id)

    def _name(self, label: int) -> Optional[str]:
        if 0 < label < len(self.categories):
            name = self.categories[label]
            return None if name in ("N/A", "__background__") else name
        return None
