"""The command line: the README's command end to end, and every bad input as one line + exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------
# Each option that changes the result, seen in what --json reports (tiny model, in-process)
# ---------------------------------------------------------------------------------------
QUERIES = ("a red square", "the blue ball")


def ground_json(image, dets, checkpoint, *options, queries=QUERIES):
    """``bicm ground IMAGE QUERIES -c CHECKPOINT [-p DETS] --json OPTIONS``: (records, stderr)."""
    proposals = () if dets is None else ("-p", dets)
    result = run("ground", image, *queries, "-c", checkpoint, *proposals, "--json", *options)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def column(record, key):
    return [c[key] for c in record["candidates"]]


def test_components_com_alone_has_no_qam_box_and_no_top_down_score(scene_files, tiny_checkpoint):
    image, dets = scene_files
    full, _ = ground_json(image, dets, tiny_checkpoint)
    com, _ = ground_json(image, dets, tiny_checkpoint, "--components", "com")
    for f, c in zip(full, com):
        assert f["qam_box"] is not None and "qam" in column(f, "source")
        assert c["components"] == ["com"] and c["qam_box"] is None and c["view_box"] is None
        assert column(c, "source") == ["proposal"] * 3 and column(c, "box") == SCENE_BOXES
        assert column(c, "s_td") == [None] * 3
        for cand in c["candidates"]:  # S = S_BU = S_PQ + S_CQ
            assert cand["score"] == pytest.approx(cand["s_pq"] + cand["s_cq"], rel=1e-5)


def test_components_without_sf_ignore_lambda_t(scene_files, tiny_checkpoint):
    image, dets = scene_files
    low, _ = ground_json(image, dets, tiny_checkpoint, "--components", "qam,com", "--lambda-t", "0")
    high, _ = ground_json(image, dets, tiny_checkpoint, "--components", "qam,com", "--lambda-t", "1e6")
    for a, b in zip(low, high):
        assert a["components"] == ["qam", "com"]
        assert column(a, "score") == column(b, "score")  # no S_TD term: lambda_t weighs nothing


def test_lambda_t_weighs_the_top_down_score(scene_files, tiny_checkpoint):
    image, dets = scene_files
    records, _ = ground_json(image, dets, tiny_checkpoint, "--lambda-t", "10")
    for r in records:
        for c in r["candidates"]:  # S = S_PQ + S_CQ + lambda_t * S_TD; the default 1000 would not fit
            assert c["s_td"] > 0
            assert c["score"] == pytest.approx(c["s_pq"] + c["s_cq"] + 10 * c["s_td"], rel=1e-5)


def test_selection_union_above_mean_joins_several_candidates(scene_files, tiny_checkpoint):
    image, dets = scene_files
    argmax, _ = ground_json(image, dets, tiny_checkpoint)
    union, _ = ground_json(image, dets, tiny_checkpoint, "--selection", "union-above-mean")
    largest, _ = ground_json(image, dets, tiny_checkpoint, "--selection", "largest-above-mean")
    for a, u, g in zip(argmax, union, largest):
        scores = column(u, "score")
        mean = sum(scores) / len(scores)
        above = [i for i, s in enumerate(scores) if s > mean]
        assert a["selection"] == "argmax" and len(a["selected"]) == 1
        assert a["selected"] == [scores.index(max(scores))]
        assert u["selection"] == "union-above-mean" and u["selected"] == above
        boxes = [u["candidates"][i]["box"] for i in above]
        assert u["box"] == [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        assert g["selected"] == [max(above, key=lambda i: area(g["candidates"][i]["box"]))]
    assert any(len(u["selected"]) > 1 for u in union)  # several candidates where argmax takes one
    assert any(u["box"] != a["box"] for a, u in zip(argmax, union))


def test_thr_a_sets_the_size_of_qams_box(scene_files, tiny_checkpoint):
    image, dets = scene_files
    loose, _ = ground_json(image, dets, tiny_checkpoint, "--thr-a", "0.2")
    strict, _ = ground_json(image, dets, tiny_checkpoint, "--thr-a", "0.95")
    for lo, hi in zip(loose, strict):
        # a lower threshold keeps more of the map: a larger region, a larger box around it
        assert area(lo["qam_box"]) > area(hi["qam_box"])
        assert lo["candidates"][3]["source"] == "qam" and lo["candidates"][3]["box"] == lo["qam_box"]
        assert column(lo, "s_td")[:3] == column(hi, "s_td")[:3]  # the proposals' scores do not move


def test_td_scale_normalized_reads_the_min_max_normalised_map(scene_files, tiny_checkpoint):
    image, dets = scene_files
    raw, _ = ground_json(image, dets, tiny_checkpoint, "--td-scale", "raw")
    norm, _ = ground_json(image, dets, tiny_checkpoint, "--td-scale", "normalized")
    for r, n in zip(raw, norm):
        assert r["qam_box"] == n["qam_box"]  # QAM's box comes from the normalised map either way
        t_raw, t_norm = column(r, "s_td"), column(n, "s_td")
        # the raw map of a random tiny CLIP is small everywhere; the normalised one spans [0, 1]
        assert max(t_raw) < 0.01 < min(t_norm) and max(t_norm) <= 1.0
        for c in n["candidates"]:  # and lambda_t weighs that scale
            assert c["score"] == pytest.approx(c["s_pq"] + c["s_cq"] + 1000 * c["s_td"], rel=1e-5)


def test_attention_va_is_one_map_for_every_query(scene_files, tiny_checkpoint):
    image, dets = scene_files
    qa, _ = ground_json(image, dets, tiny_checkpoint)
    va, _ = ground_json(image, dets, tiny_checkpoint, "--attention", "va")
    # query-aware: each phrase its own map, box and S_TD; vanilla attention: the same for all
    assert qa[0]["qam_box"] != qa[1]["qam_box"] and column(qa[0], "s_td") != column(qa[1], "s_td")
    assert va[0]["qam_box"] == va[1]["qam_box"] and column(va[0], "s_td") == column(va[1], "s_td")
    assert va[0]["qam_box"] not in (qa[0]["qam_box"], qa[1]["qam_box"])


def test_com_mode_picks_the_com_scores(scene_files, tiny_checkpoint):
    image, dets = scene_files
    both, _ = ground_json(image, dets, tiny_checkpoint)
    cls, _ = ground_json(image, dets, tiny_checkpoint, "--com-mode", "class")
    vis, _ = ground_json(image, dets, tiny_checkpoint, "--com-mode", "visual")
    for b, c, v in zip(both, cls, vis):
        assert None not in column(b, "s_pq") + column(b, "s_cq")
        assert column(c, "s_pq") == [None] * 4 and column(c, "s_cq") == column(b, "s_cq")
        assert column(v, "s_cq") == [None] * 4 and column(v, "s_pq") == column(b, "s_pq")
        for cand in c["candidates"]:
            assert cand["score"] == pytest.approx(cand["s_cq"] + 1000 * cand["s_td"], rel=1e-5)


def test_class_prompt_changes_the_class_name_scores_only(scene_files, tiny_checkpoint):
    image, dets = scene_files
    bare, _ = ground_json(image, dets, tiny_checkpoint)
    photo, _ = ground_json(image, dets, tiny_checkpoint, "--class-prompt", "a photo of a {}.")
    for b, p in zip(bare, photo):
        assert column(b, "s_pq") == column(p, "s_pq") and column(b, "s_td") == column(p, "s_td")
        assert all(x != y for x, y in zip(column(b, "s_cq"), column(p, "s_cq")))


def test_max_proposals_keeps_the_first_ones(scene_files, tiny_checkpoint):
    image, dets = scene_files
    records, stderr = ground_json(image, dets, tiny_checkpoint, "--max-proposals", "1")
    assert "3 proposals are more than max_proposals / --max-proposals = 1; kept the 1 first" in stderr
    for r in records:
        assert column(r, "source") == ["proposal", "qam"]
        assert column(r, "box")[0] == SCENE_BOXES[0] and column(r, "class_name")[0] == "square"


def test_max_pixels_works_on_a_smaller_image_and_answers_in_original_pixels(scene_files, tiny_checkpoint):
    image, dets = scene_files
    full, quiet = ground_json(image, dets, tiny_checkpoint)
    small, stderr = ground_json(image, dets, tiny_checkpoint, "--max-pixels", "5000")
    assert "downscaled" not in quiet
    assert "image of 320x240 = 76,800 pixels downscaled to 81x61" in stderr
    for f, s in zip(full, small):
        assert s["image_size"] == [320, 240] and column(s, "box")[:3] == SCENE_BOXES
        assert column(s, "s_pq")[:3] != column(f, "s_pq")[:3]  # the crops come from the 81x61 image
        assert s["qam_box"] != f["qam_box"]


def test_top_n_caps_selective_search(scene_files, tiny_checkpoint):
    image, _ = scene_files
    found, _ = ground_json(image, "selective-search", tiny_checkpoint, queries=QUERIES[:1])
    capped, _ = ground_json(image, "selective-search", tiny_checkpoint, "--top-n", "1", queries=QUERIES[:1])
    assert column(found[0], "source").count("proposal") > 1
    assert column(capped[0], "source") == ["proposal", "qam"]
    assert capped[0]["proposal_source"].startswith("selective-search")


def test_name_with_names_unnamed_candidates(scene_files, tiny_checkpoint, tmp_path):
    image, _ = scene_files
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"box_format": "xyxy", "images": {"scene.png": SCENE_BOXES}}))
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("square\nball\ngrass\ntree\n")
    plain, _ = ground_json(image, unnamed, tiny_checkpoint)
    named, _ = ground_json(image, unnamed, tiny_checkpoint, "--name-with", vocabulary)
    for p, n in zip(plain, named):
        assert column(p, "class_name") == [None] * 4 and column(p, "s_cq") == [None] * 4
        assert "proposals carry no class names for every box: COM used S_PQ alone" in p["notes"]
        assert all(name in ("square", "ball", "grass", "tree") for name in column(n, "class_name"))
        assert None not in column(n, "s_cq")
        assert "proposals named by CLIP over file:vocab.txt" in n["notes"]


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


@pytest.mark.slow
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
