"""Dataset readers: real TransVG split files (from ../shared/data, skipped when absent), the
refer-API format and raw Flickr30K Entities on small synthetic files in the real layouts, the
image check, and the refusal of pickles that ask for code."""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bicm.data import (
    DATASETS,
    GroundingSample,
    check_images,
    load_dataset,
    read_flickr30k_entities,
    read_refer,
    read_transvg_split,
    to_xyxy,
    union_box,
)
from bicm.data._pickle import load_pickle, load_torch_file
from bicm.data.flickr30k import parse_annotation_xml, parse_sentence
from bicm.data.transvg import parse_split_name
from bicm.errors import BicmError, BicmWarning

from .helpers import SHARED_DATA

SPLITS_DIR = SHARED_DATA / "transvg-splits"
FLICKR_LISTS = SHARED_DATA / "flickr30k-entities"

# file -> (entries, images, largest image side of the dataset)
REAL_SPLITS = {
    "flickr_test": (14481, 999, 500),
    "flickr_val": (14433, 1000, 500),
    "referit_val": (5842, 1000, 480),
    "gref_umd_val": (4896, 1300, 640),
    "unc_val": (10834, 1500, 640),
    "unc_testA": (5657, 750, 640),
    "unc_testB": (5095, 750, 640),
}


# ----------------------------------------------------------------------------------------
# real TransVG split files


@pytest.fixture(scope="module")
def real_splits() -> dict[str, list[GroundingSample]]:
    missing = [n for n in REAL_SPLITS if not (SPLITS_DIR / f"{n}.pth").is_file()]
    if missing:
        pytest.skip(f"real TransVG split files absent from {SPLITS_DIR} ({', '.join(missing)})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BicmWarning)  # the real files drop nothing
        return {n: read_transvg_split(SPLITS_DIR / f"{n}.pth") for n in REAL_SPLITS}


@pytest.mark.parametrize("name", list(REAL_SPLITS))
def test_real_split_counts(real_splits, name):
    samples = real_splits[name]
    entries, images, _ = REAL_SPLITS[name]
    assert len(samples) == entries
    assert len({s.image_file for s in samples}) == images
    assert len({s.image_id for s in samples}) == images
    assert len({s.sample_id for s in samples}) == entries
    assert samples[0].sample_id == f"{name}:0" and samples[-1].sample_id == f"{name}:{entries - 1}"


@pytest.mark.parametrize("name", list(REAL_SPLITS))
def test_real_split_boxes(real_splits, name):
    side = REAL_SPLITS[name][2]
    boxes = np.array([s.box for s in real_splits[name]])
    assert boxes.shape == (REAL_SPLITS[name][0], 4)
    assert np.isfinite(boxes).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), "degenerate box"
    assert (boxes >= 0).all()
    assert (boxes[:, 2:] <= side).all(), f"box beyond the {side} px longest image side"
    for s in real_splits[name][:50]:
        assert s.boxes == (s.box,) and s.query == s.query.strip() and s.query


def test_real_flickr_coordinates_become_zero_based(real_splits):
    """The files store 1-based inclusive pixels (min 1, max 500); bicm's edges run 0..500."""
    for name in ("flickr_test", "flickr_val"):
        boxes = np.array([s.box for s in real_splits[name]])
        assert boxes[:, :2].min() == 0 and boxes[:, 2:].max() == 500
    raw = load_torch_file(SPLITS_DIR / "flickr_test.pth")
    assert isinstance(raw[0][1], np.ndarray) and raw[0][1].dtype == np.float32
    assert real_splits["flickr_test"][0].box == tuple(float(v) for v in raw[0][1] - np.array([1, 1, 0, 0]))
    stored = np.stack([e[1] for e in raw])
    assert stored[:, :2].min() == 1 and stored[:, 2:].max() == 500


def test_real_referit_and_coco_conventions(real_splits):
    referit = np.array([s.box for s in real_splits["referit_val"]])
    assert referit[:, :2].min() == 0 and referit[:, 2].max() == 480  # stored x2 <= 479: inclusive
    raw = load_torch_file(SPLITS_DIR / "unc_val.pth")[0]
    x, y, w, h = raw[2]
    assert real_splits["unc_val"][0].box == (x, y, x + w, y + h)
    assert real_splits["unc_val"][0].image_file == "COCO_train2014_000000000716.jpg"
    assert real_splits["unc_val"][0].image_id == "716"


