"""Shared fixtures: tiny random open_clip models, a drawn scene, a detections file.

The plain helpers they are made from (and that the test files import) are in helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bicm.backbone import Backbone
from bicm.checkpoints import save_checkpoint
from bicm.preprocess import PreprocessSpec

from .helpers import SCENE_BOXES, SCENE_NAMES, TINY_CFG, draw_scene, make_backbone, make_model

# The command line's --precision defaults to "auto" (bf16 crops on CPUs with AMX / AVX-512
# BF16). The tests pin fp32 (also in the CLI subprocesses they start) so that their numbers do
# not depend on the CPU they run on; tests/test_precision.py covers the other precisions.
os.environ["BICM_PRECISION"] = "fp32"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Each test starts with the process's thread count: an in-process command with
    ``--threads 1`` (tests/test_cluster.py runs several) would otherwise leave torch on one
    thread for every later test, and on some CPUs (an AMD EPYC with AVX-512 BF16 among them)
    a matrix product split over another number of threads rounds differently in its last bits."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return make_backbone()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(make_model(), path, TINY_CFG, PreprocessSpec(size=(64, 64)))
    return path


@pytest.fixture()
def scene_files(tmp_path) -> tuple[Path, Path]:
    image = tmp_path / "scene.png"
    draw_scene().save(image)
    dets = tmp_path / "dets.json"
    dets.write_text(
        json.dumps({"box_format": "xyxy", "images": {"scene.png": {"boxes": SCENE_BOXES, "class_names": SCENE_NAMES}}})
    )
    return image, dets
