"""Ctrl-C during long commands: a clean stop (exit 130, no traceback), finished work kept, the
same command resumes. SIGKILL: see test_evaluate.test_kill_minus_nine_then_resume_gives_the_same_numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bicm.cli import app
from bicm.interrupt import Interrupted, deferred, resumable, resume_command
from bicm.shapes import train as train_module
from bicm.shapes.train import TrainConfig, state_path, train_clip

from .helpers import BICM, file_eval, run_bicm


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [*BICM, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env=env,
        # as from a terminal: a runner started in the background (``cmd &`` without job control)
        # passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended before it could be interrupted: {proc.stderr.read().decode()[-800:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the command never got far enough to be interrupted")


def ctrl_c(proc: subprocess.Popen) -> tuple[int, str]:
    """What a terminal does on Ctrl-C: SIGINT to the whole process group."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the command hung after Ctrl-C")
    return proc.returncode, err.decode()


def assert_clean_interrupt(code: int, stderr: str, command: str) -> str:
    assert code == 130, (code, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("bicm: interrupted:")]
    assert len(lines) == 1, stderr
    assert f"run the same command again to resume: bicm {command}" in lines[0]
    return lines[0]


@pytest.mark.slow
def test_ctrl_c_during_eval_keeps_the_finished_queries_and_resumes(tmp_path, tiny_checkpoint):
    n_images = 24
    total = 3 * n_images
    args = file_eval(tmp_path, tiny_checkpoint, n_images)("run", "none")
    predictions = tmp_path / "run" / "predictions.jsonl"

    proc = start(args, tmp_path)
    wait_for(lambda: predictions.exists() and len(predictions.read_bytes().splitlines()) >= 6, proc)
    code, stderr = ctrl_c(proc)
    line = assert_clean_interrupt(code, stderr, "eval")
    data_bytes = predictions.read_bytes()
    assert data_bytes.endswith(b"\n")  # no record cut in half
    kept = [json.loads(x) for x in data_bytes.splitlines()]
    assert 6 <= len(kept) < total
    assert not [r for r in kept if "error" in r]  # every image has its detections: real work was cut
    assert f"{len(kept)} of {total} queries are kept in" in line

    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming: {len(kept)} of {total} queries" in resumed.stderr
    ids = [json.loads(x)["id"] for x in predictions.read_text().splitlines()]
    assert len(ids) == total == len(set(ids))


TRAIN_ARGS = ["--steps", "8", "--batch-size", "8", "--scenes", "40", "--singles", "40", "--threads", "2", "--save-every", "1"]


