"""The command line: the README's command end to end, and every bad input as one line + exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from .helpers import BICM, SCENE_BOXES, TINY_OPENAI_VIT_CFG, assert_user_error, draw_scene, make_model, run


def test_ground_json_and_picture(scene_files, tiny_checkpoint, tmp_path):
    image, dets = scene_files
    out = tmp_path / "vis" / "out.png"
    result = run("ground", image, "a red square", "the blue ball", "--checkpoint", tiny_checkpoint, "--proposals", dets, "--json", "--save-vis", out)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["query"] for r in records] == ["a red square", "the blue ball"]
    for r in records:
        assert len(r["box"]) == 4 and isinstance(r["score"], float)
        assert len(r["candidates"]) == 4
        assert r["components"] == ["qam", "com", "sf"]
        chosen = r["candidates"][r["selected"][0]]
        assert chosen["box"] == r["box"]
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width > 300
    assert "wrote" in result.stderr


def test_ground_table_output_and_options(scene_files, tiny_checkpoint):
    image, dets = scene_files
    result = run(
        "ground", image, "grass", "-c", tiny_checkpoint, "-p", dets,
        "--components", "qam,com", "--selection", "union-above-mean", "--attention", "va", "--com-mode", "visual",
    )
    assert result.exit_code == 0, result.stderr
    assert "grass" in result.stdout and "box" in result.stdout


def test_ground_without_proposals_uses_qam(scene_files, tiny_checkpoint):
    image, _ = scene_files
    result = run("ground", image, "a red square", "-c", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["box"] == record["qam_box"]
    assert "no --proposals" in result.stderr


def test_help_and_version():
    assert run("--help").exit_code == 0
    assert "--save-vis" in run("ground", "--help").stdout
    assert run("--version").stdout.startswith("bicm ")


def test_bad_images(tmp_path, tiny_checkpoint):
    (tmp_path / "text.png").write_text("not an image")
    assert_user_error(run("ground", tmp_path / "none.png", "a dog", "-c", tiny_checkpoint), "image not found")
    assert_user_error(run("ground", tmp_path / "text.png", "a dog", "-c", tiny_checkpoint), "cannot read image")
    data = (tmp_path / "ok.png")
    Image.new("RGB", (300, 300), (9, 9, 9)).save(data)
    (tmp_path / "cut.png").write_bytes(data.read_bytes()[:120])
    assert_user_error(run("ground", tmp_path / "cut.png", "a dog", "-c", tiny_checkpoint))
    assert_user_error(
        run("ground", data, "a dog", "-c", tiny_checkpoint, "--max-image-pixels", 1000), "more than the limit"
    )


def test_unusual_images_work(tmp_path, tiny_checkpoint):
    base = Image.new("RGB", (90, 70), (120, 60, 30))
    images = {
        "cmyk.jpg": base.convert("CMYK"),
        "palette.gif": base.convert("P"),
        "alpha.png": base.convert("RGBA"),
        "deep.png": Image.fromarray((np.arange(90 * 70).reshape(70, 90) * 10).astype(np.uint16)),
    }
    for name, picture in images.items():
        picture.save(tmp_path / name)
        result = run("ground", tmp_path / name, "a thing", "-c", tiny_checkpoint, "--json")
        assert result.exit_code == 0, (name, result.stderr)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2)).save(tiny)
    result = run("ground", tiny, "a thing", "-c", tiny_checkpoint, "--json")
    assert result.exit_code == 0 and "warning: image" in result.stderr


def test_bad_queries(scene_files, tiny_checkpoint):
    image, dets = scene_files
    assert_user_error(run("ground", image, "   ", "-c", tiny_checkpoint), "query 1 is empty")
    result = run("ground", image, "word " * 100, "-c", tiny_checkpoint, "-p", dets, "--json")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "truncated" in result.stderr


def test_bad_detections(scene_files, tiny_checkpoint, tmp_path):
    image, _ = scene_files
    bad = tmp_path / "bad.json"
    bad.write_text('{"box_format": "xyxy", "images": {"scene.png": [[1, 2, 3]]}}')
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "-p", bad), "box 0 is not 4 numbers")
    other = tmp_path / "other.json"
    other.write_text('{"box_format": "xyxy", "images": {"zebra.png": [[1, 2, 3, 4]]}}')
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "-p", other), "no detections for scene.png")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "-p", tmp_path / "x.json"), "not found")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{oops\n")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "-p", garbage), "line 1")


def test_boxes_outside_the_image_warn(scene_files, tiny_checkpoint, tmp_path):
    image, _ = scene_files
    dets = tmp_path / "out.json"
    dets.write_text(json.dumps({"box_format": "xywh", "images": {"scene.png": [[-10, -10, 50, 50], [100, 100, 0, 5]]}}))
    result = run("ground", image, "a dog", "-c", tiny_checkpoint, "-p", dets, "--json")
    assert result.exit_code == 0
    assert "clipped" in result.stderr and "degenerate" in result.stderr
    assert json.loads(result.stdout)["candidates"][0]["box"] == [0.0, 0.0, 40.0, 40.0]


def test_bad_options(scene_files, tiny_checkpoint, tmp_path):
    image, dets = scene_files
    assert_user_error(run("ground", image, "a dog", "-c", tmp_path / "none.pt"), "checkpoint not found")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "--components", "com,sf"), "add qam")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "--components", "foo"), "unknown components")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "--device", "gpu9"), "unknown device")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "--thr-a", "1.5"), "--thr-a must be")
    assert_user_error(run("ground", image, "a dog", "-c", tiny_checkpoint, "--pretrained", "openai"), "not both")
    assert_user_error(run("ground", image, "a dog", "--model", "ViT-Q-1"), "unknown model architecture")
    usage = run("ground", image, "a dog", "--selection", "median")
    assert usage.exit_code == 2 and "Traceback" not in usage.stderr


def test_console_script_runs_the_readme_command(tmp_path):
    """The done-when command, through the installed console script, with an OpenAI-style .pt
    (a bare state dict: the architecture is read from the tensor shapes, as for ViT-B-32's)."""
    ckpt = tmp_path / "random-tiny-vit.pt"
    torch.save(make_model(TINY_OPENAI_VIT_CFG).state_dict(), ckpt)
    draw_scene().save(tmp_path / "img.png")
    (tmp_path / "dets.json").write_text(json.dumps({"box_format": "xyxy", "images": {"img.png": SCENE_BOXES}}))
    bicm = os.path.join(os.path.dirname(sys.executable), "bicm")
    command = [bicm] if os.path.exists(bicm) else BICM
    done = subprocess.run(
        command + ["ground", "img.png", "a red ball", "--checkpoint", ckpt.name, "--proposals", "dets.json", "--json", "--save-vis", "out.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "random-tiny-vit.pt does not record its activation; assuming QuickGELU" in done.stderr  # read as OpenAI's
    record = json.loads(done.stdout)
    assert record["query"] == "a red ball" and len(record["box"]) == 4 and "score" in record
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_cli_choices_mirror_the_library():
    import typing

    from bicm import cli, com, fusion, qam

    assert typing.get_args(cli.SelectionOpt) == fusion.SELECTION_POLICIES
    assert typing.get_args(cli.AttentionOpt) == typing.get_args(qam.MapKind)
    assert typing.get_args(cli.RegionOpt) == typing.get_args(qam.RegionRule)
    assert typing.get_args(cli.ComModeOpt) == typing.get_args(com.ComMode)


def test_lambda_t_auto_reads_the_models_card(scene_files, tiny_checkpoint, tmp_path):
    import shutil

    image, dets = scene_files
    weights = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, weights)
    common = ("ground", image, "a red square", "--checkpoint", weights, "--proposals", dets, "--json")
    assert_user_error(run(*common, "--lambda-t", "auto"), "no calibrated lambda_t recorded for this model")
    assert_user_error(run(*common, "--lambda-t", "lots"), "--lambda-t must be a number or auto")
    assert_user_error(run(*common, "--lambda-t", "-3"), "finite number >= 0")
    (tmp_path / "model.json").write_text(json.dumps({"lambda_t": {"value": 0.0, "rule": "..."}}))
    auto = run(*common, "--lambda-t", "auto")
    zero = run(*common, "--lambda-t", "0")
    big = run(*common, "--lambda-t", "1e6")
    assert auto.exit_code == zero.exit_code == big.exit_code == 0, auto.stderr
    scores = lambda r: [c["score"] for c in json.loads(r.stdout)["candidates"]]  # noqa: E731
    assert scores(auto) == scores(zero) != scores(big)  # the card's value (0) was used
