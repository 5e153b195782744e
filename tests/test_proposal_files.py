"""Detections file formats: round trips, the bottom-up TSV layouts, resumable appends, CLI."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bicm import BicmError, BicmWarning, Proposals
from bicm.proposals.files import DetectionsAppender, read_proposals_file, write_detections
from bicm.proposals.naming import Vocabulary
from bicm.proposals.formats import detect_format, read_bottom_up_tsv, write_bottom_up_tsv, write_reclip

from .helpers import draw_scene, run


def entries():
    return {
        "COCO_train2014_000000581857.jpg": Proposals(
            torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.5, 1.5, 30.25, 40.0]]),
            scores=[0.9, 0.4],
            class_names=["man", "window"],
            name_scores=[0.6, 0.2],
            meta={"image_size": [640, 480]},
        ),
        "COCO_train2014_000000000042.jpg": Proposals(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), meta={"image_size": [5, 5]}),
    }


def same(a: Proposals, b: Proposals, names=True, scores=True):
    assert torch.allclose(a.boxes, b.boxes, atol=0.01)
    if scores:
        assert (a.scores is None) == (b.scores is None)
        if a.scores is not None:
            assert torch.allclose(a.scores, b.scores, atol=1e-4)
    if names:
        assert a.class_names == b.class_names


def test_bicm_jsonl_round_trip(tmp_path):
    path = write_detections(tmp_path / "d.jsonl", entries())
    back = read_proposals_file(path)
    for key, original in entries().items():
        got = back.lookup(key)
        same(original, got)
        if original.name_scores is not None:
            assert torch.allclose(got.name_scores, original.name_scores)
        assert got.meta["image_size"] == original.meta["image_size"]


def test_reclip_round_trip_and_layouts(tmp_path):
    path = write_reclip(tmp_path / "dets.json", entries())
    assert detect_format(path) == "reclip"
    raw = json.loads(path.read_text())
    assert set(raw) == {"581857", "42"}
    assert raw["581857"]["boxes"][0] == [10.0, 20.0, 100.0, 200.0]  # xywh on disk
    back = read_proposals_file(path)
    same(entries()["COCO_train2014_000000581857.jpg"], back.lookup("COCO_train2014_000000581857.jpg"), names=False)
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"image_id": 7, "box": [1, 1, 2, 2]}, {"image_id": 7, "box": [0, 0, 1, 1]}]))
    assert detect_format(records) == "reclip"
    assert read_proposals_file(records).lookup("COCO_val2014_000000000007.jpg").boxes.tolist() == [
        [1, 1, 3, 3],
        [0, 0, 1, 1],
    ]


def test_tsv_round_trip_lxmert_layout(tmp_path):
    path = write_bottom_up_tsv(tmp_path / "feats.tsv", entries())
    assert detect_format(path) == "tsv"
    back = read_proposals_file(path)
    first = back.lookup("COCO_train2014_000000581857.jpg")
    same(entries()["COCO_train2014_000000581857.jpg"], first)
    assert first.meta["image_size"] == [640, 480]
    row = path.read_text().splitlines()[0].split("\t")
    assert len(row) == 10 and row[1] == "480" and row[2] == "640"  # img_h before img_w


def original_row(image_id, width, height, boxes, features_dim=8):
    boxes = np.asarray(boxes, dtype=np.float32)
    features = np.random.default_rng(0).random((len(boxes), features_dim)).astype(np.float32)
    fields = [str(image_id), str(width), str(height), str(len(boxes))]
    fields += [base64.b64encode(boxes.tobytes()).decode(), base64.b64encode(features.tobytes()).decode()]
    return "\t".join(fields)


def test_tsv_original_layout_written_by_hand(tmp_path):
    path = tmp_path / "trainval.tsv"
    path.write_text(original_row(1000, 500, 375, [[0, 0, 10, 10], [5.5, 6.5, 400, 300]]) + "\n" + original_row(1001, 50, 50, []) + "\n")
    back = read_bottom_up_tsv(path)
    got = back.lookup("1000.jpg")
    assert got.boxes.tolist() == [[0, 0, 10, 10], [5.5, 6.5, 400, 300]]
    assert got.class_names is None and got.meta["image_size"] == [500, 375]
    assert len(back.lookup("1001")) == 0


def test_tsv_class_ids_offsets_and_bad_rows(tmp_path):
    n = 3
    ids = np.array([0, 1599, 1600], dtype=np.int64)
    conf = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    boxes = np.array([[0, 0, 5, 5]] * n, dtype=np.float32)
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    row = ["9", "100", "100", b64(ids), b64(conf), "", "", str(n), b64(boxes), ""]
    path = tmp_path / "lx.tsv"
    path.write_text("\t".join(row) + "\n")
    with pytest.warns(BicmWarning, match="class ids outside"):
        got = read_bottom_up_tsv(path).lookup("9")
    last = Vocabulary.load("vg1600").names[-1]
    assert got.class_names == ["man", last, None]
    assert torch.allclose(got.scores, torch.tensor(conf))
    with pytest.warns(BicmWarning):
        shifted = read_bottom_up_tsv(path, class_offset=1).lookup("9")
    assert shifted.class_names == [None, Vocabulary.load("vg1600").names[-2], last]
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(BicmError, match="3 fields"):
        read_bottom_up_tsv(bad)
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text(original_row(5, 10, 10, [[0, 0, 1, 1]]).replace("\t1\t", "\t2\t", 1) + "\n")
    with pytest.raises(BicmError, match="expected 4 x 2"):
        read_bottom_up_tsv(wrong)
    outside = tmp_path / "outside.tsv"
    outside.write_text(original_row(6, 10, 10, [[0, 0, 50, 50]]) + "\n")
    with pytest.warns(BicmWarning, match="outside the recorded 10x10"):
        read_bottom_up_tsv(outside)


def test_appender_resumes_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "run.jsonl"
    with DetectionsAppender(path) as out:
        for key, p in entries().items():
            out.add(key, p)
    with open(path, "a") as handle:
        handle.write('{"image": "half-writ')  # a crash in the middle of a record
    again = DetectionsAppender(path)
    assert again.done == set(entries())
    again.add("third.jpg", Proposals(torch.tensor([[0.0, 0.0, 1.0, 1.0]])))
    again.close()
    assert len(read_proposals_file(path)) == 3


# ---------------------------------------------------------------------------------------
# CLI: extract (resumable, bad images skipped) and convert
# ---------------------------------------------------------------------------------------
def test_extract_skips_bad_images_and_resumes(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    draw_scene().save(folder / "a.png")
    draw_scene(200, 160).save(folder / "sub" / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "props.jsonl"
    first = run("proposals", "extract", folder, "-o", out, "--top-n", "5")
    assert first.exit_code == 0, first.stderr
    assert "1 image(s) skipped" in first.stderr and "broken.png" in first.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in lines) == ["a.png", "sub/b.jpg"]
    assert all(len(r["boxes"]) <= 5 and r["source"].startswith("selective-search") for r in lines)
    Image.new("RGB", (90, 90), (1, 2, 3)).save(folder / "broken.png")  # fixed: a rerun does only that one
    second = run("proposals", "extract", folder, "-o", out, "--top-n", "5")
    assert second.exit_code == 0 and "2 of 3 images already" in second.stderr
    assert len(out.read_text().splitlines()) == 3


def test_extract_with_naming(tmp_path, tiny_checkpoint):
    draw_scene().save(tmp_path / "a.png")
    out = tmp_path / "named.jsonl"
    result = run("proposals", "extract", tmp_path / "a.png", "-o", out, "--name-with", "coco80", "-c", tiny_checkpoint)
    assert result.exit_code == 0, result.stderr
    record = json.loads(out.read_text())
    assert len(record["class_names"]) == len(record["boxes"]) == len(record["name_scores"])


def test_convert_between_formats(tmp_path):
    src = write_detections(tmp_path / "in.jsonl", entries())
    assert run("proposals", "convert", src, tmp_path / "out.tsv").exit_code == 0
    assert run("proposals", "convert", tmp_path / "out.tsv", tmp_path / "back.jsonl").exit_code == 0
    assert run("proposals", "convert", tmp_path / "back.jsonl", tmp_path / "r.json", "--to", "reclip").exit_code == 0
    back = read_proposals_file(tmp_path / "back.jsonl")
    same(entries()["COCO_train2014_000000581857.jpg"], back.lookup("COCO_train2014_000000581857.jpg"))
    assert read_proposals_file(tmp_path / "r.json").lookup("42").boxes.tolist() == [[1, 2, 3, 4]]
    missing = run("proposals", "convert", tmp_path / "nope.json", tmp_path / "x.jsonl")
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_ground_with_selective_search_and_vg1600_names(tmp_path, tiny_checkpoint):
    """The issue's done-when command."""
    image = tmp_path / "img.png"
    draw_scene().save(image)
    result = run("ground", image, "the red square", "--checkpoint", tiny_checkpoint, "--proposals", "selective-search", "--name-with", "vg1600", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["proposal_source"].startswith("selective-search")
    assert len(record["candidates"]) >= 2 and all(c["class_name"] for c in record["candidates"])
    assert all(c["s_cq"] is not None for c in record["candidates"])


@pytest.mark.parametrize("depth", [0, 2])
def test_extract_with_images_prepared_ahead_writes_the_same_file(tmp_path, monkeypatch, depth):
    """proposals extract prepares images ahead where the model is on a GPU (prefetch.default_depth);
    forced on here, the file is the same, and a bad image is still skipped with its reason."""
    import bicm.prefetch

    monkeypatch.setattr(bicm.prefetch, "default_depth", lambda device: depth)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(120, 90), (200, 160), (90, 120)]):
        draw_scene(*size).save(folder / f"{i}.png")
    (folder / "3-broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / f"props-{depth}.jsonl"
    done = run("proposals", "extract", folder, "-o", out, "--top-n", "5")
    assert done.exit_code == 0, done.stderr
    assert "3-broken.png" in done.stderr and "1 image(s) skipped" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == ["0.png", "1.png", "2.png"]
    boxes = [r["boxes"] for r in records]
    assert all(1 <= len(b) <= 5 for b in boxes)
    # the same boxes as the images computed one after the other, inline
    monkeypatch.setattr(bicm.prefetch, "default_depth", lambda device: 0)
    inline = tmp_path / "inline.jsonl"
    assert run("proposals", "extract", folder, "-o", inline, "--top-n", "5").exit_code == 0
    assert [json.loads(line)["boxes"] for line in inline.read_text().splitlines()] == boxes
