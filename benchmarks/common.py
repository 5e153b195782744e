"""Pieces the benchmark scripts share (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from typing import Callable

import open_clip
import torch

from bicm.backbone import Backbone
from bicm.preprocess import PreprocessSpec


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (CUDA synchronised when present)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_vit_b32(device: str = "cpu") -> Backbone:
    """A ViT-B-32-sized CLIP with random weights (QuickGELU, as OpenAI's), seeded."""
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # open_clip: "initialized randomly", which is the point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    logging.disable(logging.NOTSET)
    return Backbone(model.to(device), open_clip.get_tokenizer("ViT-B-32"), PreprocessSpec(), torch.device(device), "random ViT-B-32")
