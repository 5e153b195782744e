"""``--engine ray`` (bicm.cluster): eval, pseudo-labelling and proposal extraction on a Ray
cluster give byte-identical files to the local engine, also when a worker is killed mid-run;
a missing Ray, a bad address and Ctrl-C end cleanly.

The Ray tests share one two-node cluster on this machine (``ray.cluster_utils.Cluster``, one
CPU per node) that the commands join with ``--ray-address``; they skip where Ray is not
installed (the ``bicm[ray]`` extra; the ``test`` extra brings it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest

from bicm import pseudo
from bicm.jsonl import read_jsonl

from .helpers import assert_user_error, run, run_bicm
from .test_interrupt import assert_clean_interrupt, ctrl_c, start, wait_for

# one torch thread in both engines: a Ray actor with one CPU computes with one thread, and a
# sum split over two threads rounds differently in the last bit
SHAPES = ["--model", "shapes", "--device", "cpu", "--threads", "1", "--proposals", "selective-search", "--top-n", "30",
          "--name-with", "shapes", "--no-cache", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from bicm.shapes.dataset import ensure_shapes

    return ensure_shapes(tmp_path_factory.mktemp("shapes"), "ref", ("test", "train"), counts={"test": 5, "train": 6})


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node, one CPU each, on this machine."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    made.add_node(num_cpus=1)
    made.wait_for_nodes()
    yield made
    made.shutdown()


def on_ray(cluster, workers: int = 2) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, "--workers", str(workers)]


def eval_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--dataset", "shapes-ref", "--split", "test", "--annotations", str(world), "--ablation", "table4",
            "--out", str(out), *SHAPES, *extra]


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def local_eval(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "eval"
    result = run(*eval_args(world, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_eval_on_ray_writes_the_local_run_folder_and_resumes_it(world, cluster, local_eval, tmp_path):
    result = run(*eval_args(world, tmp_path / "ray"), *on_ray(cluster))
    assert result.exit_code == 0, result.output
    assert_same_files(local_eval, tmp_path / "ray", ["predictions.jsonl", "summary.json", "table.md", "run.json"])
    total = len((tmp_path / "ray" / "predictions.jsonl").read_bytes().splitlines())
    assert total > 10
    # a run begun locally and cut after two images goes on on the cluster: the same file
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(local_eval / "run.json", half / "run.json")
    lines = (local_eval / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (half / "predictions.jsonl").write_bytes(b"".join(lines[:10]))
    result = run(*eval_args(world, half), *on_ray(cluster))
    assert result.exit_code == 0, result.output
    assert f"resuming: 10 of {total} queries" in result.stderr
    assert_same_files(local_eval, half, ["predictions.jsonl", "summary.json", "table.md"])
    # with the feature cache on: one file per machine, never the shared path itself (the
    # numbers may differ in their last digits: a cached query embedding was computed in
    # another batch, see README "Cluster")
    cache = tmp_path / "features.sqlite"
    args = [str(cache) if a == "--no-cache" else a for a in eval_args(world, tmp_path / "cached")]
    args.insert(args.index(str(cache)), "--cache")
    result = run(*args, *on_ray(cluster))
    assert result.exit_code == 0, result.output
    ids = [r["id"] for r in read_jsonl(tmp_path / "cached" / "predictions.jsonl")]
    assert ids == [r["id"] for r in read_jsonl(local_eval / "predictions.jsonl")]
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    assert not cache.exists() and (tmp_path / f"features.{host}.sqlite").stat().st_size > 0


@pytest.mark.slow
def test_pseudo_label_on_ray_gives_the_local_labels(world, cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(pseudo, "MATCH_BLOCK", 2)  # three image blocks for the workers to match
    args = ["pseudo-label", "--dataset", "shapes-ref", "--annotations", str(world), "--thr-k", "0.5", "--reveal-truth", *SHAPES]
    local = run(*args, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.output
    remote = run(*args, "--out", tmp_path / "ray", *on_ray(cluster))
    assert remote.exit_code == 0, remote.output
    assert_same_files(tmp_path / "local", tmp_path / "ray", ["matches.jsonl", "pairs.jsonl", "labels.jsonl", "summary.json", "table7.md"])
    assert len(list(read_jsonl(tmp_path / "ray" / "matches.jsonl"))) == 6
    mine, _ = pseudo.read_kam_pairs(tmp_path / "local", thr_k=0.5)
    theirs, _ = pseudo.read_kam_pairs(tmp_path / "ray", thr_k=0.5)
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a.target == b.target
        for field in ("fi", "fq", "fp", "fc"):
            assert getattr(a, field).equal(getattr(b, field)), field


@pytest.mark.slow
def test_proposals_extract_on_ray_writes_the_local_file(world, cluster, tmp_path, monkeypatch):
    options = ["--source", "selective-search", "--top-n", "20", "--name-with", "shapes", "--model", "shapes", "--threads", "1"]
    local = run("proposals", "extract", world / "test", *options, "-o", tmp_path / "local.jsonl")
    assert local.exit_code == 0, local.output
    monkeypatch.chdir(world)  # a relative image folder means the same images to the workers
    remote = run("proposals", "extract", "test", *options, "-o", tmp_path / "ray.jsonl", *on_ray(cluster))
    assert remote.exit_code == 0, remote.output
    assert (tmp_path / "local.jsonl").read_bytes() == (tmp_path / "ray.jsonl").read_bytes()
    assert len((tmp_path / "ray.jsonl").read_bytes().splitlines()) == 5


def _ray_workers() -> list[int]:
    """The process ids of this machine's Ray Data actors (their title is ``ray::MapWorker(...)``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_a_worker_killed_mid_run_is_replaced_and_the_predictions_are_the_same(world, cluster, local_eval, tmp_path):
    predictions = tmp_path / "ray" / "predictions.jsonl"
    proc = start(eval_args(world, tmp_path / "ray", *on_ray(cluster)), tmp_path)
    wait_for(lambda: predictions.exists() and len(predictions.read_bytes().splitlines()) >= 5, proc)
    victims = _ray_workers()
    assert victims, "no Ray worker process to kill"
    os.kill(victims[0], signal.SIGKILL)
    written = len(predictions.read_bytes().splitlines())
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert predictions.read_bytes() == (local_eval / "predictions.jsonl").read_bytes()
    assert written < len(predictions.read_bytes().splitlines())  # the kill came with images left to do


