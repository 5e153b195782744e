"""What several test files share: tiny random open_clip models, a drawn scene, the command line
in-process and in a child process, a small evaluation dataset, hand-made image bombs.

Fixtures stay in conftest.py; this module holds plain functions and constants
(``from .helpers import ...``).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from bicm.backbone import Backbone, PreprocessSpec
from bicm.cli import app

# ---------------------------------------------------------------------------------------
# Tiny random CLIPs
# ---------------------------------------------------------------------------------------
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

# A tiny ViT on OpenAI's conventions (64-wide heads in both towers, QuickGELU): a bare state
# dict of it (the OpenAI-style .pt, no config) is read by shape like ViT-B-32's.
TINY_OPENAI_VIT_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_model(cfg: dict = TINY_CFG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).eval()


def make_backbone(cfg: dict = TINY_CFG, seed: int = 0, spec: PreprocessSpec | None = None) -> Backbone:
    model = make_model(cfg, seed)
    size = model.visual.image_size
    spec = spec or PreprocessSpec(size=(size[0], size[1]) if isinstance(size, tuple) else (size, size))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return Backbone(model, tokenizer, spec, torch.device("cpu"), "tiny", None, dict(cfg))


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def draw_scene(width: int = 320, height: int = 240) -> Image.Image:
    """Green field, a red square top-left, a blue disc bottom-right."""
    image = Image.new("RGB", (width, height), (40, 140, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 90, 100), fill=(220, 30, 30))
    draw.ellipse((200, 120, 280, 200), fill=(30, 40, 220))
    return image


SCENE_BOXES = [[20.0, 30.0, 91.0, 101.0], [200.0, 120.0, 281.0, 201.0], [0.0, 0.0, 320.0, 240.0]]
SCENE_NAMES = ["square", "ball", "grass"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels but carries one tiny row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------
# The command line: in-process, and in a child process
# ---------------------------------------------------------------------------------------
def run(*args):
    """``bicm ARGS`` in-process (typer's CliRunner); paths and numbers may be given as such."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """Exit 2 with exactly one ``bicm: error:`` line (holding each fragment) and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ``bicm`` in a child process (these tests are marked slow: each child imports torch afresh)
BICM = [sys.executable, "-m", "bicm.cli"]


def run_bicm(args: Sequence, *, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``bicm ARGS`` in a child process; its stdout and stderr as text."""
    return subprocess.run([*BICM, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------
# A small evaluation dataset (jsonl + a detections file) for `bicm eval`
# ---------------------------------------------------------------------------------------
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def make_dataset(root, n_images=4):
    """Images with three coloured squares; one query per square, boxes exclusive xyxy."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        image = Image.new("RGB", (160 + 20 * i, 120), (60, 130, 70))
        draw = ImageDraw.Draw(image)
        for j, (name, colour) in enumerate(COLOURS.items()):
            x = 10 + 50 * j
            draw.rectangle((x, 30, x + 39, 69), fill=colour)
            lines.append({"id": f"{i}-{name}", "image": f"{i}.png", "query": f"the {name} square", "box": [x, 30, x + 40, 70]})
        image.save(root / "images" / f"{i}.png")
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def dets_for(root, n_images=4, name="dets.json"):
    boxes = [[10 + 50 * j, 30, 50 + 50 * j, 70] for j in range(3)] + [[0, 0, 40, 40]]
    path = root / name
    path.write_text(json.dumps({"box_format": "xyxy", "images": {f"{i}.png": {"boxes": boxes, "class_names": ["square"] * 4} for i in range(n_images)}}))
    return path


def eval_cli(tmp_path, data, *extra):
    return [
        "eval", "--dataset", "jsonl", "--split", "test", "--annotations", str(data), "--images", str(tmp_path / "images"),
        "--checkpoint", str(tmp_path / "tiny.safetensors"), "--proposals", str(dets_for(tmp_path, 6)),
        "--cache", str(tmp_path / "cache.sqlite"), "--no-progress", *extra,
    ]


def file_eval(tmp_path, tiny_checkpoint, n_images):
    """A dataset of ``n_images`` (3 queries each) with proposals from a detections file; returns
    ``command(out, ablation)``: the ``bicm eval`` arguments of a run into ``tmp_path / out``."""
    data = make_dataset(tmp_path, n_images=n_images)
    dets = dets_for(tmp_path, n_images, "dets-all.json")  # eval_cli's own dets.json covers 6 images
    (tmp_path / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())

    def command(out: str, ablation: str = "table4") -> list[str]:
        args = eval_cli(tmp_path, data, "--out", str(tmp_path / out), "--ablation", ablation, "--no-cache")
        args[args.index("--proposals") + 1] = str(dets)
        return args

    return command


# ---------------------------------------------------------------------------------------
# The web demo's service (needs the serve extra: starlette, python-multipart)
# ---------------------------------------------------------------------------------------
def make_service(tiny_backbone, **limits):
    """A DemoService over ``tiny_backbone`` with the bundled shapes example."""
    from bicm.api import Grounder
    from bicm.serve import DemoService, Example, ServeLimits
    from bicm.shapes.examples import example_image, example_queries

    example = Example("shapes", example_image(), tuple(example_queries()), "bundled scene")
    return DemoService(Grounder(tiny_backbone), model_name="tiny", limits=ServeLimits(**limits), top_n=30, examples={"shapes": example})


# ---------------------------------------------------------------------------------------
# Reference implementations
# ---------------------------------------------------------------------------------------
def brute_force_mean(m, box) -> float:
    """Mean of a 2-D map (tensor or array) over the pixels a box touches (at least one)."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    x1, y1, x2, y2 = box
    c0, r0 = min(max(0, math.floor(x1)), w - 1), min(max(0, math.floor(y1)), h - 1)
    c1, r1 = max(c0 + 1, min(w, math.ceil(x2))), max(r0 + 1, min(h, math.ceil(y2)))
    return float(m[r0:r1, c0:c1].mean())