def test_real_flickr_test_images_match_the_official_split(real_splits):
    split_list = FLICKR_LISTS / "test.txt"
    if not split_list.is_file():
        pytest.skip(f"official Flickr30K Entities split list {split_list} absent")
    listed = [line.strip() for line in split_list.read_text().splitlines() if line.strip()]
    ids = {s.image_id for s in real_splits["flickr_test"]}
    assert len(listed) == 1000
    assert ids <= set(listed)
    assert ids == set(listed) - {"4797050581"}
    assert all(s.image_file == f"{s.image_id}.jpg" for s in real_splits["flickr_test"])


def test_real_files_through_load_dataset_and_convention_override(real_splits):
    if not SPLITS_DIR.is_dir():
        pytest.skip(f"{SPLITS_DIR} absent")
    assert load_dataset("unc", "testB", SPLITS_DIR) == real_splits["unc_testB"]
    assert load_dataset("unc", "testB", SPLITS_DIR / "unc_testB.pth") == real_splits["unc_testB"]
    as_is = load_dataset("flickr", "test", SPLITS_DIR, box_convention="xyxy")
    assert as_is[0].box == tuple(float(v) for v in load_torch_file(SPLITS_DIR / "flickr_test.pth")[0][1])
    with pytest.raises(BicmError, match="holds unc testB, not unc testA"):
        load_dataset("unc", "testA", SPLITS_DIR / "unc_testB.pth")
    with pytest.raises(BicmError, match=r"unknown split 'test' for 'unc'; choose one of train, val, trainval, testA"):
        load_dataset("unc", "test", SPLITS_DIR)
    with pytest.raises(BicmError, match="split file .*referit_test.pth does not exist"):
        load_dataset("referit", "test", SPLITS_DIR)


# ----------------------------------------------------------------------------------------
# safe unpickling


