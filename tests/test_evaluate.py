"""Evaluation: end to end on generated images, one pass for all rows, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from typer.testing import CliRunner

from bicm import BiCMConfig, BicmError, BicmWarning, Grounder
from bicm.cli import app
from bicm.data import load_dataset
from bicm.evaluate import MAIN_ROW, ablation_rows, markdown_table, run_eval, select_part, wilson_interval

from .helpers import BICM, dets_for, eval_cli, file_eval, make_backbone, make_dataset

def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ablation_rows_are_named_as_in_the_paper():
    names = [n for n, _ in ablation_rows("all", BiCMConfig())]
    assert names[0] == MAIN_ROW
    for expected in ["QAM", "COM", "QAM+COM", "QAM (VA) + COM", "QAM (QA) + COM + SF", "object class name", "visual object", "visual object + class name"]:
        assert expected in names
    assert len(names) == len(set(names))
    rows = dict(ablation_rows("table5", BiCMConfig()))
    assert rows["QAM (VA) + COM + SF"].attention == "va" and rows["QAM (VA) + COM + SF"].components == ("qam", "com", "sf")
    with pytest.raises(BicmError, match="unknown ablation"):
        ablation_rows("table9", BiCMConfig())


def test_select_part_and_limit(tmp_path):
    samples = load_dataset("jsonl", "test", make_dataset(tmp_path))
    parts = [select_part(samples, f"{k}/3", None) for k in (1, 2, 3)]
    assert sum(len(p) for p in parts) == len(samples) == 12
    assert not set(s.image_file for s in parts[0]) & set(s.image_file for s in parts[1])
    assert len(select_part(samples, None, 5)) == 5
    with pytest.raises(BicmError, match="K/N"):
        select_part(samples, "2", None)


def test_eval_end_to_end_with_every_row_from_one_pass(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)
    samples = load_dataset("jsonl", "test", data, image_root=tmp_path / "images")
    grounder = Grounder(make_backbone())
    calls = []
    real = grounder.iter_extract
    monkeypatch.setattr(grounder, "iter_extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    from bicm.proposals.sources import make_source

    rows = ablation_rows("all", BiCMConfig(selection="largest-above-mean"))
    summary = run_eval(grounder, samples, tmp_path / "images", tmp_path / "run", rows, dataset="jsonl", split="test",
                       source=make_source(str(dets_for(tmp_path))), progress=False)
    assert len(calls) == 4  # one extraction per image for all 12 rows
    assert summary["dataset"] == "jsonl" and not summary["oracle"]
    by_name = {r["name"]: r for r in summary["rows"]}
    assert set(by_name) == {n for n, _ in rows}
    for row in summary["rows"]:
        assert row["n"] == 12 and 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for r in records:
        main = r["rows"][MAIN_ROW]
        assert set(main) == {"box", "score", "iou", "hit"} and main["hit"] == (main["iou"] > 0.5)
        assert set(r["components"]) >= {"s_pq", "s_cq", "s_td"}
    # accuracy is recomputable from the predictions
    assert by_name[MAIN_ROW]["accuracy"] == sum(r["rows"][MAIN_ROW]["hit"] for r in records) / 12
    assert (tmp_path / "run" / "table.md").read_text().startswith("Acc@0.5 on jsonl test")



@pytest.mark.slow
def test_eval_streaming_queries_in_chunks_gives_the_same_predictions(tmp_path):
    """query_chunk=1: every image's queries are scored one chunk at a time; same records."""
    from bicm.proposals.sources import make_source

    data = make_dataset(tmp_path)
    samples = load_dataset("jsonl", "test", data, image_root=tmp_path / "images")
    out = {}
    for chunk in (32, 1):
        grounder = Grounder(make_backbone(), BiCMConfig(query_chunk=chunk))
        rows = ablation_rows("table4", grounder.config)
        run_eval(grounder, samples, tmp_path / "images", tmp_path / f"run{chunk}", rows, dataset="jsonl", split="test",
                 source=make_source(str(dets_for(tmp_path))), progress=False)
        out[chunk] = [json.loads(line) for line in (tmp_path / f"run{chunk}" / "predictions.jsonl").read_text().splitlines()]
    assert len(out[1]) == len(out[32]) == 12
    for a, b in zip(out[32], out[1]):
        # the fused score of every row's choice; not its box: this tiny random model leaves
        # candidates tied within 1e-7, and a text batch of 1 or 3 rounds differently (~1e-7)
        assert a["id"] == b["id"] and set(a["rows"]) == set(b["rows"])
        for name in a["rows"]:
            assert a["rows"][name]["score"] == pytest.approx(b["rows"][name]["score"], abs=1e-5), name

