"""Crop backends (Pillow on the host, tensor operations on the model's device) and work
prepared ahead of the model (bicm.prefetch): the same pixels, the same records."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bicm import BiCMConfig, BicmError, Grounder
from bicm.cache import MemoryFeatureCache
from bicm.crops import crop_uint8, crop_window, encode_crops, resample_taps, resolve_crop_backend
from bicm.data import load_dataset
from bicm.encoder import Encoder
from bicm.evaluate import ablation_rows, run_eval
from bicm.prefetch import ahead
from bicm.preprocess import PreprocessSpec
from bicm.proposals.sources import make_source

from .helpers import dets_for, make_backbone, make_dataset


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    return [noise, small.resize((500, 375), Image.BICUBIC)]


def _boxes(n: int = 80) -> list[list[float]]:
    rng = np.random.default_rng(1)
    boxes = []
    for _ in range(n):
        x1, y1 = rng.uniform(-20, 490), rng.uniform(-20, 365)
        boxes.append([x1, y1, x1 + rng.uniform(0.3, 320), y1 + rng.uniform(0.3, 320)])
    # whole image, one pixel, a 1-pixel-wide strip (64:1 and beyond), fractional edges
    return boxes + [[0, 0, 500, 375], [10, 10, 11, 11], [0, 0, 1, 375], [3.5, 2.2, 400.7, 9.1], [499.5, 374.5, 600, 400]]


def test_crop_window_rounds_outward_inside_the_image_at_least_one_pixel():
    assert crop_window(100, 80, [10.2, 5.9, 20.1, 30.0]) == (10, 5, 21, 30)
    assert crop_window(100, 80, [-5, -5, 200, 200]) == (0, 0, 100, 80)
    assert crop_window(100, 80, [40.5, 40.5, 40.5, 40.5]) == (40, 40, 41, 41)
    assert crop_window(100, 80, [150, 90, 160, 95]) == (99, 79, 100, 80)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_tensor_crops_hold_the_same_pixels_as_pillow(mode, interpolation):
    """On white noise a window one pixel off, or a resize off by a sub-pixel, would differ by
    tens of levels almost everywhere; the tensor backend is within Pillow's fixed-point rounding."""
    spec = PreprocessSpec(interpolation=interpolation, resize_mode=mode)
    for image in _images():
        pil = crop_uint8(image, _boxes(), spec).int()
        tensor = crop_uint8(image, _boxes(), spec, "tensor").int()
        assert tensor.shape == pil.shape == (len(_boxes()), 3, 224, 224) and tensor.dtype == torch.int32
        diff = (pil - tensor).abs()
        assert diff.max() <= 2, (mode, interpolation)
        assert diff.float().mean() < 0.01


def test_tensor_crops_pad_like_pillow_under_longest():
    spec = PreprocessSpec(resize_mode="longest", fill=17)
    for image in _images():
        pil = crop_uint8(image, _boxes(), spec).int()
        tensor = crop_uint8(image, _boxes(), spec, "tensor").int()
        assert ((pil == 17) == (tensor == 17)).float().mean() > 0.999  # the padding in the same places
        assert ((pil - tensor).abs() <= 1).float().mean() > 0.999


def test_resample_taps_are_the_identity_at_scale_one_and_zero_outside():
    taps = resample_taps(7, 7, torch.arange(-1, 8), "bicubic")
    assert torch.equal(taps[1:8], torch.eye(7)) and not taps[0].any() and not taps[8].any()
    down = resample_taps(10, 5, torch.arange(5), "bicubic")
    assert torch.allclose(down.sum(1), torch.ones(5))


def test_auto_backend_is_tensor_on_cuda_and_pil_on_a_cpu():
    assert resolve_crop_backend("auto", torch.device("cpu")) == "pil"
    assert resolve_crop_backend("auto", torch.device("cuda")) == "tensor"
    assert resolve_crop_backend("tensor", torch.device("cpu")) == "tensor"
    with pytest.raises(BicmError, match="crop backend"):
        resolve_crop_backend("opencv", torch.device("cpu"))
    with pytest.raises(BicmError, match="crop backend"):
        BiCMConfig(crop_backend="opencv")  # type: ignore[arg-type]


def test_backends_give_close_embeddings_and_separate_cache_entries():
    backbone = make_backbone()
    image = _images()[1]
    boxes = torch.tensor(_boxes(20))
    pil = encode_crops(backbone, image, boxes, backend="pil")
    tensor = encode_crops(backbone, image, boxes, backend="tensor")
    assert (pil * tensor).sum(1).min() > 0.999 and not torch.equal(pil, tensor)
    cache = MemoryFeatureCache()
    encoder = Encoder(backbone, cache)
    assert torch.equal(encoder.crops(image, boxes, backbone.spec, backend="pil"), pil)
    assert torch.equal(encoder.crops(image, boxes, backbone.spec, backend="tensor"), tensor)  # not the pil entries
    assert len(cache) == 2 * len(boxes)


