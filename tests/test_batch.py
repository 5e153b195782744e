"""Batch grounding (``bicm ground --input``): items checked before work, one record per
(image, query), resumable after SIGKILL, COCO and supervision outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from bicm import BicmError, Grounder
from bicm.batch import read_items, run_batch
from bicm.results import to_detections

from .helpers import BICM, COLOURS, assert_user_error, dets_for, make_backbone, run

QUERIES = ["the red square", "the blue square", "the yellow square"]


def make_items(root: Path, n_images: int = 8, queries=QUERIES) -> Path:
    """``n_images`` pictures of three coloured squares (sizes differ) and an items file
    naming them relative to itself, each with ``queries``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        image = Image.new("RGB", (160 + 20 * i, 120), (60, 130, 70))
        draw = ImageDraw.Draw(image)
        for j, colour in enumerate(COLOURS.values()):
            draw.rectangle((10 + 50 * j, 30, 49 + 50 * j, 69), fill=colour)
        image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "queries": list(queries)}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root / "items.jsonl"


def batch_args(tmp_path: Path, items: Path, out: str, checkpoint: Path, *extra: str) -> list[str]:
    dets = dets_for(tmp_path, 40)  # keyed "0.png"...: the file source looks images up by name
    return ["ground", "--input", str(items), "--out", str(tmp_path / out), "--checkpoint", str(checkpoint),
            "--proposals", str(dets), "--no-cache", "--no-progress", *extra]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eight_scenes_three_queries_give_24_records_and_a_coco_file(tmp_path, tiny_checkpoint):
    items = make_items(tmp_path)
    result = run(*batch_args(tmp_path, items, "out", tiny_checkpoint, "--format", "coco"))
    assert result.exit_code == 0, result.stderr
    lines = records(tmp_path / "out" / "results.jsonl")
    assert len(lines) == 24
    assert [r["id"] for r in lines] == [f"{i}:{k}" for i in range(1, 9) for k in range(3)]
    assert [r["query"] for r in lines] == QUERIES * 8
    for r in lines:
        assert {"image", "query", "box", "score", "qam_box", "notes", "candidates", "item"} <= set(r)
        assert r["box"] is not None and len(r["box"]) == 4
    coco = json.loads((tmp_path / "out" / "results.coco.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [f"images/{i}.png" for i in range(8)]
    assert [im["width"] for im in coco["images"]] == [160 + 20 * i for i in range(8)]
    assert [c["name"] for c in coco["categories"]] == QUERIES
    assert len(coco["annotations"]) == 24
    for ann, r in zip(coco["annotations"], lines):
        x1, y1, x2, y2 = r["box"]
        assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        assert ann["score"] == r["score"] and ann["query"] == r["query"]
        assert coco["categories"][ann["category_id"] - 1]["name"] == r["query"]
        assert coco["images"][ann["image_id"] - 1]["file_name"] == r["image"]
    assert "24 of 24 queries found a box in 8 images" in result.stderr


def test_one_image_grounded_alone_gives_the_same_box(tmp_path, tiny_checkpoint):
    items = make_items(tmp_path, n_images=3)
    assert run(*batch_args(tmp_path, items, "out", tiny_checkpoint)).exit_code == 0
    lines = records(tmp_path / "out" / "results.jsonl")
    alone = run("ground", str(tmp_path / "images" / "2.png"), *QUERIES, "--checkpoint", str(tiny_checkpoint),
                "--proposals", str(dets_for(tmp_path, 40)), "--json")
    assert alone.exit_code == 0, alone.stderr
    single = [json.loads(line) for line in alone.stdout.splitlines()]
    assert [s["box"] for s in single] == [r["box"] for r in lines[6:9]]
    assert [s["score"] for s in single] == [r["score"] for r in lines[6:9]]


def test_a_folder_with_a_queries_file_puts_every_query_on_every_image(tmp_path, tiny_checkpoint):
    make_items(tmp_path, n_images=3)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    queries = tmp_path / "q.txt"
    queries.write_text("the red square\n\nthe blue square\n")
    items = read_items(tmp_path / "images", queries)
    assert [(i.line, i.image, i.queries) for i in items] == [(n + 1, f"{n}.png", ("the red square", "the blue square")) for n in range(3)]
    dets = dets_for(tmp_path, 3)
    result = run("ground", "--input", str(tmp_path / "images"), "--queries", str(queries), "--out", str(tmp_path / "f"),
                 "--checkpoint", str(tiny_checkpoint), "--proposals", str(dets), "--no-cache", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert [(r["image"], r["query"]) for r in records(tmp_path / "f" / "results.jsonl")] == [
        (f"{n}.png", q) for n in range(3) for q in ("the red square", "the blue square")]


def test_interrupted_then_resumed_ends_with_the_same_records_none_twice(tmp_path):
    items = read_items(make_items(tmp_path, n_images=5))
    grounder = Grounder(make_backbone(), proposals=None)
    reference = tmp_path / "ref"
    run_batch(grounder, items, reference, progress=False)

    def stop_after_two(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="6 of 15 results are kept"):
        run_batch(grounder, items, tmp_path / "run", progress=False, on_item=stop_after_two)
    results = tmp_path / "run" / "results.jsonl"
    assert len(results.read_text().splitlines()) == 6
    with open(results, "ab") as handle:  # a crash while writing the third item's records
        handle.write(b'{"id": "3:0", "item": 3, "ima')
    run_batch(grounder, items, tmp_path / "run", progress=False)
    assert results.read_bytes() == (reference / "results.jsonl").read_bytes()
    again = run_batch(grounder, items, tmp_path / "run", progress=False)  # all done: nothing is added
    assert again["results"] == 15 and results.read_bytes() == (reference / "results.jsonl").read_bytes()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_records_of_an_uninterrupted_run(tmp_path, tiny_checkpoint):
    items = make_items(tmp_path, n_images=40)
    reference = run(*batch_args(tmp_path, items, "ref", tiny_checkpoint))
    assert reference.exit_code == 0, reference.stderr
    args = batch_args(tmp_path, items, "run", tiny_checkpoint)
    proc = subprocess.Popen([*BICM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    results = tmp_path / "run" / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if results.exists() and len(results.read_bytes().splitlines()) >= 9:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = len(results.read_bytes().splitlines())
    assert 9 <= partial < 120, partial
    resumed = run(*args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    assert results.read_bytes() == (tmp_path / "ref" / "results.jsonl").read_bytes()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"image": "images/0.png", "queries": ["a"]', "line 2 is not valid JSON"),
        ('["images/0.png", "a"]', "line 2 is not a JSON object"),
        ('{"image": "images/missing.png", "query": "a"}', "line 2: image"),
        ('{"image": "images/0.png", "query": "  "}', "line 2: empty query"),
        ('{"image": "images/0.png", "queries": ["a", ""]}', "line 2: empty query"),
        ('{"image": "images/0.png", "queries": "a"}', 'line 2: "queries" must be a non-empty list'),
        ('{"image": "images/0.png", "queries": []}', 'line 2: "queries" must be a non-empty list'),
        ('{"image": "images/0.png", "query": {"text": "a"}}', "line 2: a query must be a string, not dict"),
        ('{"image": "images/0.png", "queries": [3]}', "line 2: a query must be a string, not int"),
        ('{"image": "images/0.png"}', 'line 2 needs one of "query"'),
        ('{"image": "images/0.png", "query": "a", "queries": ["b"]}', 'line 2 needs one of "query"'),
        ('{"query": "a"}', 'line 2 has no "image"'),
        ('{"image": 5, "query": "a"}', 'line 2 has no "image"'),
        ('{"image": "images", "query": "a"}', "is not a regular file (it is a folder)"),
    ],
)
def test_a_bad_item_stops_the_run_before_any_work(tmp_path, tiny_checkpoint, line, fragment):
    items = make_items(tmp_path, n_images=1)
    items.write_text(items.read_text() + line + "\n" + '{"image": "images/0.png", "query": "fine"}\n')
    result = run(*batch_args(tmp_path, items, "out", tiny_checkpoint))
    assert_user_error(result, str(items), fragment)
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--input", "{folder}"], "is a folder of images: give the phrases with --queries"),
        (["--input", "{items}", "--queries", "{items}"], "--queries goes with a folder of images"),
        (["--input", "{tmp}/nothing.jsonl"], "items file {tmp}/nothing.jsonl does not exist"),
        (["--input", "{empty}"], "holds no items"),
        (["--input", "{items}", "{folder}/0.png", "a"], "give either IMAGE QUERY... or --input ITEMS"),
        (["--input", "{items}", "--json"], "--json is for one image"),
        (["{folder}/0.png", "a", "--out", "{tmp}/o"], "--out goes with --input"),
        (["{folder}/0.png", "a", "--format", "coco"], "--format goes with --input"),
        (["{folder}/0.png"], "give an IMAGE and one or more QUERY"),
        (["--input", "{items}", "--proposals", "oracle"], "--proposals oracle takes a dataset's boxes"),
        (["--input", "{items}", "--out", "{items}"], "is a file, not a folder"),
    ],
)
def test_bad_batch_invocations_are_one_line(tmp_path, tiny_checkpoint, args, fragment):
    items = make_items(tmp_path, n_images=1)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    names = {"folder": tmp_path / "images", "items": items, "tmp": tmp_path, "empty": tmp_path / "empty.jsonl"}
    result = run("ground", *[a.format(**names) for a in args], "--checkpoint", str(tiny_checkpoint), "--no-progress")
    assert_user_error(result, fragment.format(**names))


def test_a_folder_without_images_and_an_empty_queries_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    queries = tmp_path / "q.txt"
    queries.write_text("a\n")
    with pytest.raises(BicmError, match="holds no images"):
        read_items(tmp_path / "empty", queries)
    queries.write_text("\n  \n")
    with pytest.raises(BicmError, match="holds no queries"):
        read_items(tmp_path / "empty", queries)


def test_a_resumed_run_with_other_items_is_refused(tmp_path, tiny_checkpoint):
    items = make_items(tmp_path, n_images=2)
    assert run(*batch_args(tmp_path, items, "out", tiny_checkpoint)).exit_code == 0
    items.write_text(items.read_text().replace("the red square", "the green square"))
    assert_user_error(run(*batch_args(tmp_path, items, "out", tiny_checkpoint)), "holds a ground run with other settings")


def test_results_as_supervision_detections(tmp_path):
    sv = pytest.importorskip("supervision")
    grounder = Grounder(make_backbone())
    image = Image.open(make_items(tmp_path, n_images=1).parent / "images" / "0.png")
    boxes = [[10, 30, 50, 70], [60, 30, 100, 70], [110, 30, 150, 70]]
    results = grounder.ground_many(image, QUERIES, proposals=boxes)
    one = results[1].to_detections()
    assert isinstance(one, sv.Detections) and len(one) == 1
    assert one.xyxy.tolist() == [list(results[1].box)]
    assert one.confidence.tolist() == pytest.approx([results[1].score])
    assert list(one.data["phrase"]) == ["the blue square"]
    joined = to_detections(results)
    assert len(joined) == 3 and list(joined.data["phrase"]) == QUERIES


def test_to_detections_without_supervision_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_supervision(name, *args, **kwargs):
        if name == "supervision" or name.startswith("supervision."):
            raise ImportError("No module named 'supervision'")
        return real(name, *args, **kwargs)

    grounder = Grounder(make_backbone())
    result = grounder.ground(Image.new("RGB", (64, 48)), "a thing", proposals=[[0, 0, 30, 30]])
    monkeypatch.setattr(builtins, "__import__", no_supervision)
    with pytest.raises(BicmError, match=r"pip install 'bicm\[supervision\]'"):
        result.to_detections()


def test_eval_any_box_protocol_is_shown_beside_the_merged_box_rows(tmp_path, tiny_checkpoint):
    from .helpers import eval_cli, make_dataset

    data = make_dataset(tmp_path, n_images=2)
    (tmp_path / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    lines[0]["boxes"] = [lines[0]["box"], [0, 0, 160, 120]]  # two boxes: the union is the whole image
    lines[0]["box"] = [0, 0, 160, 120]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run(*eval_cli(tmp_path, data, "--out", str(tmp_path / "run"), "--ablation", "none", "--no-cache", "--protocol", "any-box"))
    assert result.exit_code == 0, result.stderr
    table = (tmp_path / "run" / "table.md").read_text()
    assert "any-box (%)" in table and "merged-box protocol" in table
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rows"][0]["any_box"]["n"] == summary["rows"][0]["n"] == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    for r in records:
        row = r["rows"]["QAM+COM+SF"]
        assert row["iou_any"] >= row["iou"] - 1e-6 or r["id"] == records[0]["id"]
        assert row["hit_any"] == (row["iou_any"] > 0.5)
    plain = run(*eval_cli(tmp_path, data, "--out", str(tmp_path / "plain"), "--ablation", "none", "--no-cache"))
    assert plain.exit_code == 0 and "any-box" not in (tmp_path / "plain" / "table.md").read_text()
    assert "hit_any" not in (tmp_path / "plain" / "predictions.jsonl").read_text()


def test_split_by_reaches_the_reader_and_is_refused_where_it_does_not_apply(tmp_path):
    from .helpers import SHARED_DATA

    splits = SHARED_DATA / "transvg-splits"
    if not (splits / "gref_umd_val.pth").is_file():
        pytest.skip("../shared/data is not beside the repository")
    result = run("eval", "--dataset", "gref_umd", "--split", "val", "--annotations", str(splits), "--images", str(tmp_path),
                 "--split-by", "google", "--no-progress")
    assert_user_error(result, "split")