def test_oracle_run_is_labelled_and_boxes_are_exact(tmp_path):
    data = make_dataset(tmp_path, n_images=2)
    samples = load_dataset("jsonl", "x", data)
    rows = ablation_rows("table6", BiCMConfig(selection="argmax"))
    with pytest.warns(BicmWarning, match="'object class name' did not apply to 6 queries"):
        summary = run_eval(Grounder(make_backbone()), samples, tmp_path / "images", tmp_path / "run", rows,
                           dataset="jsonl", split="x", source="oracle", progress=False)
    assert summary["oracle"] and summary["proposals"] == "oracle:ground-truth"
    assert "ORACLE" in (tmp_path / "run" / "table.md").read_text()
    by_name = {r["name"]: r for r in summary["rows"]}
    assert by_name["object class name"]["n"] == 0 and by_name["object class name"]["not_applicable"] == 6
    assert by_name["visual object"]["n"] == 6 and summary["errors"] == 0
    # COM alone picks one of the ground-truth boxes: its IoU is 1 or well below 0.5
    for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines():
        iou = json.loads(line)["rows"]["visual object"]["iou"]
        assert iou == 1.0 or iou < 0.5


def test_an_unreadable_image_counts_as_a_miss_and_the_run_goes_on(tmp_path):
    data = make_dataset(tmp_path, n_images=2)
    (tmp_path / "images" / "1.png").write_bytes(b"broken")
    samples = load_dataset("jsonl", "x", data, image_root=tmp_path / "images")
    with pytest.warns(BicmWarning, match="3 queries could not be evaluated"):
        summary = run_eval(Grounder(make_backbone()), samples, tmp_path / "images", tmp_path / "run",
                           ablation_rows("none", BiCMConfig()), dataset="jsonl", split="x", source=None, progress=False)
    assert summary["errors"] == 3 and summary["rows"][0]["n"] == 6


