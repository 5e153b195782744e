"""`bicm train-detector`: a small Faster R-CNN trained from scratch on the shapes world.

The paper grounds on 100 proposals named by a Faster R-CNN pretrained for detection. No
pretrained detector can be downloaded here, so bicm trains its own on the *detection* data
of the shapes world: the object boxes and category names of the train scenes of both
protocols (``train_objects.jsonl``; never the referring expressions). The model is a stock
torchvision :class:`~torchvision.models.detection.FasterRCNN` on a small backbone of its
own (four strided conv stages with GroupNorm, batches being small, under a
:class:`~torchvision.ops.FeaturePyramidNetwork`), with a small two-layer MLP box head; the
classes are background + :data:`bicm.shapes.world.SHAPES`.

Boxes everywhere are float ``xyxy`` in pixels of the original image, ``x2``/``y2`` exclusive
(a box ``[0, 0, 10, 10]`` covers 10x10 pixels), the convention of :mod:`bicm.proposals`.

The weights are stored as float16 safetensors carrying their :class:`DetectorConfig` as JSON
metadata, so a file describes itself and loading never unpickles. Training is seeded and
resumable exactly like :func:`bicm.shapes.train.train_clip` (Ctrl-C keeps the state; the same
call continues to the same weights). The proposal source ``shapes-detector``
(:class:`ShapesDetectorSource`) serves a trained file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..errors import BicmError
from ..jsonl import read_records
from ..safeload import json_loads, regular_file
from ..interrupt import Interrupted, TrainingState, deferred, load_state, state_path
from ..provenance import versions
from ..proposals import Proposals
from ..proposals.rcnn import steady_rcnn
from ..proposals.sources import ProposalSource, register_source
from .world import SHAPES, WORLD_VERSION

__all__ = [
    "DetectorConfig",
    "DETECTOR_WEIGHTS",
    "build_detector",
    "train_detector",
    "save_detector",
    "load_detector",
    "detector_weights",
    "detect",
    "detector_metrics",
    "average_precision",
    "ShapesDetectorSource",
]

#: file name of the shipped detector inside ``bicm/shapes/model``
DETECTOR_WEIGHTS = "shapes-detector.safetensors"
#: class index -> name (0 is the background)
CLASSES: tuple[str, ...] = ("__background__", *SHAPES)
_METADATA_KEY = "bicm_shapes_detector"
_FILE_FORMAT = "bicm-shapes-detector-1"
_STATE_FORMAT = "bicm-train-detector-state-1"


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that decides the trained weights.

    Attributes
    ----------
    seed: seed of the initialisation, the data order, the flips and the RoI sampling.
    steps, batch_size: optimisation steps and images per step.
    optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9); linear warm-up over ``warmup`` steps
        to ``lr``, then cosine decay to zero.
    train_images: images used from each protocol's train split (the first ones of
        ``train_objects.jsonl``; the full world has 3,000 per protocol).
    hflip: flip half of the training images horizontally (boxes follow).
    widths: channels of the stem and of the four stages (strides 2; 4, 8, 16, 32).
    fpn_channels: channels of the feature pyramid (levels at strides 4-32, plus a max-pooled
        level at 64).
    representation: width of the two-layer MLP box head (RoIAlign 7x7 in).
    min_size, max_size: torchvision's resize: the short side to ``min_size`` unless the long
        side would exceed ``max_size`` (the world's images are 320-400 px on the long side).
    anchor_sizes: one anchor size (pixels, after the resize) per pyramid level.
    aspect_ratios: anchor height/width ratios on every level.
    rpn_*: the region proposal network's sampling and its NMS'd proposal counts (per image;
        ``pre_nms`` per level).
    roi_batch: RoIs sampled per image for the box head (25 % positive).
    """

    seed: int = 0
    steps: int = 4000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    optimizer: str = "adamw"
    grad_clip: float = 10.0
    threads: int = 2
    train_images: int = 3000
    hflip: bool = True
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    fpn_channels: int = 64
    representation: int = 256
    min_size: int = 288
    max_size: int = 384
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    aspect_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    rpn_batch: int = 256
    rpn_pre_nms_train: int = 1000
    rpn_post_nms_train: int = 500
    rpn_pre_nms_test: int = 500
    rpn_post_nms_test: int = 300
    roi_batch: int = 128

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise BicmError(f"unknown optimizer {self.optimizer!r}; use adamw or sgd")
        if len(self.widths) != 5 or len(self.anchor_sizes) != 5:
            raise BicmError("widths and anchor_sizes need 5 entries (stem + 4 stages; 5 pyramid levels)")
        if self.steps < 1 or self.batch_size < 1 or self.train_images < 1:
            raise BicmError("steps, batch size and train images must be at least 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DetectorConfig":
        """The config from :func:`dataclasses.asdict` output or its JSON (lists become tuples)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BicmError(f"detector config has unknown settings ({', '.join(unknown)}); is bicm older than the weights?")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, max(1, channels // 4)), channels)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _group_norm(cout), nn.ReLU(inplace=True))


class _Stage(nn.Module):
    """A strided conv, then a residual conv (both 3x3, GroupNorm, ReLU)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = _conv(cin, cout, 2)
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return torch.relu(x + self.conv(x))


class ShapesBackbone(nn.Module):
    """Stem (stride 2) and four stages (strides 4, 8, 16, 32), run in order.

    ``(B, 3, H, W)`` -> ``(B, widths[4], H/32, W/32)``; :class:`BackboneWithFPN` takes the
    outputs of ``layer1``-``layer4`` from it.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = _conv(3, widths[0], 2)
        self.layer1 = _Stage(widths[0], widths[1])
        self.layer2 = _Stage(widths[1], widths[2])
        self.layer3 = _Stage(widths[2], widths[3])
        self.layer4 = _Stage(widths[3], widths[4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return x


def build_detector(
    cfg: DetectorConfig, *, score_floor: float = 0.05, top_n: int = 100, nms_iou: float = 0.5
) -> nn.Module:
    """A torchvision ``FasterRCNN`` of ``cfg``, freshly initialised from ``torch``'s RNG.

    ``score_floor``, ``top_n`` and ``nms_iou`` set the inference heads (torchvision's
    ``box_score_thresh``, ``box_detections_per_img``, ``box_nms_thresh``); they do not
    change the weights. In eval mode ``model([image])`` takes ``(3, H, W)`` float images in
    [0, 1] and returns per image ``boxes`` ``(N, 4)`` float xyxy pixels of that image,
    ``scores`` ``(N,)`` and ``labels`` ``(N,)`` (indices into :data:`CLASSES`).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    w = cfg.widths
    backbone = BackboneWithFPN(
        ShapesBackbone(w),
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=list(w[1:]),
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=_group_norm,
    )
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(cfg.fpn_channels, len(cfg.aspect_ratios)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_batch_size_per_image=cfg.rpn_batch,
        box_roi_pool=pooler,
        box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation),
        box_predictor=FastRCNNPredictor(cfg.representation, len(CLASSES)),
        box_batch_size_per_image=cfg.roi_batch,
        box_score_thresh=score_floor,
        box_detections_per_img=top_n,
        box_nms_thresh=nms_iou,
    )
    return steady_rcnn(model)  # else the first image's size decides every later image's RoI levels


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def save_detector(model: nn.Module, cfg: DetectorConfig, path: Union[str, Path]) -> Path:
    """Write the weights as float16 safetensors with the config as JSON metadata (atomic).

    One metadata entry only: safetensors writes its metadata map in no fixed order, and a
    single entry keeps the file byte-identical from run to run.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": _FILE_FORMAT, "config": asdict(cfg), "classes": list(CLASSES), "world": WORLD_VERSION}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_detector(
    path: Union[str, Path], *, score_floor: float = 0.05, top_n: int = 100, nms_iou: float = 0.5, device: Union[str, torch.device] = "cpu"
) -> tuple[nn.Module, DetectorConfig]:
    """The detector saved by :func:`save_detector` (float32, eval mode) and its config.

    Reads tensors and JSON only (no unpickling). Raises :class:`BicmError` when the file is
    missing, not a bicm shapes detector, or does not fit its own config.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    regular_file(path, "shapes detector weights", missing=f"shapes detector weights not found: {path}; train one with 'bicm train-detector'")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json_loads((handle.metadata() or {}).get(_METADATA_KEY, "null"), path)
        tensors = load_file(str(path))
    except Exception as exc:
        raise BicmError(f"cannot read {path} as safetensors ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FILE_FORMAT:
        raise BicmError(f"{path} is not a bicm shapes detector (no {_METADATA_KEY} metadata); train one with 'bicm train-detector'")
    if list(meta.get("classes", [])) != list(CLASSES):
        raise BicmError(f"{path} detects {meta.get('classes')}, this bicm's shapes world has {list(CLASSES)}")
    cfg = DetectorConfig.from_dict(meta["config"])
    model = build_detector(cfg, score_floor=score_floor, top_n=top_n, nms_iou=nms_iou)
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise BicmError(f"{path} does not fit its own detector config: {str(exc).splitlines()[0][:200]}") from None
    return model.eval().requires_grad_(False).to(device), cfg


def detector_weights() -> Path:
    """Where the shipped shapes detector lies inside the installed package."""
    from importlib import resources

    path = Path(str(resources.files("bicm.shapes").joinpath("model", DETECTOR_WEIGHTS)))
    regular_file(path, "shapes detector weights", missing=f"the shapes detector is not in this installation ({DETECTOR_WEIGHTS}); train one with 'bicm train-detector'")
    return path


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    path: Path
    boxes: tuple[tuple[float, float, float, float], ...]  # float xyxy pixels
    labels: tuple[int, ...]  # indices into CLASSES


def read_objects(folder: Path, limit: int) -> list[_Item]:
    """The first ``limit`` images of ``folder/train_objects.jsonl`` with their boxes and labels."""
    from .dataset import TRAIN_FIELDS

    path = folder / "train_objects.jsonl"
    records = list(read_records(path, TRAIN_FIELDS[path.name]))
    if len(records) < limit:
        raise BicmError(f"{path} has {len(records)} train images, the config asks for {limit}; use --train-images {len(records)} or another --root")
    items = []
    for where, r in records[:limit]:
        unknown = sorted(set(r["class_names"]) - set(SHAPES))
        if unknown:
            raise BicmError(f"{where} names classes this world does not have ({', '.join(unknown)})")
        if len(r["class_names"]) != len(r["boxes"]):
            raise BicmError(f"{where}: {len(r['boxes'])} boxes but {len(r['class_names'])} class names")
        items.append(_Item(folder / r["image"], tuple(r["boxes"]), tuple(CLASSES.index(c) for c in r["class_names"])))
    return items


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1] of an RGB PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(255.0)


