"""Resource bounds: huge images are downscaled to a working size (boxes stay in ORIGINAL
pixels), absurd ones refused; thousands of proposals are capped."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Optional

import pytest
import torch
from PIL import Image, ImageDraw

from bicm import BiCMConfig, BicmError, Grounder, Proposals
from bicm.config import DEFAULT_MAX_PROPOSALS, DEFAULT_WORK_PIXELS, Needs
from bicm.imageio import DEFAULT_MAX_PIXELS, load_image
from bicm.proposals.sources import ProposalSource, make_source

from .helpers import SCENE_BOXES, bomb_png, draw_scene, make_backbone


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


class QuarterSource(ProposalSource):
    """A computed source: the middle quarter of whatever image it is shown (its own pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    @property
    def id(self) -> str:
        return "quarter"

    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        self.seen.append(image.size)
        w, h = image.size
        return Proposals(torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0.0, 0.0, w / 2, h / 2]]), class_names=["a", "b"])


def test_defaults_are_documented_values():
    assert DEFAULT_WORK_PIXELS == BiCMConfig().max_pixels == 16_000_000
    assert DEFAULT_MAX_PROPOSALS == BiCMConfig().max_proposals == 1000
    assert DEFAULT_MAX_PIXELS > 100_000_000  # a 100-megapixel photo loads, then is downscaled
    with pytest.raises(BicmError, match="max_pixels"):
        BiCMConfig(max_pixels=0)
    with pytest.raises(BicmError, match="max_proposals"):
        BiCMConfig(max_proposals=-1)


@pytest.mark.parametrize("components", [("qam", "com", "sf"), ("qam",), ("com",)])
def test_a_downscaled_image_gives_boxes_in_original_pixels(backbone, components):
    image = draw_scene(640, 480)  # 307,200 pixels
    boxes = [[40.0, 60.0, 182.0, 202.0], [400.0, 240.0, 562.0, 402.0], [0.0, 0.0, 640.0, 480.0]]
    full = Grounder(backbone, BiCMConfig(components=components))
    small = Grounder(backbone, BiCMConfig(components=components, max_pixels=160 * 120))
    with pytest.warns(UserWarning, match="downscaled to 160x120"):
        features = small.extract(image, ["a red square"], boxes)
    assert features.scale == (4.0, 4.0)
    assert features.proposals.boxes.tolist() == boxes  # proposals stay in original pixels
    [result] = small.score(features)
    [reference] = full.ground_many(image, ["a red square"], boxes)
    assert result.image_size == reference.image_size == (640, 480)
    n = len(boxes) if "com" in components else 0
    assert result.candidates.boxes[:n].tolist() == boxes[:n]  # exactly the boxes given
    for box in [result.box, result.qam_box, result.view_box, *result.candidates.boxes.tolist()]:
        if box is not None:
            assert 0 <= box[0] < box[2] <= 640 and 0 <= box[1] < box[3] <= 480, box
    if "qam" in components:
        assert result.attention.shape == (120, 160)  # maps at the working size
        assert result.view_box == pytest.approx(reference.view_box, abs=4.0)
        x1, y1, x2, y2 = result.qam_box  # a QAM box on the 160x120 image, in 640x480 pixels: multiples of 4
        assert all(v % 4 == 0 for v in (x1, y1, x2, y2))
    if "com" in components and "qam" not in components:
        assert result.box in [tuple(b) for b in boxes]


def test_computed_proposals_run_on_the_working_image_and_come_back_in_original_pixels(backbone):
    image = draw_scene(800, 600)
    source = QuarterSource()
    grounder = Grounder(backbone, BiCMConfig(max_pixels=200 * 150))
    with pytest.warns(UserWarning, match="downscaled"):
        [result] = grounder.ground_many(image, ["a thing"], source)
    assert source.seen == [(200, 150)]
    assert result.candidates.boxes[0].tolist() == pytest.approx([200.0, 150.0, 600.0, 450.0])
    assert result.candidates.boxes[1].tolist() == pytest.approx([0.0, 0.0, 400.0, 300.0])


def test_file_proposals_are_taken_in_original_pixels(backbone, tmp_path):
    image = draw_scene(640, 480)
    image.save(tmp_path / "img.png")
    (tmp_path / "dets.json").write_text(json.dumps({"box_format": "xyxy", "images": {"img.png": SCENE_BOXES}}))
    grounder = Grounder(backbone, BiCMConfig(max_pixels=160 * 120))
    with pytest.warns(UserWarning, match="downscaled"):
        [result] = grounder.ground_many(tmp_path / "img.png", ["a thing"], make_source(str(tmp_path / "dets.json")))
    assert result.candidates.boxes[: len(SCENE_BOXES)].tolist() == SCENE_BOXES


