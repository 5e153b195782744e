"""Proposal sources: selective search, Faster R-CNN plumbing, CLIP naming, oracle, registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from bicm import BicmError, Grounder, Proposals
from bicm.proposals.naming import ClipNamer, Vocabulary
from bicm.proposals.selective import SelectiveSearch
from bicm.proposals.sources import ORACLE_ID, ProposalSource, available_sources, make_source

from .helpers import SCENE_BOXES, draw_scene, make_backbone

OBJECTS = [  # (shape, box, colour) on a noisy background
    ("rect", (30, 40, 110, 120), (220, 40, 40)),
    ("ellipse", (300, 60, 380, 140), (40, 70, 220)),
    ("rect", (150, 200, 260, 260), (240, 220, 40)),
    ("ellipse", (60, 220, 120, 280), (200, 60, 200)),
    ("rect", (330, 220, 370, 290), (250, 250, 250)),
]


def busy_scene() -> Image.Image:
    rng = np.random.default_rng(3)
    noise = rng.normal(100, 12, (320, 420, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    for shape, box, colour in OBJECTS:
        (draw.rectangle if shape == "rect" else draw.ellipse)(box, fill=colour)
    return image


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_selective_search_finds_every_drawn_object(mode):
    source = SelectiveSearch(mode=mode, top_n=100)
    found = source(busy_scene(), "busy.png")
    assert 0 < len(found) <= 100
    assert found.source.startswith("selective-search(mode=" + mode)
    truth = torch.tensor([[x1, y1, x2 + 1, y2 + 1] for _, (x1, y1, x2, y2), _ in OBJECTS], dtype=torch.float32)
    best = box_iou(truth, found.boxes).max(dim=1).values
    assert (best > 0.5).all(), best
    w = found.boxes[:, 2] - found.boxes[:, 0]
    assert (w >= 10).all() and (found.boxes[:, 2] <= 420).all() and (found.boxes[:, 3] <= 320).all()


def test_selective_search_is_deterministic_and_capped():
    a = SelectiveSearch(top_n=5).propose(busy_scene())
    b = SelectiveSearch(top_n=5).propose(busy_scene())
    assert len(a) == 5 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    assert (a.scores[:-1] >= a.scores[1:]).all()  # ranked by support
    # near-duplicates are suppressed
    iou = box_iou(a.boxes, a.boxes) - torch.eye(5)
    assert iou.max() < 0.7
    with pytest.raises(BicmError, match="fast or quality"):
        SelectiveSearch(mode="slow")


def test_sources_cache_per_image():
    class Counting(ProposalSource):
        calls = 0

        @property
        def id(self):
            return "counting"

        def propose(self, image, key=None):
            Counting.calls += 1
            return Proposals(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), source=self.id)

    source = Counting()
    image = draw_scene()
    first = source(image, "a.png")
    assert source(image, "a.png") is first and Counting.calls == 1
    source(draw_scene(200, 100), "a.png")
    assert Counting.calls == 2
    assert first.meta["image_size"] == [320, 240]


def test_registry():
    assert {"selective-search", "faster-rcnn"} <= set(available_sources())
    source = make_source("selective-search", top_n=7, score_floor=0.3, checkpoint=None)  # other sources' options ignored
    assert isinstance(source, SelectiveSearch) and source.top_n == 7
    with pytest.raises(BicmError, match="unknown proposal source 'sift'"):
        make_source("sift")


# ---------------------------------------------------------------------------------------
# Faster R-CNN: plumbing with random weights saved in torchvision's format
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_detector_file(tmp_path_factory):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("det") / "frcnn.pth"
    torch.save(model.state_dict(), path)
    return path


def test_faster_rcnn_with_a_local_checkpoint(random_detector_file):
    source = make_source(
        "faster-rcnn", arch="fasterrcnn_mobilenet_v3_large_320_fpn", checkpoint=random_detector_file, score_floor=0.0, top_n=20, device="cpu"
    )
    found = source(draw_scene(), "scene.png")
    assert 0 < len(found) <= 20
    assert found.scores is not None and (found.scores >= 0).all()
    assert (found.boxes[:, 2] <= 320 + 1e-3).all() and (found.boxes[:, 3] <= 240 + 1e-3).all()
    coco = set(Vocabulary.load("coco80").names)
    assert all(name is None or name in coco for name in found.class_names)
    assert "weights=file:frcnn.pth" in found.source


def test_faster_rcnn_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BicmError, match="--detector-checkpoint"):
        make_source("faster-rcnn", arch="fasterrcnn_mobilenet_v3_large_320_fpn", device="cpu")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(BicmError, match="cannot load detector checkpoint"):
        make_source("faster-rcnn", arch="fasterrcnn_mobilenet_v3_large_320_fpn", checkpoint=bad, device="cpu")
    with pytest.raises(BicmError, match="unknown detector"):
        make_source("faster-rcnn", arch="yolo")


# ---------------------------------------------------------------------------------------
# Naming by CLIP
# ---------------------------------------------------------------------------------------
def test_vocabularies(tmp_path):
    vg = Vocabulary.load("vg1600")
    assert len(vg) == 1600 and vg.names[:3] == ("man", "window", "tree")
    assert len(Vocabulary.load("coco80")) == 80
    custom = tmp_path / "mine.txt"
    custom.write_text("sofa,couch\n\ncat\n")
    assert Vocabulary.load(custom).names == ("sofa", "cat")
    with pytest.raises(BicmError, match="unknown vocabulary"):
        Vocabulary.load("imagenet")


def test_clip_namer_names_every_box():
    backbone = make_backbone()
    namer = ClipNamer(backbone, "coco80")
    proposals = Proposals(torch.tensor(SCENE_BOXES))
    named = namer.name(proposals, draw_scene())
    assert named.fully_named and all(n in namer.vocabulary.names for n in named.class_names)
    assert named.name_scores.shape == (3,) and ((named.name_scores > 0) & (named.name_scores <= 1)).all()
    # the name is the zero-shot argmax
    crops = backbone.encode_images([draw_scene().crop(tuple(int(v) for v in b)) for b in SCENE_BOXES])
    logits = crops @ namer.text_features.T
    assert named.class_names == [namer.vocabulary.names[i] for i in logits.argmax(1).tolist()]


def test_grounder_names_unnamed_proposals_without_encoding_crops_twice(monkeypatch):
    import bicm.encoder as encoder

    backbone = make_backbone()
    grounder = Grounder(backbone, name_with=ClipNamer(backbone, "coco80"))
    calls = []
    real = encoder.encode_crops
    monkeypatch.setattr(encoder, "encode_crops", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    r = grounder.ground(draw_scene(), "a red square", SCENE_BOXES)
    assert r.candidates.s_cq is not None and all(r.candidates.class_names)
    assert any("named by CLIP over coco80" in n for n in r.notes)
    assert calls.count(3) == 1  # the 3 proposal crops: once for naming and S_PQ together


def test_oracle_is_labelled_everywhere(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"box_format": "xyxy", "images": {"scene.png": SCENE_BOXES}}))
    source = make_source(f"oracle:{gt}")
    found = source(draw_scene(), "scene.png")
    assert found.source == ORACLE_ID and found.is_oracle
    r = Grounder(make_backbone()).ground(draw_scene(), "a red square", found)
    assert r.proposal_source == ORACLE_ID
    assert any(n.startswith("ORACLE") for n in r.notes)
    assert r.to_dict()["proposal_source"] == ORACLE_ID