@pytest.mark.slow
def test_ctrl_c_stops_the_cluster_work_and_keeps_what_was_written(world, cluster, local_eval, tmp_path):
    predictions = tmp_path / "ray" / "predictions.jsonl"
    args = eval_args(world, tmp_path / "ray", *on_ray(cluster, workers=1))
    proc = start(args, tmp_path)
    wait_for(lambda: predictions.exists() and len(predictions.read_bytes().splitlines()) >= 5, proc)
    code, stderr = ctrl_c(proc)
    assert_clean_interrupt(code, stderr, "eval")
    kept = predictions.read_bytes()
    assert kept.endswith(b"\n") and (local_eval / "predictions.jsonl").read_bytes().startswith(kept)
    assert _workers_end(), "the job's actors outlived Ctrl-C"
    again = run_bicm(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert predictions.read_bytes() == (local_eval / "predictions.jsonl").read_bytes()


def _workers_end(seconds: float = 30) -> bool:
    """Whether the actors of an ended job go away within ``seconds``."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _ray_workers():
            return True
        time.sleep(0.2)
    return False


def test_engine_ray_without_ray_is_one_line(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = run(*eval_args(world, tmp_path / "run"), "--engine", "ray")
    assert_user_error(result, "pip install 'bicm[ray]'")
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


@pytest.mark.parametrize(
    "address, fragment",
    [("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"), ("no-port-here", "is not host:port")],
)
def test_a_bad_ray_address_is_one_line(world, tmp_path, address, fragment):
    pytest.importorskip("ray")
    result = run(*eval_args(world, tmp_path / "run"), "--engine", "ray", "--ray-address", address)
    assert_user_error(result, fragment)


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds_is_one_line(world, cluster, tmp_path):
    result = run(*eval_args(world, tmp_path / "run"), *on_ray(cluster, workers=3))
    assert_user_error(result, "--workers 3 x --cpus-per-worker 1 needs 3 CPUs but the Ray cluster has 2")


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--cpus-per-worker", "-1"), ("--gpus-per-worker", "nan")])
def test_engine_numbers_out_of_range_are_one_line(world, tmp_path, option, value):
    result = run(*eval_args(world, tmp_path / "run"), "--engine", "ray", option, value)
    assert_user_error(result, option)


def test_engine_options_are_one_group_on_the_three_commands():
    for command in (["eval"], ["pseudo-label"], ["proposals", "extract"]):
        text = run(*command, "--help").stdout
        for flag in ("--engine", "--ray-address", "--workers", "--gpus-per-worker", "--cpus-per-worker"):
            assert flag in text, (command, flag)


def test_each_node_keeps_its_own_feature_cache(tmp_path, monkeypatch):
    from bicm.cluster import worker_cache
    from bicm.options import RunOptions

    monkeypatch.setattr("socket.gethostname", lambda: "node-7.example")
    cache = worker_cache(RunOptions(cache=tmp_path / "features.sqlite"))
    try:
        assert cache.path == tmp_path / "features.node-7_example.sqlite"
    finally:
        cache.close()
    assert worker_cache(RunOptions(no_cache=True)) is None


@pytest.mark.slow
def test_batch_grounding_on_ray_writes_the_local_results(world, cluster, tmp_path):
    import json

    lines = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    by_image: dict[str, list[str]] = {}
    for line in lines:
        by_image.setdefault(line["image"], []).append(line["query"])
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"image": str(world / image), "queries": qs[:3]}) + "\n" for image, qs in by_image.items()))
    args = ["ground", "--input", str(items), *SHAPES, "--format", "coco"]
    local = run(*args, "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output
    on = run(*args, "--out", str(tmp_path / "ray"), *on_ray(cluster))
    assert on.exit_code == 0, on.output
    assert_same_files(tmp_path / "local", tmp_path / "ray", ["results.jsonl"])
    coco = [json.loads((tmp_path / name / "results.coco.json").read_text()) for name in ("local", "ray")]
    assert coco[0]["annotations"] == coco[1]["annotations"] and len(coco[0]["annotations"]) == sum(min(3, len(q)) for q in by_image.values())
