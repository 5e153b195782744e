"""KAM's pseudo labels: matching, grounding, resuming, Table 7, and the whole CLI loop."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bicm.api import Grounder
from bicm.cli import app
from bicm.errors import BicmError
from bicm.jsonl import read_jsonl
from bicm.proposals.selective import SelectiveSearch
from bicm.pseudo import (
    precision_table,
    read_image_list,
    read_kam_pairs,
    read_query_list,
    run_pseudo_label,
    shapes_unpaired,
)
from bicm.shapes.dataset import ensure_shapes

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes(root, "ref", ("train", "test"), counts={"train": 5, "test": 3})


@pytest.fixture(scope="module")
def grounder():
    return Grounder.from_pretrained("shapes", device="cpu", name_with="shapes")


def _run(grounder, data, out, **kwargs):
    return run_pseudo_label(
        grounder, data.images, data.queries, out, source=SelectiveSearch(top_n=30), truth=data.truth, progress=False, **kwargs
    )


@pytest.mark.slow
def test_pseudo_labels_are_the_pairs_above_thr_k_with_their_features(tmp_path, world, grounder):
    data = shapes_unpaired(world, "shapes-ref", reveal_truth=True)
    summary = _run(grounder, data, tmp_path / "run", thr_k=1.0, features_above=0.5)
    pairs = list(read_jsonl(tmp_path / "run" / "pairs.jsonl"))
    assert summary["pairs"] == len(pairs) == 5
    # every image is paired with its most similar query (among the queries of all train scenes)
    feats = grounder.backbone.encode_images([__import__("PIL.Image").Image.open(p).convert("RGB") for _, p in data.images])
    text = grounder.backbone.encode_text(list(dict.fromkeys(data.queries)))
    best = (feats @ text.T).argmax(dim=1).tolist()
    assert [p["query"] for p in pairs] == [list(dict.fromkeys(data.queries))[i] for i in best]
    labels = list(read_jsonl(tmp_path / "run" / "labels.jsonl"))
    assert [r["id"] for r in labels] == [p["id"] for p in pairs if p["score"] > 1.0]
    assert summary["labels"] == len(labels)
    stored = [p for p in pairs if p.get("features")]
    assert {p["id"] for p in stored} == {p["id"] for p in pairs if p["score"] >= 0.5}
    kam_pairs, run = read_kam_pairs(tmp_path / "run", thr_k=0.5)
    assert len(kam_pairs) == sum(1 for p in pairs if p["score"] > 0.5) and run["thr_k"] == 1.0
    for kp, record in zip(kam_pairs, [p for p in pairs if p["score"] > 0.5]):
        assert kp.fp.shape == (record["candidates"], grounder.backbone.embed_dim)
        assert kp.fc is not None and kp.fc.shape == kp.fp.shape and kp.target == record["selected"]
    # Table 7 from the revealed truth, one row per threshold plus all pairs
    table = summary["table7"]
    assert [row["thr_k"] for row in table] == [None, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert table[0]["labels"] == 5 and all(a["labels"] >= b["labels"] for a, b in zip(table, table[1:]))
    assert (tmp_path / "run" / "table7.md").read_text().count("\n|") >= 6
    with pytest.raises(BicmError, match="features were stored for scores >= 0.5"):
        read_kam_pairs(tmp_path / "run", thr_k=0.4)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_pairs(tmp_path, world, grounder):
    data = shapes_unpaired(world, "shapes-ref", reveal_truth=False)
    _run(grounder, data, tmp_path / "full", thr_k=0.9)

    def stop(count):
        if count == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(grounder, data, tmp_path / "cut", thr_k=0.9, on_pair=stop)
    assert len(list(read_jsonl(tmp_path / "cut" / "pairs.jsonl"))) == 2
    _run(grounder, data, tmp_path / "cut", thr_k=0.9)
    assert (tmp_path / "cut" / "pairs.jsonl").read_bytes() == (tmp_path / "full" / "pairs.jsonl").read_bytes()
    assert (tmp_path / "cut" / "labels.jsonl").read_bytes() == (tmp_path / "full" / "labels.jsonl").read_bytes()
    with pytest.raises(BicmError, match="other settings"):
        run_pseudo_label(
            grounder.with_config(thr_a=0.5), data.images, data.queries, tmp_path / "cut",
            source=SelectiveSearch(top_n=30), progress=False,
        )


def test_precision_counts_iou_above_half_with_a_true_box_of_that_query():
    truth = {("a.png", "the red ellipse"): [(0.0, 0.0, 10.0, 10.0)], ("b.png", "the two stars"): [(0.0, 0.0, 20.0, 20.0)]}
    pairs = [
        {"id": "a.png", "query": "The red  ellipse", "box": [0, 0, 10, 9], "score": 0.95},  # right
        {"id": "b.png", "query": "the two stars", "box": [0, 0, 10, 10], "score": 0.85},  # IoU 0.25
        {"id": "c.png", "query": "the red ellipse", "box": [0, 0, 10, 10], "score": 0.75},  # not in c.png
        {"id": "d.png", "query": "the red ellipse", "box": None, "score": None},  # nothing to label
    ]
    rows = {row["thr_k"]: row for row in precision_table(pairs, truth, [0.8, 0.9])}
    assert (rows[None]["labels"], rows[None]["correct"]) == (3, 1)
    assert (rows[0.8]["labels"], rows[0.8]["correct"], rows[0.8]["precision"]) == (2, 1, 0.5)
    assert (rows[0.9]["labels"], rows[0.9]["precision"]) == (1, 1.0)


def test_image_and_query_lists(tmp_path, world):
    assert len(read_image_list(world / "train")) == 5
    listing = tmp_path / "images.txt"
    listing.write_text(f"{world / 'train' / '00000.png'}\n\n{world / 'train' / '00001.png'}\n")
    assert [k for k, _ in read_image_list(listing)] == [str(world / "train" / "00000.png"), str(world / "train" / "00001.png")]
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "the red ellipse"}\n{"query": "the star"}\n')
    assert read_query_list(queries) == ["the red ellipse", "the star"]
    queries.write_text('{"text": "no query field"}\n')
    with pytest.raises(BicmError, match="no 'query' text"):
        read_query_list(queries)
    with pytest.raises(BicmError, match="does not exist"):
        read_image_list(tmp_path / "missing.txt")


def test_features_above_must_not_exceed_thr_k(tmp_path, world, grounder):
    data = shapes_unpaired(world, "shapes-ref", reveal_truth=False)
    with pytest.raises(BicmError, match="must not exceed"):
        _run(grounder, data, tmp_path / "x", thr_k=0.5, features_above=0.9)
    with pytest.raises(BicmError, match="must include com"):
        _run(grounder.with_config(components=("qam",)), data, tmp_path / "y")


def test_a_second_pseudo_label_into_the_same_folder_is_refused(tmp_path, world, grounder):
    """Two runs appending to one pairs.jsonl would write every pair twice: the second is refused
    at once, before any work, and the folder is free again afterwards."""
    from bicm.atomic import folder_lock

    data = shapes_unpaired(world, "shapes-ref", reveal_truth=False)
    with folder_lock(tmp_path / "run", "bicm pseudo-label"):  # the first run, still writing
        with pytest.raises(BicmError, match="another bicm pseudo-label is writing to"):
            _run(grounder, data, tmp_path / "run")
        assert not (tmp_path / "run" / "matches.jsonl").exists()


@pytest.mark.slow
def test_cli_pseudo_label_train_kam_ground_and_eval(tmp_path, world, tiny_checkpoint):
    run_dir, model = tmp_path / "pl", tmp_path / "kam.safetensors"
    shapes = ["--model", "shapes", "--name-with", "shapes", "--top-n", "30", "--no-cache"]
    result = runner.invoke(
        app, ["pseudo-label", "--dataset", "shapes-ref", "--annotations", str(world), "--reveal-truth", "--thr-k", "0.5",
              "--out", str(run_dir), "--no-progress", *shapes],
    )
    assert result.exit_code == 0, result.output
    assert "| 0.9 |" in result.stdout and (run_dir / "table7.md").is_file()
    result = runner.invoke(app, ["train-kam", str(run_dir), "--out", str(model), "--epochs", "3", "--hidden", "16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "kam.curve.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "kam.history.json").read_text())) == 3
    image = str(world / "test" / "00000.png")
    result = runner.invoke(app, ["ground", image, "the red ellipse", "-p", "selective-search", "--kam", str(model), "--json", *shapes[:4]])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["components"] == ["qam", "com", "sf", "kam"] and record["candidates"][0]["s_kam"] is not None
    result = runner.invoke(
        app, ["eval", "--dataset", "shapes-ref", "--split", "test", "--annotations", str(world), "--kam", str(model),
              "--proposals", "selective-search", "--ablation", "none", "--out", str(tmp_path / "ev"), "--no-progress", *shapes],
    )
    assert result.exit_code == 0, result.output
    assert "| QAM+COM+SF+KAM |" in result.stdout and "exact McNemar p =" in result.stdout
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["paired"]["n"] == summary["rows"][0]["n"]
    # a KAM model is bound to its backbone
    result = runner.invoke(app, ["ground", image, "the red ellipse", "--checkpoint", str(tiny_checkpoint), "--kam", str(model)])
    assert result.exit_code == 2 and "trained on backbone shapes" in result.stderr
    assert "Traceback" not in result.output
