"""Detections files: the accepted layouts, box formats, lookups and every malformed case."""

from __future__ import annotations

import json

import pytest
import torch

from bicm import BicmError, Proposals, read_detections


def write(tmp_path, content, name="dets.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_jsonl_records(tmp_path):
    lines = [
        {"image": "a.jpg", "box_format": "xyxy", "boxes": [[1, 2, 3, 4]], "scores": [0.5], "class_names": ["dog"]},
        {"image": "dir/b.jpg", "box_format": "xywh", "boxes": [[10, 10, 5, 6]]},
    ]
    path = write(tmp_path, "\n".join(json.dumps(line) for line in lines) + "\n\n", "dets.jsonl")
    dets = read_detections(path)
    a = dets.lookup("a.jpg")
    assert a.boxes.tolist() == [[1, 2, 3, 4]] and a.class_names == ["dog"] and a.scores.tolist() == [0.5]
    assert a.source == "file:dets.jsonl"
    b = dets.lookup("/data/images/b.jpg")  # matched by file name
    assert b.boxes.tolist() == [[10, 10, 15, 16]] and b.class_names is None and b.scores is None


def test_json_mapping_with_top_level_format_and_detection_lists(tmp_path):
    path = write(
        tmp_path,
        {
            "box_format": "xywh",
            "images": {
                "img1.png": {"detections": [{"box": [0, 0, 2, 2], "score": 0.9, "label": "cat"}, {"box": [1, 1, 1, 1], "score": 0.1}]},
                "img2.png": [[5, 5, 1, 1]],
            },
        },
    )
    dets = read_detections(path)
    one = dets.lookup("img1.png")
    assert one.boxes.tolist() == [[0, 0, 2, 2], [1, 1, 2, 2]]
    assert one.class_names == ["cat", None] and not one.fully_named
    assert dets.lookup("img2").boxes.tolist() == [[5, 5, 6, 6]]  # matched by stem


def test_plain_mapping_needs_a_declared_format(tmp_path):
    path = write(tmp_path, {"x.jpg": [[0, 0, 1, 1]]})
    with pytest.raises(BicmError, match="box format is not declared"):
        read_detections(path)
    assert read_detections(path, box_format="xyxy").lookup("x.jpg").boxes.tolist() == [[0, 0, 1, 1]]


def test_list_of_records_and_empty_detections(tmp_path):
    path = write(tmp_path, [{"file_name": "e.jpg", "boxes": [], "box_format": "xyxy"}])
    assert len(read_detections(path).lookup("e.jpg")) == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"image": "a", "boxes": [[1,2,3,4]]\n{"image": "b"', "line 1: not valid JSON"),
        ([{"boxes": [[1, 2, 3, 4]], "box_format": "xyxy"}], "no image name"),
        ([{"image": "a", "box_format": "xyxy"}], "no 'boxes'"),
        ([{"image": "a", "box_format": "xyxy", "boxes": [[1, 2, 3]]}], "box 0 is not 4 numbers"),
        ([{"image": "a", "box_format": "xyxy", "boxes": [[1, 2, "3", 4]]}], "box 0 is not 4 numbers"),
        ([{"image": "a", "box_format": "xyxy", "boxes": [[1, 2, 3, 4]], "scores": [1, 2]}], "1 boxes but 2 scores"),
        ([{"image": "a", "box_format": "xyxy", "boxes": [[1, 2, 3, 4]], "class_names": [3]}], "class names must be"),
        ([{"image": "a", "box_format": "cxcywh", "boxes": []}], "unknown box_format"),
        ([{"image": "a", "box_format": "xyxy", "boxes": "1,2,3,4"}], "must be a list"),
        ('[{"image": "a", "box_format": "xyxy", "boxes": [[1, 2, Infinity, 4]]}]', "non-finite"),
        ([{"image": "a", "box_format": "xyxy", "boxes": []}, {"image": "a", "box_format": "xyxy", "boxes": []}], "appears twice"),
        ("42", "expected a JSON object or list"),
        (
            [{"image": "a", "box_format": "xyxy", "detections": [{"box": [1, 2, 3, 4], "score": 1}, {"box": [1, 2, 3, 4]}]}],
            "some detections have a 'score'",
        ),
        ({}, "holds no images"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    with pytest.raises(BicmError, match=message):
        read_detections(write(tmp_path, content))


def test_missing_file_and_unknown_image(tmp_path):
    with pytest.raises(BicmError, match="not found"):
        read_detections(tmp_path / "none.json")
    dets = read_detections(write(tmp_path, {"box_format": "xyxy", "images": {"a.jpg": []}}))
    with pytest.raises(BicmError, match="no detections for z.jpg"):
        dets.lookup("z.jpg")


def test_proposals_type_checks():
    with pytest.raises(BicmError, match="shape"):
        Proposals(torch.zeros(3, 5))
    with pytest.raises(BicmError, match="NaN"):
        Proposals(torch.tensor([[0.0, 0.0, float("nan"), 1.0]]))
    with pytest.raises(BicmError, match="2 proposal boxes but 1 class names"):
        Proposals(torch.zeros(2, 4), class_names=["a"])
    p = Proposals.from_xywh([[1, 2, 3, 4]], class_names=[""])
    assert p.boxes.tolist() == [[1, 2, 4, 6]] and p.class_names is None
    cleaned = Proposals(torch.tensor([[-5.0, 0, 50, 50], [10, 10, 10.5, 20]])).sanitize(40, 30)
    assert cleaned.n_clipped == 1 and cleaned.n_dropped == 1
    assert cleaned.proposals.boxes.tolist() == [[0, 0, 40, 30]]