def test_ahead_keeps_order_bounds_its_lead_and_hands_back_errors():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        if i == 3:
            raise BicmError("image 3 is broken")
        return i * i

    consumed = 0
    for i, ready in ahead(range(8), work, depth=2):
        time.sleep(0.02)  # the consumer is the slow side: the worker runs into its bound
        with lock:
            assert len(started) <= consumed + 1 + 2 + 1  # this one, 2 waiting, 1 being computed
        if i == 3:
            with pytest.raises(BicmError, match="broken"):
                ready.get()
        else:
            assert ready.get() == i * i
        consumed += 1
    assert consumed == 8 and started == list(range(8))
    assert [(i, r) for i, r in ahead([1, 2], work, depth=0)] == [(1, None), (2, None)]


def test_ahead_stops_its_worker_when_the_consumer_stops():
    before = threading.active_count()
    for i, _ in ahead(range(1000), lambda i: i, depth=2):
        if i == 5:
            break
    for _ in range(50):
        if threading.active_count() <= before:
            break
        time.sleep(0.05)
    assert threading.active_count() <= before


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_eval_with_work_ahead_writes_byte_identical_predictions(tmp_path, backend):
    data = make_dataset(tmp_path, n_images=4)
    samples = load_dataset("jsonl", "test", data, image_root=tmp_path / "images")
    grounder = Grounder(make_backbone(), BiCMConfig(crop_backend=backend))
    rows = ablation_rows("table4", grounder.config)
    text, batches = {}, {}
    for depth in (0, 2):
        out = tmp_path / f"run{depth}"
        with BatchRecorder() as batches[depth]:
            run_eval(grounder, samples, tmp_path / "images", out, rows, dataset="jsonl", split="test",
                     source=make_source(str(dets_for(tmp_path))), progress=False, prefetch=depth)
        text[depth] = (out / "predictions.jsonl").read_bytes()
    assert text[0] == text[2] and len(text[0].splitlines()) == 12
    # the same encoder batches (a crop's bits depend on its batch): proposals and QAM boxes
    # together whether the proposals' crops were cut ahead or not
    assert batches[0].sizes == batches[2].sizes and batches[0].sizes
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["config"]["crop_backend"] == backend


class BatchRecorder:
    """Rows of every batch through ``Backbone.encode_pixels``, in order."""

    def __enter__(self) -> "BatchRecorder":
        from bicm.backbone import Backbone

        self.sizes: list[int] = []
        self._original = original = Backbone.encode_pixels
        recorder = self

        def recorded(backbone, pixels, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            recorder.sizes.append(int(pixels.shape[0]))
            return original(backbone, pixels, *args, **kwargs)

        Backbone.encode_pixels = recorded  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from bicm.backbone import Backbone

        Backbone.encode_pixels = self._original  # type: ignore[method-assign]


@pytest.mark.parametrize("ahead_of_time", [False, True])
def test_qam_crops_join_the_proposal_crops_batches(ahead_of_time):
    """Proposals' crops and the first chunk's QAM boxes go through the encoder as one run of
    full batches (n + k crops in batches of 8), not the proposals' batches and then k alone."""
    grounder = Grounder(make_backbone(), BiCMConfig(crop_batch_size=8))
    image = _images()[0]
    boxes = torch.tensor(_boxes(10)).clamp(0, 370)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 5)
    queries = ["a red square", "the blue disc on the left", "grass"]
    ready = grounder.prepare(image, boxes, crops=ahead_of_time)
    assert (ready.crop_pixels is not None) == ahead_of_time
    with BatchRecorder() as recorder:
        inputs = grounder.extract(ready, queries)
    n, k = len(ready.work_props), len(inputs.qam_crop_feats)
    assert n % 8 and k >= 1 and recorder.sizes == [8] * ((n + k) // 8) + ([(n + k) % 8] if (n + k) % 8 else [])
    alone = grounder.encoder.crops(image, ready.work_props.boxes, grounder.backbone.spec, 8)
    assert torch.allclose(inputs.crop_feats, alone, atol=1e-5)  # the proposals' own crops, in order


def test_prefetch_depth_follows_the_device():
    """Ahead on a GPU; not on a CPU, where the preparing thread took cores from the encoder
    (measured slower: benchmarks/README.md)."""
    from bicm.prefetch import DEFAULT_DEPTH, default_depth

    assert default_depth(torch.device("cpu")) == 0
    assert default_depth(torch.device("cuda", 0)) == DEFAULT_DEPTH > 0
    assert default_depth("cuda:1") == DEFAULT_DEPTH