class Batches:
    """Random training batches (seeded): images drawn with replacement, half of them flipped.

    A call returns ``batch_size`` images ``(3, H, W)`` and their targets (``boxes`` ``(N, 4)``
    float xyxy pixels, ``labels`` ``(N,)`` int64).
    """

    def __init__(self, items: list[_Item], cfg: DetectorConfig, seed: int) -> None:
        self.items, self.cfg = items, cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        picks = self.rng.integers(0, len(self.items), size=self.cfg.batch_size)
        flips = self.rng.random(self.cfg.batch_size) < 0.5
        images, targets = [], []
        for index, flip in zip(picks, flips):
            item = self.items[int(index)]
            with Image.open(item.path) as handle:
                pixels = to_tensor(handle)
            boxes = torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4)
            if self.cfg.hflip and flip:
                width = pixels.shape[-1]
                pixels = pixels.flip(-1)
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            images.append(pixels)
            targets.append({"boxes": boxes, "labels": torch.tensor(item.labels, dtype=torch.int64)})
        return images, targets


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` IoU of ``(N, 4)`` and ``(M, 4)`` float xyxy boxes (exclusive edges)."""
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(a.reshape(-1, 4).float(), b.reshape(-1, 4).float())


def average_precision(
    detections: Sequence[tuple[torch.Tensor, torch.Tensor]],
    truths: Sequence[torch.Tensor],
    iou_threshold: float = 0.5,
) -> float:
    """VOC average precision of one class (all-point interpolation, no "difficult" boxes).

    Parameters
    ----------
    detections: per image, ``(boxes (N, 4), scores (N,))`` of this class (float xyxy pixels).
    truths: per image, the ``(M, 4)`` ground-truth boxes of this class.

    Detections of all images are ranked by score; each is a true positive when it overlaps a
    not yet matched truth of its image with IoU >= ``iou_threshold`` (its best-overlapping
    truth, as VOC), else a false positive. AP is the area under the precision-recall curve
    made monotone (precision at recall r = the best precision at any recall >= r). NaN when
    there is no truth.
    """
    n_truth = sum(int(t.reshape(-1, 4).shape[0]) for t in truths)
    if n_truth == 0:
        return float("nan")
    ranked: list[tuple[float, int, int]] = []  # (score, image, detection index)
    for image, (_, scores) in enumerate(detections):
        ranked.extend((float(s), image, k) for k, s in enumerate(scores.reshape(-1).tolist()))
    ranked.sort(key=lambda r: (-r[0], r[1], r[2]))  # stable on ties
    ious = [box_iou(boxes, truth) for (boxes, _), truth in zip(detections, truths)]
    used = [torch.zeros(int(t.reshape(-1, 4).shape[0]), dtype=torch.bool) for t in truths]
    hits = np.zeros(len(ranked))
    for rank, (_, image, k) in enumerate(ranked):
        row = ious[image][k] if ious[image].numel() else torch.zeros(0)
        if row.numel():
            best = int(row.argmax())
            if float(row[best]) >= iou_threshold and not used[image][best]:
                used[image][best] = True
                hits[rank] = 1
    tp = np.cumsum(hits)
    recall = tp / n_truth
    precision = tp / np.arange(1, len(ranked) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@torch.inference_mode()
def detect(model: nn.Module, image: Image.Image) -> dict[str, torch.Tensor]:
    """Detections of one RGB image: ``boxes`` ``(N, 4)`` float xyxy pixels of the image,
    ``scores`` ``(N,)``, ``labels`` ``(N,)`` int64 (indices into :data:`CLASSES`), on the CPU."""
    device = next(model.parameters()).device
    out = model([to_tensor(image).to(device)])[0]
    return {k: v.cpu() for k, v in out.items()}


def detector_metrics(model: nn.Module, protocol: str, images: int, folder: Optional[Path] = None) -> dict[str, Any]:
    """How well the detector finds the objects of the first ``images`` test scenes of ``protocol``.

    The scenes are regenerated (:func:`bicm.shapes.dataset.scene_for`, rendered exactly as the
    dataset's files). Reported: recall at IoU 0.5 of every object, by any detection
    (class-agnostic) and by one of its class; AP at IoU 0.5 per class (VOC all-point) and
    their mean; detections per image (the model's own score floor and cap). With ``folder``
    (the protocol's folder holding ``test.jsonl``), also the recall at IoU 0.5 of the
    referred boxes of those images' queries (a plural phrase's truth is its union box, which
    a detector of single objects rarely proposes: reported apart).
    """
    from .dataset import scene_for
    from .world import render

    was_training = model.training
    model.eval()
    per_class_dets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {c: [] for c in range(1, len(CLASSES))}
    per_class_truth: dict[int, list[torch.Tensor]] = {c: [] for c in range(1, len(CLASSES))}
    found = found_class = n_objects = n_dets = 0
    all_boxes: list[torch.Tensor] = []
    for index in range(images):
        scene = scene_for(protocol, "test", index)
        out = detect(model, render(scene))
        boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        all_boxes.append(boxes)
        truth = torch.tensor([o.box for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
        truth_labels = torch.tensor([CLASSES.index(o.shape) for o in scene.objects], dtype=torch.int64)
        iou = box_iou(truth, boxes)  # (objects, detections)
        hit = iou >= 0.5
        found += int(hit.any(1).sum())
        found_class += int((hit & (truth_labels[:, None] == labels[None, :])).any(1).sum())
        n_objects += len(scene.objects)
        n_dets += int(boxes.shape[0])
        for c in per_class_dets:
            keep = labels == c
            per_class_dets[c].append((boxes[keep], scores[keep]))
            per_class_truth[c].append(truth[truth_labels == c])
    ap = {CLASSES[c]: average_precision(per_class_dets[c], per_class_truth[c]) for c in per_class_dets}
    valid = [v for v in ap.values() if not math.isnan(v)]
    result: dict[str, Any] = {
        "protocol": protocol,
        "images": images,
        "objects": n_objects,
        "recall@0.5": found / max(1, n_objects),
        "recall@0.5_with_class": found_class / max(1, n_objects),
        "detections_per_image": n_dets / max(1, images),
        "ap@0.5": {k: (None if math.isnan(v) else v) for k, v in ap.items()},
        "map@0.5": float(np.mean(valid)) if valid else None,
    }
    queries = Path(folder) / "test.jsonl" if folder is not None else None
    if queries is not None and queries.is_file():
        hits = {"all": [0, 0], "single": [0, 0], "plural": [0, 0]}
        from .dataset import SPLIT_FIELDS

        for where, r in read_records(queries, SPLIT_FIELDS):
            if not Path(r["image"]).stem.isdigit():
                raise BicmError(f"{where}: image {r['image']!r} is not a file of the shapes world")
            index = int(Path(r["image"]).stem)
            if index >= images:
                continue
            ok = bool(all_boxes[index].numel()) and bool((box_iou(torch.tensor([r["box"]]), all_boxes[index]) >= 0.5).any())
            for key in ("all", "single" if len(r["boxes"]) == 1 else "plural"):
                hits[key][0] += int(ok)
                hits[key][1] += 1
        result["referred"] = {
            "queries": hits["all"][1],
            "recall@0.5": hits["all"][0] / max(1, hits["all"][1]),
            "recall@0.5_single_object": hits["single"][0] / max(1, hits["single"][1]) if hits["single"][1] else None,
            "recall@0.5_plural": hits["plural"][0] / max(1, hits["plural"][1]) if hits["plural"][1] else None,
        }
    model.train(was_training)
    return result


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _lr_at(cfg: DetectorConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, cfg: DetectorConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and GroupNorm
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"


def train_detector(
    cfg: DetectorConfig,
    out: Union[str, Path],
    *,
    root: Union[str, Path, None] = None,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_data: Optional[Callable[[str, int, int], None]] = None,
    on_resume: Optional[Callable[[int], None]] = None,
    on_eval: Optional[Callable[[str], None]] = None,
    save_every: int = 200,
    eval_images: int = 200,
) -> dict[str, Any]:
    """Train the shapes detector and write ``out`` (safetensors), its history and model cards.

    Data: the first ``cfg.train_images`` images of the train split of each protocol under
    ``root`` (:func:`bicm.shapes.dataset.ensure_shapes`; written when missing, the default
    root is ``~/.cache/bicm/shapes-v2``): boxes and category names only. ``on_data(what, i,
    n)`` reports the generation of missing splits.

    Resumable: every ``save_every`` steps (0: never) and on Ctrl-C, the training state
    (weights, optimizer, data-order and torch random states, history) is written atomically
    to :func:`bicm.interrupt.state_path` of ``out``; the same call later continues from it
    (``on_resume(step)`` is told) and gives the same weights as an uninterrupted run. The
    state file is removed at the end. On Ctrl-C it raises :class:`~bicm.interrupt.Interrupted`
    saying what was kept.

    At the end, :func:`detector_metrics` on ``eval_images`` test scenes of each protocol
    (0: none) of the float16 weights as saved. Returns the model card (also written beside
    the weights as ``<out stem>.json`` and ``<out stem>.md``).
    """
    from .dataset import PROTOCOLS, ensure_shapes

    out = Path(out)
    saved_state = state_path(out)
    resumed = load_state(saved_state, _STATE_FORMAT, asdict(cfg))
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    splits = ("train", "test") if eval_images > 0 else ("train",)
    training = TrainingState(saved_state, _STATE_FORMAT, asdict(cfg), resumed, started)
    try:
        folders = {p: ensure_shapes(root, p, splits, progress=None if on_data is None else (lambda s, i, n, p=p: on_data(f"{p} {s}", i, n))) for p in PROTOCOLS}
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while writing the shapes world; {training.kept()}") from None
    items = [item for p in PROTOCOLS for item in read_objects(folders[p], cfg.train_images)]

    torch.manual_seed(cfg.seed)
    model = build_detector(cfg)
    model.train()
    optim = _optimizer(model, cfg)
    batches = Batches(items, cfg, seed=cfg.seed + 1)
    history = training.history
    first = training.restore(model, optim, batches.rng)
    if resumed is not None and on_resume is not None:
        on_resume(first)

    completed = first
    data_rng = batches.rng.bit_generator.state  # the data order's state before step `completed`
    torch_rng = torch.get_rng_state()
    step = first
    try:
        for step in range(first, cfg.steps):
            data_rng = batches.rng.bit_generator.state
            torch_rng = torch.get_rng_state()
            for group in optim.param_groups:
                group["lr"] = _lr_at(cfg, step)
            images, targets = batches()
            losses = model(images, targets)
            loss = sum(losses.values())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip > 0 else float("nan")
            with deferred():  # the update and its record happen together or not at all
                optim.step()
                record = {"step": step + 1, "loss": float(loss.item()), "lr": _lr_at(cfg, step), "grad_norm": grad_norm}
                record.update({k.replace("loss_", ""): float(v.item()) for k, v in losses.items()})
                history.append(record)
                completed = step + 1
            if on_step is not None:
                on_step(step + 1, record)
            if save_every > 0 and completed % save_every == 0 and completed < cfg.steps:
                training.save(completed, model, optim, batches.rng.bit_generator.state)
    except KeyboardInterrupt:
        if completed > first:
            if completed == step:  # interrupted inside step `completed`: its batch was drawn already
                training.save(completed, model, optim, data_rng, torch_rng)
            else:
                training.save(completed, model, optim, batches.rng.bit_generator.state)
        raise training.stopped(completed, cfg.steps) from None
    seconds = training.seconds()
    model.eval()
    with torch.no_grad():  # the card describes the shipped (float16) weights exactly
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.half().float())
    eval_started = time.perf_counter()
    metrics = {}
    if eval_images > 0:
        for p in PROTOCOLS:
            if on_eval is not None:
                on_eval(p)
            metrics[p] = detector_metrics(model, p, eval_images, folders[p])
    eval_seconds = time.perf_counter() - eval_started
    out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(model, cfg, out)
    parameters = sum(p.numel() for p in model.parameters())
    card = {
        "model": "bicm shapes detector (torchvision Faster R-CNN, trained from scratch)",
        "command": command_line(cfg, out),
        "config": asdict(cfg),
        "classes": list(CLASSES),
        "world": {"version": WORLD_VERSION, "shapes": list(SHAPES), "train_images_per_protocol": cfg.train_images},
        "training_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, cfg.steps), 3),
        "eval_seconds": round(eval_seconds, 1),
        "machine": _machine(),
        "metrics": {"test_images_per_protocol": eval_images, "inference": {"score_floor": 0.05, "top_n": 100, "nms_iou": 0.5}, **metrics},
        "final_loss": history[-1]["loss"] if history else None,
        "mean_loss_last_100": float(np.mean([h["loss"] for h in history[-100:]])) if history else None,
        "weights_dtype": "float16 (loaded as float32)",
        "weights_bytes": out.stat().st_size,
        "weights_sha256": file_digest(out),
        "parameters": parameters,
        "versions": versions(),
        "seed": cfg.seed,
        "resumed_from_step": first or None,
    }
    atomic_write_text(out.parent / (out.stem + ".json"), json.dumps(card, indent=1) + "\n")
    atomic_write_text(out.parent / (out.stem + ".history.json"), json.dumps(history) + "\n")
    atomic_write_text(out.parent / (out.stem + ".md"), markdown_card(card, out.name))
    saved_state.unlink(missing_ok=True)
    return card


def command_line(cfg: DetectorConfig, out: Path) -> str:
    """The ``bicm train-detector`` command that makes ``cfg`` (its settings with CLI flags)."""
    parts = [f"bicm train-detector --out {out.name} --seed {cfg.seed} --steps {cfg.steps}",
             f"--batch-size {cfg.batch_size} --lr {cfg.lr:g} --threads {cfg.threads}"]
    if cfg.train_images != DetectorConfig.train_images:
        parts.append(f"--train-images {cfg.train_images}")
    flags = {"seed", "steps", "batch_size", "lr", "threads", "train_images"}
    other = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg) if f.name not in flags and getattr(cfg, f.name) != f.default]
    if other:  # settings the command line cannot set: made from Python
        parts.append(f"(and from Python: {', '.join(other)})")
    return " ".join(parts)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown_card(card: dict[str, Any], name: str) -> str:
    """The human-readable model card of :func:`train_detector`'s output."""
    cfg = card["config"]
    lines = [
        "# bicm shapes detector",
        "",
        "A torchvision Faster R-CNN trained from scratch by bicm on the detection data of its synthetic",
        "shapes world (object boxes and category names of the train scenes of both protocols; never the",
        "referring expressions). It stands in for the paper's detector-pretrained Faster R-CNN: 100",
        f"named proposals per image. Serve it with `--proposals shapes-detector` (file `{name}`).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | Faster R-CNN: conv stem + 4 GroupNorm conv stages (widths {cfg['widths']}), FPN {cfg['fpn_channels']} channels (strides 4-64), "
        f"anchors {cfg['anchor_sizes']} x ratios {cfg['aspect_ratios']}, RoIAlign 7x7, two-layer MLP head {cfg['representation']}; "
        f"classes: background + {', '.join(card['classes'][1:])} |",
        f"| input | resized to short side {cfg['min_size']} px, long side at most {cfg['max_size']} px |",
        f"| parameters | {card['parameters'] / 1e6:.2f} M, stored as float16 ({card['weights_bytes'] / 1e6:.1f} MB), loaded as float32 |",
        f"| command | `{card['command']}` |",
        f"| data | first {cfg['train_images']} train images of each protocol (shapes world {card['world']['version']}), horizontal flips: {cfg['hflip']} |",
        f"| training | {cfg['optimizer']} lr {cfg['lr']:g} ({cfg['warmup']} warm-up steps, cosine), weight decay {cfg['weight_decay']:g}, "
        f"gradient clip {cfg['grad_clip']:g}, batch {cfg['batch_size']}, {cfg['steps']} steps, seed {cfg['seed']}; final loss "
        f"{card['final_loss']:.3f} (mean of the last 100 steps {card['mean_loss_last_100']:.3f}) |",
        f"| time | {card['training_seconds'] / 60:.1f} min ({card['seconds_per_step']:.2f} s/step) on {card['machine']}, "
        f"threads: {cfg['threads']}; evaluation {card['eval_seconds'] / 60:.1f} min |",
        f"| versions | torch {card['versions'].get('torch')}, torchvision {card['versions'].get('torchvision')} |",
    ]
    metrics = {k: v for k, v in card["metrics"].items() if isinstance(v, dict) and "recall@0.5" in v}
    if metrics:
        inference = card["metrics"]["inference"]
        lines += [
            "",
            f"## Test scenes (first {card['metrics']['test_images_per_protocol']} of each protocol; score floor "
            f"{inference['score_floor']}, at most {inference['top_n']} detections, NMS {inference['nms_iou']})",
            "",
            "| protocol | objects | recall@0.5 | recall@0.5 right class | referred boxes recall@0.5 (single / plural) | detections per image | mAP@0.5 | "
            + " | ".join(f"AP {c}" for c in card["classes"][1:]) + " |",
            "|---" * (7 + len(card["classes"]) - 1) + "|",
        ]
        for protocol, m in metrics.items():
            ref = m.get("referred")
            referred = "n/a" if ref is None else (
                f"{_pct(ref['recall@0.5'])} ({_pct(ref['recall@0.5_single_object'])} / {_pct(ref['recall@0.5_plural'])})"
            )
            lines.append(
                f"| {protocol} | {m['objects']} | {_pct(m['recall@0.5'])} | {_pct(m['recall@0.5_with_class'])} | {referred} | "
                f"{m['detections_per_image']:.1f} | {_pct(m['map@0.5'])} | " + " | ".join(_pct(m["ap@0.5"][c]) for c in card["classes"][1:]) + " |"
            )
    lines += [
        "",
        "Limits: it knows only this world's five shapes; it is not a model of real photos. Everything",
        f"above is in `{Path(name).stem}.json`, the loss curve in `{Path(name).stem}.history.json`.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The proposal source
# --------------------------------------------------------------------------------------
@register_source("shapes-detector")
class ShapesDetectorSource(ProposalSource):
    """Detections of the shapes detector as named proposals (the paper's setting: 100 boxes
    named by a detector).

    Parameters
    ----------
    checkpoint: a file written by ``bicm train-detector`` [default: the one shipped in
        ``bicm/shapes/model``].
    top_n: at most this many detections per image (the paper: 100).
    score_floor: drop detections scoring below this.
    nms_iou: the per-class NMS threshold.
    device: ``"auto"``, ``"cpu"``, ``"cuda"``.
    """

    def __init__(
        self,
        checkpoint: Union[str, Path, None] = None,
        top_n: int = 100,
        score_floor: float = 0.05,
        nms_iou: float = 0.5,
        device: str = "auto",
    ) -> None:
        from ..devices import resolve_device

        super().__init__()
        path = Path(checkpoint) if checkpoint is not None else detector_weights()
        if top_n < 1:
            raise BicmError(f"top_n must be at least 1, not {top_n}")
        self.top_n, self.score_floor, self.nms_iou = int(top_n), float(score_floor), float(nms_iou)
        self.device = resolve_device(device)
        self.model, self.config = load_detector(path, score_floor=self.score_floor, top_n=self.top_n, nms_iou=self.nms_iou, device=self.device)
        self.digest = file_digest(path)[:12]

    @property
    def id(self) -> str:
        return f"shapes-detector(weights=sha256:{self.digest},top_n={self.top_n},score_floor={self.score_floor:g},nms_iou={self.nms_iou:g})"

    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        """Up to ``top_n`` boxes (float xyxy pixels of ``image``), scores and shape names."""
        out = detect(self.model, image.convert("RGB"))
        names: list[Optional[str]] = [CLASSES[int(label)] for label in out["labels"].tolist()]
        return Proposals(out["boxes"].float(), scores=out["scores"].float(), class_names=names, source=self.id)
