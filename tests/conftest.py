"""Shared fixtures: tiny random open_clip models, a drawn scene, a detections file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from bicm.backbone import Backbone
from bicm.checkpoints import save_checkpoint
from bicm.preprocess import PreprocessSpec

# A tiny ViT CLIP: 64 px input, 16 px patches (4x4 grid), 4 heads of width 16.
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

TINY_RESNET_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The command line's --precision defaults to "auto" (bf16 crops on CPUs with AMX / AVX-512
# BF16). The tests pin fp32 (also in the CLI subprocesses they start) so that their numbers do
# not depend on the CPU they run on; tests/test_precision.py covers the other precisions.
os.environ["BICM_PRECISION"] = "fp32"


def make_model(cfg: dict = TINY_CFG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).eval()


def make_backbone(cfg: dict = TINY_CFG, seed: int = 0, spec: PreprocessSpec | None = None) -> Backbone:
    model = make_model(cfg, seed)
    size = model.visual.image_size
    spec = spec or PreprocessSpec(size=(size[0], size[1]) if isinstance(size, tuple) else (size, size))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return Backbone(model, tokenizer, spec, torch.device("cpu"), "tiny", None, dict(cfg))


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return make_backbone()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(make_model(), path, TINY_CFG, PreprocessSpec(size=(64, 64)))
    return path


def draw_scene(width: int = 320, height: int = 240) -> Image.Image:
    """Green field, a red square top-left, a blue disc bottom-right."""
    image = Image.new("RGB", (width, height), (40, 140, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 90, 100), fill=(220, 30, 30))
    draw.ellipse((200, 120, 280, 200), fill=(30, 40, 220))
    return image


SCENE_BOXES = [[20.0, 30.0, 91.0, 101.0], [200.0, 120.0, 281.0, 201.0], [0.0, 0.0, 320.0, 240.0]]
SCENE_NAMES = ["square", "ball", "grass"]


@pytest.fixture()
def scene_files(tmp_path) -> tuple[Path, Path]:
    image = tmp_path / "scene.png"
    draw_scene().save(image)
    dets = tmp_path / "dets.json"
    dets.write_text(
        json.dumps({"box_format": "xyxy", "images": {"scene.png": {"boxes": SCENE_BOXES, "class_names": SCENE_NAMES}}})
    )
    return image, dets