class _Evil:
    """Pickles as a call of os.system (what a malicious annotation file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_entries(marker: Path) -> list:
    return [("a.jpg", np.array([1.0, 1.0, 5.0, 5.0], dtype=np.float32), "ok"), ("b.jpg", _Evil(marker), "bad")]


@pytest.mark.parametrize("container", ["legacy", "zip", "zip-with-tensors", "plain"])
def test_pickle_asking_for_code_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "unc_val.pth"
    entries = _evil_entries(marker)
    if container == "legacy":
        torch.save(entries, path, _use_new_zipfile_serialization=False)
    elif container == "zip":
        torch.save(entries, path)
    elif container == "zip-with-tensors":  # takes the torch.load(weights_only=True) path
        torch.save([("c.jpg", "m.pth", torch.tensor([1.0, 2.0, 3.0, 4.0]), "t", [])] + entries, path)
    else:
        path.write_bytes(pickle.dumps(entries, protocol=2))
    with pytest.raises(BicmError, match=r"refusing to read .*unc_val.pth: it asks for posix\.system") as info:
        read_transvg_split(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_refs_pickle_asking_for_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"split": "val", "x": _Evil(marker)}], protocol=2))
    with pytest.raises(BicmError, match=r"refusing to read .*refs\(unc\).p: it asks for posix\.system"):
        read_refer(tmp_path, "val")
    assert not marker.exists()
    # numpy is not on the refs allow-list: refs files hold builtins only
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps([np.zeros(2)]))
    with pytest.raises(BicmError, match=r"asks for numpy"):
        read_refer(tmp_path, "val", "umd")
    (tmp_path / "eval.p").write_bytes(b"\x80\x02c__builtin__\neval\nq\x00X\x04\x00\x00\x001+1q\x01\x85q\x02Rq\x03.")
    with pytest.raises(BicmError, match=r"asks for __builtin__\.eval"):
        load_pickle(tmp_path / "eval.p")


def test_torch_files_with_numpy_and_tensors_load(tmp_path):
    entries = [
        ("a.jpg", np.array([1, 2, 11, 12], dtype=np.float32), "one"),
        ("b.jpg", "b.pth", torch.tensor([0.0, 0.0, 4.0, 5.0]), "two", []),
        ("c.jpg", "c.pth", [np.float64(1.0), 2, 3, 4], "three", []),
    ]
    for kwargs in ({}, {"_use_new_zipfile_serialization": False}):
        path = tmp_path / "unc+_testB.pth"
        torch.save(entries, path, **kwargs)
        samples = read_transvg_split(path)
        assert [s.box for s in samples] == [(1.0, 2.0, 12.0, 14.0), (0.0, 0.0, 4.0, 5.0), (1.0, 2.0, 4.0, 6.0)]
        assert [s.sample_id for s in samples] == ["unc+_testB:0", "unc+_testB:1", "unc+_testB:2"]


def test_broken_split_files(tmp_path):
    bad = tmp_path / "unc_val.pth"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(BicmError, match="not a readable pickle"):
        read_transvg_split(bad)
    with pytest.raises(BicmError, match="does not exist"):
        read_transvg_split(tmp_path / "unc_testA.pth")
    torch.save({"a": 1}, bad)
    with pytest.raises(BicmError, match="holds a dict, not a list"):
        read_transvg_split(bad)
    torch.save([("a.jpg", [1, 2, 3], "x")], bad)
    with pytest.raises(BicmError, match="entry 0: the box must be 4 numbers"):
        read_transvg_split(bad)
    torch.save([("a.jpg", "m", [1, 2, 3, 4], "x", [])], tmp_path / "mystery.pth")
    with pytest.raises(BicmError, match="cannot tell the dataset of mystery.pth"):
        read_transvg_split(tmp_path / "mystery.pth")
    assert read_transvg_split(tmp_path / "mystery.pth", "gref")[0].box == (1.0, 2.0, 4.0, 6.0)


def test_degenerate_and_empty_entries_are_dropped_with_a_warning(tmp_path):
    path = tmp_path / "gref_val.pth"
    torch.save([("a.jpg", "m", [1, 2, 0, 4], "x", []), ("a.jpg", "m", [1, 2, 3, 4], "  ", []),
                ("a.jpg", "m", [1, 2, 3, 4], " y ", [])], path)
    with pytest.warns(BicmWarning) as record:
        samples = read_transvg_split(path)
    assert [s.query for s in samples] == ["y"] and samples[0].sample_id == "gref_val:2"
    assert sorted(str(w.message) for w in record) == [
        "gref_val.pth: dropped 1 entries with a degenerate box (x2 <= x1 or y2 <= y1)",
        "gref_val.pth: dropped 1 entries with an empty phrase",
    ]


def test_split_names():
    assert parse_split_name("gref_umd_val.pth") == ("gref_umd", "val")
    assert parse_split_name("/x/gref_train.pth") == ("gref", "train")
    assert parse_split_name("unc+_testA.pth") == ("unc+", "testA")
    assert parse_split_name("unc_train_pseudo.pth") == ("unc", "train_pseudo")
    assert parse_split_name("referit_test.pth") == ("referit", "test")


# ----------------------------------------------------------------------------------------
# boxes and samples


def test_box_conventions():
    assert to_xyxy([10, 20, 30, 40], "xywh") == (10.0, 20.0, 40.0, 60.0)
    assert to_xyxy(np.array([10, 20, 30, 40]), "xyxy") == (10.0, 20.0, 30.0, 40.0)
    assert to_xyxy(torch.tensor([0, 0, 479, 359]), "xyxy_inclusive") == (0.0, 0.0, 480.0, 360.0)
    assert to_xyxy(["1", "1", "500", "375"], "xyxy_inclusive_1based") == (0.0, 0.0, 500.0, 375.0)
    with pytest.raises(BicmError, match="unknown box convention 'cxcywh'"):
        to_xyxy([1, 2, 3, 4], "cxcywh")
    with pytest.raises(BicmError, match="a box must be 4 numbers"):
        to_xyxy([1, 2, 3], "xyxy")
    assert union_box([(0, 5, 10, 20), (5, 0, 30, 10)]) == (0.0, 0.0, 30.0, 20.0)


def test_sample_from_boxes_and_image_path():
    s = GroundingSample.from_boxes("i:0:1", "i", "i.jpg", "two dogs", [(0, 5, 10, 20), (5, 0, 30, 10)])
    assert s.boxes == ((0.0, 5.0, 10.0, 20.0), (5.0, 0.0, 30.0, 10.0)) and s.box == (0.0, 0.0, 30.0, 20.0)
    assert s.image_path("/data/img") == Path("/data/img/i.jpg")
    with pytest.raises(AttributeError):
        s.query = "x"  # frozen


def test_check_images_reports_missing_ones(tmp_path):
    samples = [GroundingSample.from_boxes(f"{i}", str(i), f"{i}.jpg", "q", [(0, 0, 1, 1)]) for i in range(10)]
    samples += samples[:3]  # repeated images count once
    for i in (0, 2, 4):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(BicmError) as info:
        check_images(samples, tmp_path)
    assert str(info.value) == f"7 of 10 images are missing under {tmp_path}: 1.jpg, 3.jpg, 5.jpg, 6.jpg, 7.jpg, ..."
    for i in (1, 3, 5, 6, 7, 8):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(BicmError, match=r"^1 of 10 images is missing under .*: 9\.jpg$"):
        check_images(samples, tmp_path)
    (tmp_path / "9.jpg").write_bytes(b"")
    assert check_images(samples, tmp_path) is None
    with pytest.raises(BicmError, match="image folder .*nowhere does not exist"):
        check_images(samples, tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------
# refer API (synthetic files in the real layout)


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle of dicts/lists/str/int/float as Python 2 wrote it (str as bytes)."""

    def enc(o) -> bytes:
        if isinstance(o, bool):
            return b"\x88" if o else b"\x89"
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if isinstance(o, float):
            return b"G" + struct.pack(">d", o)
        if isinstance(o, str):
            raw = o.encode("utf-8")
            return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        raise TypeError(type(o))

    return b"\x80\x02" + enc(obj) + b"."


