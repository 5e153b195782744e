"""The shapes detector (`bicm train-detector`, proposal source ``shapes-detector``): a tiny
config trained for a few steps on a tiny world is deterministic, resumable, self-describing
and served as named proposals; the AP function is right on hand-made cases."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bicm import BicmError
from bicm.cli import app
from bicm.interrupt import Interrupted, state_path
from bicm.proposals.sources import available_sources, make_source
from bicm.shapes import detector as detector_module
from bicm.shapes.dataset import ensure_shapes, scene_for
from bicm.shapes.detector import DetectorConfig, average_precision, load_detector, train_detector
from bicm.shapes.world import SHAPES, render

from .helpers import assert_user_error, draw_scene

TINY = DetectorConfig(
    seed=0, steps=3, batch_size=2, warmup=1, threads=1, train_images=4, widths=(8, 8, 8, 8, 8), fpn_channels=8,
    representation=16, min_size=96, max_size=128, anchor_sizes=(8, 16, 32, 64, 128), rpn_batch=32,
    rpn_pre_nms_train=50, rpn_post_nms_train=20, rpn_pre_nms_test=50, rpn_post_nms_test=20, roi_batch=16,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    for protocol in ("phrase", "ref"):
        ensure_shapes(root, protocol, ("train", "test"), counts={"train": 4, "test": 2})
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("det") / "det.safetensors"
    card = train_detector(TINY, out, root=world, save_every=0, eval_images=2)
    return out, card


def test_training_is_deterministic_and_self_describing(trained, world, tmp_path):
    out, card = trained
    again = tmp_path / "det.safetensors"
    train_detector(TINY, again, root=world, save_every=0, eval_images=0)
    assert again.read_bytes() == out.read_bytes()
    assert not state_path(out).exists()
    # the file carries its config: it loads without being told anything, never unpickling
    model, cfg = load_detector(out)
    assert cfg == TINY and not model.training
    saved = load_file(str(out))
    assert all(t.dtype == torch.float16 for t in saved.values())
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor.float(), state[name]), name
    # the cards
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["config"]["widths"] == list(TINY.widths) and on_disk["weights_sha256"] == card["weights_sha256"]
    assert "bicm train-detector" in on_disk["command"] and on_disk["machine"]
    markdown = out.with_suffix(".md").read_text()
    assert "# bicm shapes detector" in markdown and "mAP@0.5" in markdown
    history = json.loads((out.parent / "det.history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)
    for protocol in ("phrase", "ref"):
        m = card["metrics"][protocol]
        assert m["images"] == 2 and m["objects"] == sum(len(scene_for(protocol, "test", i).objects) for i in range(2))
        assert 0 <= m["recall@0.5_with_class"] <= m["recall@0.5"] <= 1
        assert set(m["ap@0.5"]) == set(SHAPES) and m["referred"]["queries"] > 0
        assert 0 <= m["referred"]["recall@0.5"] <= 1 and m["detections_per_image"] <= 100


def test_the_source_serves_named_boxes_inside_the_image(trained):
    out, _ = trained
    assert "shapes-detector" in available_sources()
    source = make_source("shapes-detector", checkpoint=out, top_n=7, score_floor=0.0, device="cpu", mode="ignored")
    assert source.id.startswith("shapes-detector(weights=sha256:") and "top_n=7" in source.id
    for image in (render(scene_for("ref", "test", 0)), draw_scene()):
        proposals = source(image)
        assert 0 < len(proposals) <= 7 and proposals.source == source.id
        assert proposals.fully_named and set(proposals.class_names) <= set(SHAPES)
        assert proposals.scores is not None and proposals.scores.shape == (len(proposals),)
        b = proposals.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= image.width).all() and (b[:, 3] <= image.height).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_missing_or_foreign_weights_are_one_clear_error(tmp_path, tiny_checkpoint, monkeypatch):
    with pytest.raises(BicmError, match="train one with 'bicm train-detector'"):
        make_source("shapes-detector", checkpoint=tmp_path / "none.safetensors")
    with pytest.raises(BicmError, match="not a bicm shapes detector"):
        make_source("shapes-detector", checkpoint=tiny_checkpoint)  # a CLIP, not a detector
    monkeypatch.setattr(detector_module, "DETECTOR_WEIGHTS", "not-shipped.safetensors")
    with pytest.raises(BicmError, match="train one with 'bicm train-detector'"):
        make_source("shapes-detector")


@pytest.mark.parametrize("where", ["after-step", "inside-step"])
def test_an_interrupted_and_resumed_training_gives_the_same_weights(trained, world, tmp_path, monkeypatch, where):
    reference, _ = trained
    out = tmp_path / "det.safetensors"
    calls = {"n": 0}
    real_call = detector_module.Batches.__call__

    def interrupting_batches(self):
        calls["n"] += 1
        batch = real_call(self)
        if where == "inside-step" and calls["n"] == 2:
            torch.rand(3)  # as the RPN's sampler would, before Ctrl-C comes in the forward pass
            raise KeyboardInterrupt
        return batch

    def on_step(step, record):
        if where == "after-step" and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(detector_module.Batches, "__call__", interrupting_batches)
    with pytest.raises(Interrupted, match="training state at step"):
        train_detector(TINY, out, root=world, on_step=on_step, save_every=0, eval_images=0)
    assert state_path(out).exists() and not out.exists()
    resumed_at: list[int] = []
    card = train_detector(TINY, out, root=world, save_every=0, eval_images=0, on_resume=resumed_at.append)
    assert resumed_at == [2 if where == "after-step" else 1] and card["resumed_from_step"] == resumed_at[0]
    assert out.read_bytes() == reference.read_bytes()
    assert not state_path(out).exists()


def test_a_state_of_other_settings_is_refused(world, tmp_path):
    out = tmp_path / "det.safetensors"
    with pytest.raises(Interrupted):
        train_detector(TINY, out, root=world, on_step=lambda s, r: (_ for _ in ()).throw(KeyboardInterrupt), save_every=0, eval_images=0)
    with pytest.raises(BicmError, match="other settings \\(steps\\)"):
        train_detector(replace(TINY, steps=4), out, root=world, save_every=0, eval_images=0)


def test_more_train_images_than_the_world_has_is_an_error(world, tmp_path):
    with pytest.raises(BicmError, match="has 4 train images"):
        train_detector(replace(TINY, train_images=5), tmp_path / "d.safetensors", root=world, eval_images=0)


# --------------------------------------------------------------------------------------
# AP (VOC, all-point interpolation)
# --------------------------------------------------------------------------------------
A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 30.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def dets(*pairs):
    boxes = torch.tensor([b for b, _ in pairs], dtype=torch.float32).reshape(-1, 4)
    return boxes, torch.tensor([s for _, s in pairs], dtype=torch.float32)


def test_average_precision_on_hand_made_cases():
    truth = [torch.tensor([A, B])]
    assert average_precision([dets((A, 0.9), (B, 0.8))], truth) == pytest.approx(1.0)
    # a false positive ranked first: precision 1/2 at recall 1/2 and 2/3 at recall 1 -> 2/3
    assert average_precision([dets((FAR, 0.95), (A, 0.9), (B, 0.8))], truth) == pytest.approx(2 / 3)
    # ranked last it costs nothing
    assert average_precision([dets((A, 0.9), (B, 0.8), (FAR, 0.1))], truth) == pytest.approx(1.0)
    # a missed object: recall stops at 1/2
    assert average_precision([dets((A, 0.9))], truth) == pytest.approx(0.5)
    # a second detection of the same object is a false positive: precision 1 at recall 1/2
    # (interpolated over the FP), 2/3 at recall 1 -> 1/2 + 1/3
    assert average_precision([dets((A, 0.9), (A, 0.85), (B, 0.8))], truth) == pytest.approx(5 / 6)
    # IoU below 0.5 is a miss
    assert average_precision([dets(([0.0, 0.0, 10.0, 4.0], 0.9))], [torch.tensor([A])]) == 0.0
    # images are matched apart: a box of image 1 does not find an object of image 0
    assert average_precision([dets(), dets((A, 0.9))], [torch.tensor([A]), torch.zeros(0, 4)]) == 0.0
    assert average_precision([dets((A, 0.5)), dets((B, 0.9))], [torch.tensor([A]), torch.tensor([B])]) == pytest.approx(1.0)
    assert math.isnan(average_precision([dets((A, 0.9))], [torch.zeros(0, 4)]))


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------
def test_the_command_help_and_its_user_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train-detector", "--help"])
    assert result.exit_code == 0 and "--root" in result.stdout and "--save-every" in result.stdout
    assert_user_error(runner.invoke(app, ["train-detector", "--steps", "0"]), "steps")
    assert_user_error(runner.invoke(app, ["train-detector", "--lr", "-1"]), "--lr")
    old = tmp_path / "old"
    old.mkdir()
    (old / "WORLD").write_text("v1\n")
    result = runner.invoke(app, ["train-detector", "--root", str(old), "--out", str(tmp_path / "d.safetensors"), "--steps", "1"])
    assert_user_error(result, "shapes world v1")


def test_the_command_trains_and_reports(world, tmp_path):
    out = tmp_path / "d.safetensors"
    args = ["train-detector", "--root", str(world), "--out", str(out), "--steps", "1", "--batch-size", "1",
            "--train-images", "4", "--eval-images", "1", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and f"bicm: wrote {out}" in result.stderr and "mAP@0.5" in result.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["command"].startswith("bicm train-detector --out d.safetensors --seed 0 --steps 1 --batch-size 1")
