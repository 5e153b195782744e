"""Issue 25, round 3 robustness: tampered dataset folders (class 4)."""

from __future__ import annotations

import json
import shutil

import pytest

from bicm.data.jsonl import read_jsonl_dataset
from bicm.errors import BicmError
from bicm.pseudo import shapes_unpaired
from bicm.shapes.dataset import ensure_shapes, read_shapes
from bicm.shapes.detector import read_objects


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    ensure_shapes(root, "ref", ("val", "train"), counts={"val": 2, "train": 2})
    return root


def _tampered(text: str, how: str, key: str) -> str:
    lines = text.splitlines(keepends=True)
    first = json.loads(lines[0])
    rest = "".join(lines[1:])
    if how == "cut":
        return text[:-15]
    if how == "list":
        return "[1, 2]\n" + rest
    if how == "empty":
        return "{}\n" + rest
    if how == "missing":
        first.pop(key)
    elif how == "wrong type":
        first[key] = {"box": "1 2 3 4", "boxes": ["1 2 3 4"], "query": {"a": 1}, "image": 7, "class_names": [3]}[key]
    elif how == "nan":
        first[key] = [0, 0, float("nan"), 5] if key == "box" else [[0, 0, float("inf"), 5]]
    return json.dumps(first) + "\n" + rest


# (file, the key the reader needs, the reader)
READERS = [
    ("val.jsonl", "boxes", lambda root, tmp: read_shapes(root, "val", "ref")),
    ("val.jsonl", "query", lambda root, tmp: read_shapes(root, "val", "ref")),
    ("train_objects.jsonl", "boxes", lambda root, tmp: read_objects(root / "ref", 2)),
    ("train_objects.jsonl", "class_names", lambda root, tmp: read_objects(root / "ref", 2)),
    ("train_images.jsonl", "image", lambda root, tmp: shapes_unpaired(root, "shapes-ref", False)),
    ("train_queries.jsonl", "query", lambda root, tmp: shapes_unpaired(root, "shapes-ref", False)),
    ("train_truth.jsonl", "box", lambda root, tmp: shapes_unpaired(root, "shapes-ref", True)),
    ("data.jsonl", "box", lambda root, tmp: read_jsonl_dataset(tmp / "data.jsonl")),
    ("data.jsonl", "query", lambda root, tmp: read_jsonl_dataset(tmp / "data.jsonl")),
]


@pytest.mark.parametrize("how", ["cut", "list", "empty", "missing", "wrong type", "nan"])
@pytest.mark.parametrize("name, key, reader", READERS, ids=[f"{n}:{k}" for n, k, _ in READERS])
def test_tampered_dataset_file_is_one_error_naming_file_and_line(world, tmp_path, name, key, reader, how):
    if how == "nan" and "box" not in key:
        pytest.skip("only boxes hold numbers")
    root = tmp_path / "world"
    shutil.copytree(world, root)
    if name == "data.jsonl":
        path = tmp_path / name
        rows = [{"image": "a.png", "query": "the dog", "box": [0, 0, 5, 5]}, {"image": "b.png", "query": "a cat", "box": [1, 1, 3, 3]}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = root / "ref" / name
    reader(root, tmp_path)  # the untouched file reads
    path.write_text(_tampered(path.read_text(), how, key))
    with pytest.raises(BicmError) as caught:
        reader(root, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{name} line " in message, message