def _ref(ref_id, ann_id, image_id, split, sents):
    return {
        "sent_ids": [s[0] for s in sents],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": [{"tokens": t.split(), "raw": t.upper(), "sent_id": i, "sent": t} for i, t in sents],
        "category_id": 1,
    }


@pytest.fixture()
def refer_folder(tmp_path) -> Path:
    refs = [
        _ref(0, 100, 581857, "train", [(0, "woman in front")]),
        _ref(1, 101, 581857, "val", [(1, "man on the right"), (2, "café guy")]),
        _ref(2, 102, 42, "val", [(3, "left dog")]),
        _ref(3, 101, 581857, "testA", [(4, "right man")]),
    ]
    (tmp_path / "refs(unc).p").write_bytes(_py2_pickle(refs))
    (tmp_path / "refs(google).p").write_bytes(pickle.dumps(refs[:2], protocol=2))
    instances = {
        "images": [
            {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 480},
            {"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "width": 500, "height": 375},
        ],
        "annotations": [
            {"id": 100, "image_id": 581857, "bbox": [10.5, 20.0, 100.0, 200.25], "category_id": 1},
            {"id": 101, "image_id": 581857, "bbox": [300.0, 50.0, 120.0, 400.0], "category_id": 1},
            {"id": 102, "image_id": 42, "bbox": [0.0, 0.0, 50.0, 60.0], "category_id": 18},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return tmp_path


def test_refer_reader(refer_folder):
    samples = read_refer(refer_folder, "val")
    assert [(s.sample_id, s.image_id, s.query) for s in samples] == [
        ("1:1", "581857", "man on the right"),
        ("1:2", "581857", "café guy"),  # a Python 2 byte string, UTF-8
        ("2:3", "42", "left dog"),
    ]
    assert samples[0].image_file == "COCO_train2014_000000581857.jpg"  # from instances.json
    assert samples[0].box == (300.0, 50.0, 420.0, 450.0) and samples[0].boxes == (samples[0].box,)
    assert samples[2].box == (0.0, 0.0, 50.0, 60.0)
    assert [s.query for s in read_refer(refer_folder, "val", query_field="raw")][:1] == ["MAN ON THE RIGHT"]
    assert [s.sample_id for s in read_refer(refer_folder, "val", "google")] == ["1:1", "1:2"]
    assert load_dataset("refcoco", "testA", refer_folder)[0].query == "right man"
    assert len(load_dataset("refcoco", "train", refer_folder, split_by="google")) == 1


def test_refer_errors(refer_folder):
    with pytest.raises(BicmError, match=r"split 'test' is not in refs\(unc\).p; it has testA, train, val"):
        read_refer(refer_folder, "test")
    has = r"\(the folder has refs\(google\).p, refs\(unc\).p\)"
    with pytest.raises(BicmError, match=r"refs\(umd\).p does not exist " + has):
        read_refer(refer_folder, "val", "umd")
    with pytest.raises(BicmError, match="'refcoco' has no 'umd' partition"):
        load_dataset("refcoco", "val", refer_folder, split_by="umd")
    data = json.loads((refer_folder / "instances.json").read_text())
    data["annotations"] = data["annotations"][:2]
    (refer_folder / "instances.json").write_text(json.dumps(data))
    with pytest.raises(BicmError, match="ref 2 of refs\\(unc\\).p names annotation 102, which instances.json lacks"):
        read_refer(refer_folder, "val")
    (refer_folder / "instances.json").write_text("{")
    with pytest.raises(BicmError, match="is not valid JSON"):
        read_refer(refer_folder, "val")


# ----------------------------------------------------------------------------------------
# raw Flickr30K Entities (synthetic files in the real layout)

_XML = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>18</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>375</ymax></bndbox></object>
  <object><name>18</name><name>20</name>
    <bndbox><xmin>201</xmin><ymin>51</ymin><xmax>500</xmax><ymax>150</ymax></bndbox></object>
  <object><name>19</name><nobndbox>0</nobndbox><scene>1</scene></object>
  <object><name>21</name><nobndbox>1</nobndbox><scene>0</scene></object>
</annotation>
"""

_SENTENCES = (
    "[/EN#18/people A group of people] stand in front of [/EN#19/scene an igloo] .\n"
    "[/EN#20/people A man] and [/EN#0/notvisual someone] look at [/EN#21/other a  kite] .\n"
    "[/EN#20/people/other The man] waves .\n"
)


@pytest.fixture()
def flickr_folder(tmp_path) -> Path:
    for sub in ("Annotations", "Sentences"):
        (tmp_path / sub).mkdir()
    for image_id in ("1000", "2000"):
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(_XML.format(id=image_id))
        (tmp_path / "Sentences" / f"{image_id}.txt").write_text(_SENTENCES)
    (tmp_path / "test.txt").write_text("2000\n1000\n")
    return tmp_path


def test_parse_sentence_and_xml(flickr_folder):
    phrases = parse_sentence(_SENTENCES.splitlines()[1])
    assert [(p.entity_id, p.types, p.text) for p in phrases] == [
        ("20", ("people",), "A man"), ("0", ("notvisual",), "someone"), ("21", ("other",), "a kite")]
    assert parse_sentence(_SENTENCES.splitlines()[2])[0].types == ("people", "other")
    ann = parse_annotation_xml(flickr_folder / "Annotations" / "1000.xml")
    assert (ann.width, ann.height) == (500, 375)
    shared = (200.0, 50.0, 500.0, 150.0)
    assert ann.boxes == {"18": [(0.0, 0.0, 100.0, 375.0), shared], "20": [shared]}
    assert ann.scene == {"19"} and ann.no_box == {"21"}


def test_flickr30k_entities_reader(flickr_folder):
    with pytest.warns(BicmWarning, match="skipped 6 phrases without a box"):
        samples = read_flickr30k_entities(flickr_folder, "test")
    assert [(s.sample_id, s.query) for s in samples[:3]] == [
        ("2000:0:0", "A group of people"), ("2000:1:0", "A man"), ("2000:2:0", "The man")]
    assert len(samples) == 6 and samples[3].sample_id == "1000:0:0"
    group = samples[0]
    assert group.image_file == "2000.jpg" and group.image_id == "2000"
    assert group.boxes == ((0.0, 0.0, 100.0, 375.0), (200.0, 50.0, 500.0, 150.0))
    assert group.box == (0.0, 0.0, 500.0, 375.0)  # union, as in the paper
    assert samples[1].boxes == (samples[1].box,) == ((200.0, 50.0, 500.0, 150.0),)
    with pytest.warns(BicmWarning):
        assert load_dataset("flickr30k_entities", "test", flickr_folder) == samples
        assert [s.image_id for s in read_flickr30k_entities(flickr_folder, image_ids=["1000"])] == ["1000"] * 3


def test_flickr_raw_and_transvg_agree(flickr_folder, tmp_path):
    """The same stored numbers give the same bicm box through both Flickr readers."""
    path = tmp_path / "flickr_test.pth"
    torch.save([("1000.jpg", np.array([1, 1, 100, 375], dtype=np.float32), "group people")], path,
               _use_new_zipfile_serialization=False)
    with pytest.warns(BicmWarning):
        raw = read_flickr30k_entities(flickr_folder, image_ids=["1000"])
    assert read_transvg_split(path)[0].box == raw[0].boxes[0]


def test_flickr30k_entities_errors(flickr_folder):
    (flickr_folder / "Annotations" / "1000.xml").unlink()
    with pytest.raises(BicmError, match=r"^1 of 2 annotations files is missing under .*Annotations: 1000.xml$"):
        read_flickr30k_entities(flickr_folder, "test")
    with pytest.raises(BicmError, match="split list .*train.txt does not exist"):
        read_flickr30k_entities(flickr_folder, "train")
    with pytest.raises(BicmError, match="unknown split 'dev' for 'flickr30k_entities'"):
        load_dataset("flickr30k_entities", "dev", flickr_folder)
    evil = flickr_folder / "Annotations" / "2000.xml"
    evil.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                    "<annotation>&x;</annotation>")
    with pytest.raises(BicmError, match="refusing an annotation file with a DTD"):
        parse_annotation_xml(evil)
    evil.write_text("<annotation><object>")
    with pytest.raises(BicmError, match="is not valid XML"):
        parse_annotation_xml(evil)


# ----------------------------------------------------------------------------------------
# registry


def test_load_dataset_errors(tmp_path):
    with pytest.raises(BicmError, match=r"unknown dataset 'refcocoz'; choose one of flickr, referit"):
        load_dataset("refcocoz", "val", tmp_path)
    with pytest.raises(BicmError, match="needs annotations="):
        load_dataset("unc", "val")
    with pytest.raises(BicmError, match="annotations .*nowhere do not exist"):
        load_dataset("unc", "val", tmp_path / "nowhere")
    with pytest.raises(BicmError, match="option split_by does not apply to 'unc'"):
        load_dataset("unc", "val", tmp_path, split_by="umd")
    with pytest.raises(BicmError, match="option box_convention does not apply to 'refcoco'"):
        load_dataset("refcoco", "val", tmp_path, box_convention="xyxy")
    with pytest.raises(BicmError, match="unknown split 'tset' for 'flickr'; choose one of train, val, test"):
        load_dataset("flickr", "tset", tmp_path)
    assert set(DATASETS) == {"flickr", "referit", "unc", "unc+", "gref", "gref_umd",
                             "refcoco", "refcoco+", "refcocog", "refclef", "flickr30k_entities", "jsonl", "shapes-ref", "shapes-phrase"}


def test_load_dataset_checks_images_first(tmp_path):
    path = tmp_path / "referit_val.pth"
    torch.save([("1.jpg", "1_1.pth", [0, 0, 9, 9], "a", []), ("2.jpg", "2_1.pth", [0, 0, 9, 9], "b", [])], path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.jpg").write_bytes(b"")
    with pytest.raises(BicmError, match=r"^1 of 2 images is missing under .*images: 2.jpg$"):
        load_dataset("referit", "val", tmp_path, image_root=images)
    (images / "2.jpg").write_bytes(b"")
    samples = load_dataset("referit", "val", tmp_path, image_root=images)
    assert samples[0].box == (0.0, 0.0, 10.0, 10.0)