def test_ten_thousand_proposals_are_capped_to_the_highest_scoring(backbone):
    generator = torch.Generator().manual_seed(0)
    size = torch.tensor([320.0, 240.0])  # draw_scene()'s
    xy = torch.rand(10_000, 2, generator=generator) * 150
    wh = 8 + torch.rand(10_000, 2, generator=generator) * 80
    boxes = torch.cat([xy, torch.minimum(xy + wh, size)], dim=1)
    scores = torch.rand(10_000, generator=generator)
    grounder = Grounder(backbone, BiCMConfig(max_proposals=300))
    with pytest.warns(UserWarning, match="10000 proposals are more than max_proposals / --max-proposals = 300; kept the 300 highest"):
        features = grounder.extract(draw_scene(), ["a thing"], Proposals(boxes, scores=scores), needs=Needs())
    kept = features.proposals
    assert len(kept) == 300
    assert sorted(kept.scores.tolist(), reverse=True) == torch.sort(scores, descending=True).values[:300].tolist()
    index = torch.nonzero(torch.isin(scores, kept.scores)).flatten()
    assert torch.equal(kept.boxes, boxes[index])  # original order kept
    with pytest.warns(UserWarning, match="kept the 300 first"):
        features = grounder.extract(draw_scene(), ["a thing"], Proposals(boxes), needs=Needs())
    assert torch.equal(features.proposals.boxes, boxes[:300])


def test_cli_with_ten_thousand_proposals_uses_the_default_cap(tmp_path, tiny_checkpoint):
    from typer.testing import CliRunner

    from bicm.cli import app

    draw_scene().save(tmp_path / "img.png")
    boxes = [[float(i % 300), float(i % 200), float(i % 300 + 20), float(i % 200 + 40)] for i in range(10_000)]
    (tmp_path / "dets.json").write_text(json.dumps({"box_format": "xyxy", "images": {"img.png": boxes}}))
    result = CliRunner().invoke(
        app, ["ground", str(tmp_path / "img.png"), "a thing", "-c", str(tiny_checkpoint), "-p", str(tmp_path / "dets.json"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert "kept the 1000 first" in result.stderr
    record = json.loads(result.stdout)
    assert len(record["candidates"]) == 1001  # 1000 proposals + QAM's box


@pytest.mark.slow
def test_a_100_megapixel_image_is_downscaled_in_bounded_memory(tmp_path, tiny_checkpoint):
    big = Image.new("RGB", (10_000, 10_000), (40, 140, 60))
    ImageDraw.Draw(big).rectangle((2000, 3000, 4999, 5999), fill=(220, 30, 30))
    big.save(tmp_path / "big.png", compress_level=1)
    del big
    boxes = [[2000.0, 3000.0, 5000.0, 6000.0], [7000.5, 100.25, 9999.0, 9000.0]]
    (tmp_path / "dets.json").write_text(json.dumps({"box_format": "xyxy", "images": {"big.png": boxes}}))
    script = (
        "import sys\nfrom bicm.cli import main\nsys.argv = ['bicm'] + sys.argv[1:]\n"
        "try:\n    main()\nfinally:\n"
        # VmHWM: this process's own peak resident memory (kB). Not ru_maxrss: Linux carries it over
        # exec from the parent, so under a big pytest process it reports pytest's peak.
        "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "    print('maxrss', hwm, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "ground", "big.png", "the red square", "the green field", "-c", str(tiny_checkpoint),
         "-p", "dets.json", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "downscaled to 4000x4000" in done.stderr and "Traceback" not in done.stderr
    for line in done.stdout.splitlines():
        record = json.loads(line)
        assert record["image_size"] == [10_000, 10_000]
        assert [c["box"] for c in record["candidates"][:2]] == boxes
        for c in record["candidates"]:
            assert 0 <= c["box"][0] < c["box"][2] <= 10_000 and 0 <= c["box"][1] < c["box"][3] <= 10_000
    peak_mb = int(done.stderr.split("maxrss")[-1]) / 1024
    print(f"100-MP ground: peak memory {peak_mb:.0f} MB")
    assert peak_mb < 3000, f"peak memory {peak_mb:.0f} MB"


def test_beyond_the_hard_cap_is_one_clear_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(20_000, 10_000))  # 200 MP claimed, a few bytes stored
    with pytest.raises(BicmError, match="more than the limit"):
        load_image(tmp_path / "bomb.png")  # refused from the header: nothing is decoded