@pytest.mark.slow
def test_ctrl_c_during_train_clip_saves_the_state_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "clip.safetensors"
    args = ["train-clip", "--out", str(out), *TRAIN_ARGS]
    proc = start(args, tmp_path)
    wait_for(lambda: state_path(out).exists(), proc)
    code, stderr = ctrl_c(proc)
    line = assert_clean_interrupt(code, stderr, "train-clip")
    assert "training state at step" in line and "saved to" in line
    state = torch.load(state_path(out), weights_only=True)
    step = state["step"]
    assert 1 <= step < 8 and len(state["history"]) == step
    assert not out.exists()

    again = run_bicm(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {step}" in again.stderr
    assert out.exists() and not state_path(out).exists()
    card = json.loads((tmp_path / "clip.json").read_text())
    assert card["resumed_from_step"] == step and card["versions"]["torch"] == torch.__version__ and card["seed"] == 0
    history = json.loads((tmp_path / "clip.history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 9))


TINY_TRAIN = TrainConfig(
    width=32, layers=1, head_width=16, text_width=32, text_heads=2, text_layers=1, embed_dim=16, context_length=12,
    scenes=24, singles=24, batch_size=8, steps=7, warmup=2, threads=1, eval_pairs=16, eval_every=3,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "clip.safetensors"
    train_clip(TINY_TRAIN, out, save_every=0)
    return load_file(str(out))


@pytest.mark.parametrize("where", ["after-step", "inside-step"])
@pytest.mark.slow
def test_an_interrupted_and_resumed_training_gives_the_same_weights(tmp_path, uninterrupted, monkeypatch, where):
    out = tmp_path / "clip.safetensors"
    calls = {"n": 0}
    real_call = train_module.Batches.__call__

    def interrupting_batches(self, indices=None, augment=True):
        calls["n"] += 1
        if where == "inside-step" and calls["n"] == 5 and indices is None:
            raise KeyboardInterrupt
        return real_call(self, indices, augment)

    def on_step(step, record):
        if where == "after-step" and step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Batches, "__call__", interrupting_batches)
    with pytest.raises(Interrupted, match="training state at step"):
        train_clip(TINY_TRAIN, out, on_step=on_step, save_every=0)
    assert state_path(out).exists() and not out.exists()
    resumed_at = []
    train_clip(TINY_TRAIN, out, save_every=0, on_resume=resumed_at.append)
    assert resumed_at and 1 <= resumed_at[0] < TINY_TRAIN.steps
    weights = load_file(str(out))
    assert weights.keys() == uninterrupted.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_a_state_of_other_settings_is_refused(tmp_path):
    from bicm import BicmError

    out = tmp_path / "clip.safetensors"
    with pytest.raises(Interrupted):
        train_clip(TINY_TRAIN, out, on_step=lambda s, r: (_ for _ in ()).throw(KeyboardInterrupt), save_every=0)
    with pytest.raises(BicmError, match="other settings \\(steps\\)"):
        train_clip(replace(TINY_TRAIN, steps=9), out, save_every=0)


def test_deferred_holds_ctrl_c_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(1)  # still runs: the interrupt waits
    assert done == [1]
    with deferred():  # nothing pending: nothing raised
        pass


def test_resumable_and_resume_command(capsys, monkeypatch):
    assert resume_command(["/usr/bin/bicm", "eval", "--dataset", "my data"]) == "bicm eval --dataset 'my data'"
    assert resume_command(["/site-packages/bicm/cli.py", "eval"]) == "bicm eval"
    assert resume_command(["pytest", "-q"]) is None

    @resumable
    def long_command():
        raise Interrupted("7 of 9 things kept")

    monkeypatch.setattr(sys, "argv", ["bicm", "thing", "--x", "1"])
    with pytest.raises(SystemExit) as exit_info:
        long_command()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err == "bicm: interrupted: 7 of 9 things kept; run the same command again to resume: bicm thing --x 1\n"


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    from bicm.shapes.dataset import ensure_shapes

    return ensure_shapes(tmp_path_factory.mktemp("shapes"), "ref", ("train",), counts={"train": 8})


@pytest.mark.slow
def test_ctrl_c_during_pseudo_label_and_train_kam_keeps_the_work_and_the_same_commands_resume(tmp_path, shapes_world):
    run_dir, model = tmp_path / "pl", tmp_path / "kam.safetensors"
    label = ["pseudo-label", "--dataset", "shapes-ref", "--annotations", str(shapes_world), "--out", str(run_dir),
             "--thr-k", "-1000", "--model", "shapes", "--name-with", "shapes", "--top-n", "30", "--no-cache", "--no-progress"]
    pairs = run_dir / "pairs.jsonl"
    proc = start(label, tmp_path)
    wait_for(lambda: pairs.exists() and len(pairs.read_bytes().splitlines()) >= 2, proc)
    code, stderr = ctrl_c(proc)
    assert_clean_interrupt(code, stderr, "pseudo-label")
    kept = pairs.read_bytes()
    assert kept.endswith(b"\n") and 2 <= len(kept.splitlines()) < 8
    resumed = CliRunner().invoke(app, label)
    assert resumed.exit_code == 0, resumed.output
    lines = pairs.read_bytes()
    assert lines.startswith(kept) and len(lines.splitlines()) == 8  # the kept pairs are not redone

    train = ["train-kam", str(run_dir), "--out", str(model), "--epochs", "400", "--hidden", "16"]
    state = tmp_path / "kam.state.pt"
    proc = start(train, tmp_path)
    wait_for(state.exists, proc)
    code, stderr = ctrl_c(proc)
    line = assert_clean_interrupt(code, stderr, "train-kam")
    assert "training state after epoch" in line and str(state) in line and not model.exists()
    epoch = int(torch.load(state, weights_only=True)["epoch"])
    again = run_bicm(train, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from epoch {epoch}" in again.stderr
    assert model.exists() and not state.exists()
    assert [h["epoch"] for h in json.loads((tmp_path / "kam.history.json").read_text())] == list(range(1, 401))
