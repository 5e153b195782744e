"""The shapes world: determinism, unambiguous expressions, the dataset, train-clip, the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bicm import BicmError, load_backbone
from bicm.backbone import shapes_weights
from bicm.cli import app
from bicm.data import load_dataset
from bicm.shapes.dataset import SPLITS, ensure_shapes, pick_expressions, scene_for
from bicm.shapes.world import COLOURS, SHAPES, _iou, expressions, make_scene, render


def scenes(n=150, seed=0):
    return [make_scene(np.random.default_rng([seed, i])) for i in range(n)]


def test_scenes_are_deterministic_and_follow_the_rules():
    a, b = scene_for(1, 7), scene_for(1, 7)
    assert a == b and np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    for scene in scenes():
        assert 240 <= scene.width <= 400 and 240 <= scene.height <= 400
        assert 1 <= len(scene.objects) <= 8
        for i, o in enumerate(scene.objects):
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in ("small", "large")
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert all(_iou(o.box, p.box) <= 0.05 for p in scene.objects[i + 1 :])


def test_objects_are_drawn_in_their_colour():
    scene = scene_for(1, 3)
    pixels = np.asarray(render(scene)).astype(int)
    for o in scene.objects:
        cx, cy = (int(v) for v in o.centre)
        if o.shape == "star":
            continue  # the centre of a star is filled, but keep the check to convex shapes
        assert np.abs(pixels[cy, cx] - np.array(COLOURS[o.colour])).max() < 40


def matching(scene, words):
    """Objects a description (size? colour? shape) matches."""
    shape = words[-1]
    out = []
    for i, o in enumerate(scene.objects):
        if o.shape != shape:
            continue
        if any(w in ("small", "large") and w != o.size for w in words[:-1]):
            continue
        if any(w in COLOURS and w != o.colour for w in words[:-1]):
            continue
        out.append(i)
    return out


def test_expressions_refer_unambiguously():
    kinds = set()
    for scene in scenes(200):
        for e in expressions(scene):
            kinds.add(e.kind)
            words = e.text.split()
            assert words[0] == "the"
            if e.kind in ("category", "attribute"):
                assert matching(scene, words[1:]) == list(e.targets)
            elif e.kind == "position":
                where = " ".join(words[-3:])
                group = matching(scene, words[1:-3])
                assert len(group) >= 2 and e.targets[0] in group
                t = scene.objects[e.targets[0]].centre
                others = [scene.objects[i].centre for i in group if i != e.targets[0]]
                axis, sign = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1)}[where]
                assert all(sign * (t[axis] - o[axis]) > 0 for o in others)
            else:
                number = {"two": 2, "three": 3, "four": 4}[words[1]]
                assert len(e.targets) == number
                singular = words[-1][:-2] if words[-1].endswith("sses") else words[-1][:-1]
                assert matching(scene, words[2:-1] + [singular]) == list(e.targets)
                boxes = [scene.objects[i].box for i in e.targets]
                assert e.box == (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    assert kinds == {"category", "attribute", "position", "plural"}


def test_the_test_split_has_enough_queries_of_every_type():
    seed, count, per_image = SPLITS["test"]
    total, kinds = 0, {}
    for index in range(count):
        chosen = pick_expressions(scene_for(seed, index), per_image, np.random.default_rng([seed, index, 1]))
        total += len(chosen)
        for e in chosen:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
    assert total >= 2000
    assert min(kinds.values()) >= 200, kinds


def test_dataset_on_disk_and_reader(tmp_path):
    root = ensure_shapes(tmp_path, ("test", "train"), counts={"test": 5, "train": 4})
    samples = load_dataset("shapes", "test", root, image_root=root)
    assert samples and all(s.kind in ("category", "attribute", "position", "plural") for s in samples)
    assert samples[0].image_path(root).is_file()
    queries = [json.loads(line) for line in (root / "train_queries.jsonl").read_text().splitlines()]
    images = [json.loads(line) for line in (root / "train_images.jsonl").read_text().splitlines()]
    assert len(images) == 4 and len(queries) == 4 and "box" not in queries[0]
    assert (root / "train_truth.jsonl").is_file()
    with pytest.raises(BicmError, match="unpaired"):
        load_dataset("shapes", "train", root)
    # the first images are the same as in the full split
    assert samples[0].query in [e.text for e in expressions(scene_for(SPLITS["test"][0], 0))]


def test_train_clip_is_deterministic_and_loads_like_any_checkpoint(tmp_path):
    from bicm.shapes.train import TrainConfig, train_clip

    cfg = TrainConfig(scenes=24, singles=24, steps=3, batch_size=16, threads=1, eval_pairs=16, eval_every=2, warmup=1)
    card = train_clip(cfg, tmp_path / "a" / "m.safetensors")
    train_clip(cfg, tmp_path / "b" / "m.safetensors")
    assert (tmp_path / "a" / "m.safetensors").read_bytes() == (tmp_path / "b" / "m.safetensors").read_bytes()
    assert (tmp_path / "a" / "m.curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a" / "m.json").read_text())["config"]["steps"] == 3
    assert 0 <= card["retrieval"]["image_to_text_top1"] <= 1
    backbone = load_backbone(checkpoint=tmp_path / "a" / "m.safetensors", device="cpu")
    assert backbone.spec.resize_mode == "squash" and backbone.spec.size == (64, 64)
    assert backbone.encode_text(["the red circle"]).shape == (1, 128)


def test_shipped_shapes_model():
    backbone = load_backbone("shapes", device="cpu")
    assert backbone.name == "shapes" and backbone.spec.resize_mode == "squash"
    assert backbone.vit_problem() is None
    weights = shapes_weights()
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["training_seconds"] <= 40 * 60
    assert weights.stat().st_size <= 25 * 1024 * 1024
    # it has learned the world: a single red circle is closer to "the red circle" than to the rest
    from bicm.shapes.world import single_object_image

    hits = 0
    rng = np.random.default_rng(123)
    for _ in range(20):
        image, obj = single_object_image(rng)
        names = [f"the {c} {s}" for c in COLOURS for s in SHAPES]
        sims = backbone.encode_images([image]) @ backbone.encode_text(names).T
        hits += names[int(sims.argmax())] == f"the {obj.colour} {obj.shape}"
    assert hits >= 10  # 30-way: chance is under 1 in 20


def test_demo_command(tmp_path):
    out = tmp_path / "demo.png"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and all(len(r["box"]) == 4 for r in records)
    assert out.stat().st_size > 10_000


def test_train_clip_command(tmp_path):
    out = tmp_path / "clip.safetensors"
    result = CliRunner().invoke(
        app,
        ["train-clip", "--out", str(out), "--steps", "2", "--scenes", "16", "--singles", "16", "--batch-size", "8", "--threads", "1"],
    )
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and out.with_suffix(".json").is_file() and (tmp_path / "clip.curves.png").is_file()
    assert "retrieval top-1" in result.stderr
    bad = CliRunner().invoke(app, ["train-clip", "--out", str(out), "--steps", "0"])
    assert bad.exit_code == 2 and "steps >= 1" in bad.stderr


def test_ground_with_the_shapes_model(tmp_path):
    from bicm.shapes.examples import example_image

    result = CliRunner().invoke(
        app, ["ground", str(example_image()), "the circle", "--model", "shapes", "-p", "selective-search", "--name-with", "shapes", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["proposal_source"].startswith("selective-search") and len(record["box"]) == 4