def test_markdown_puts_the_paper_beside_ours():
    summary = {"dataset": "flickr", "split": "test", "proposals": "x", "model": "m", "selection": "union-above-mean",
               "rows": [{"name": "QAM+COM+SF", "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 100}]}
    table = markdown_table(summary)
    assert "| QAM+COM+SF | 50.00 | 40.00-60.00 | 100 | 60.15 |" in table
    assert "QAM+COM+SF+KAM (paper only)" in table and "61.46" in table


def test_cli_eval_missing_images_are_reported_before_work(tmp_path, tiny_checkpoint):
    data = make_dataset(tmp_path, n_images=3)
    (tmp_path / "images" / "1.png").unlink()
    (tmp_path / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    result = CliRunner().invoke(app, eval_cli(tmp_path, data, "--out", str(tmp_path / "run")))
    assert result.exit_code == 2
    assert "1 of 3 images is missing under" in result.stderr and "1.png" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_eval_shards_merge_to_the_full_run(tmp_path, tiny_checkpoint):
    data = make_dataset(tmp_path, n_images=4)
    (tmp_path / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    runner = CliRunner()
    full = runner.invoke(app, eval_cli(tmp_path, data, "--out", str(tmp_path / "full"), "--ablation", "table4"))
    assert full.exit_code == 0, full.stderr
    assert "| QAM+COM+SF |" in full.stdout
    for k in (1, 2):
        shard = runner.invoke(app, eval_cli(tmp_path, data, "--out", str(tmp_path / f"p{k}"), "--ablation", "table4", "--part", f"{k}/2"))
        assert shard.exit_code == 0, shard.stderr
    merged = runner.invoke(app, ["eval-merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "merged"),
                                 "--summary-json", str(tmp_path / "s.json")])
    assert merged.exit_code == 0, merged.stderr
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "s.json").read_text())
    assert a["rows"] == b["rows"]
    other = runner.invoke(app, eval_cli(tmp_path, data, "--out", str(tmp_path / "full"), "--ablation", "table6"))
    assert other.exit_code == 2 and "other settings" in other.stderr


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_the_same_numbers(tmp_path, tiny_checkpoint):
    n_images = 40
    total = 3 * n_images
    command = file_eval(tmp_path, tiny_checkpoint, n_images)

    reference = CliRunner().invoke(app, command("ref"))
    assert reference.exit_code == 0, reference.stderr
    assert "could not be evaluated" not in reference.stderr

    proc = subprocess.Popen(
        [*BICM, *command("run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    predictions = tmp_path / "run" / "predictions.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if predictions.exists() and len(predictions.read_bytes().splitlines()) >= 6:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = len(predictions.read_bytes().splitlines())
    assert 6 <= partial < total, partial

    resumed = CliRunner().invoke(app, command("run"))
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming: {partial} of {total} queries" in resumed.stderr
    lines = predictions.read_text().splitlines()
    assert len(lines) == total and len({json.loads(line)["id"] for line in lines}) == total
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())["rows"]
    got = json.loads((tmp_path / "run" / "summary.json").read_text())["rows"]
    assert got == want


def test_kam_rows_and_the_paired_mcnemar_test():
    from scipy.stats import binomtest

    from bicm.evaluate import KAM_ROW, mcnemar

    names = [n for n, _ in ablation_rows("none", BiCMConfig(), kam=True)]
    assert names == [MAIN_ROW, KAM_ROW, "COM+KAM"]
    rows = dict(ablation_rows("none", BiCMConfig(), kam=True))
    assert rows[KAM_ROW].components == ("qam", "com", "sf", "kam")

    def rec(a, b):
        return {"rows": {MAIN_ROW: {"hit": a}, KAM_ROW: {"hit": b}}}

    records = [rec(True, True)] * 5 + [rec(True, False)] * 2 + [rec(False, True)] * 9 + [rec(False, False)] * 4
    records.append({"rows": {MAIN_ROW: {"hit": True}, KAM_ROW: {"skipped": "n/a"}}})  # not paired: left out
    test = mcnemar(records, MAIN_ROW, KAM_ROW)
    assert (test["n"], test["a_only"], test["b_only"]) == (20, 2, 9)
    assert test["difference"] == pytest.approx(7 / 20)
    assert test["p_value"] == pytest.approx(binomtest(9, 11, 0.5).pvalue)
    assert mcnemar([rec(True, True)], MAIN_ROW, KAM_ROW)["p_value"] == 1.0


def test_consecutive_rows_are_compared_on_the_same_queries():
    from bicm.evaluate import EvalRun, summarize

    rows = ["QAM", "COM", "QAM+COM", MAIN_ROW]
    hits = {"QAM": [0, 0, 1, 0], "COM": [1, 1, 0, 0], "QAM+COM": [1, 1, 1, 0], MAIN_ROW: [1, 1, 1, 1]}
    records = [{"id": str(i), "kind": "attribute", "rows": {r: {"hit": bool(hits[r][i])} for r in rows}} for i in range(4)]
    run = EvalRun(dataset="shapes-ref", split="val", proposals="p", model="m", rows=rows, config={"selection": "argmax"})
    summary = summarize(records, run)
    steps = [(s["a"], s["b"], s["a_only"], s["b_only"]) for s in summary["steps"]]
    assert steps == [("QAM", "COM", 1, 2), ("COM", "QAM+COM", 0, 1), ("QAM+COM", MAIN_ROW, 0, 1)]
    table = markdown_table(summary)
    assert "| QAM | COM | +25.00 | 2 | 1 |" in table and "exact McNemar" in table
