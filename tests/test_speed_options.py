"""Speed settings that must not change results: torch.compile of the crop/image encoder (and
its fallback), the thread count, batched crop preparation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from bicm import BicmWarning
from bicm.cli import app
from bicm.preprocess import preprocess
from bicm.qam import compute_maps

from .helpers import draw_scene, make_backbone


def test_compiled_encoder_gives_the_eager_features_for_every_batch_size():
    eager = make_backbone()
    compiled = dataclasses.replace(eager, compiled=True)
    pixels = torch.randn(7, 3, 64, 64)
    encoder = compiled.image_encoder()
    assert encoder is not eager.model.visual and getattr(encoder, "_orig_mod", None) is eager.model.visual
    for batch in (4, 7, 1):  # 4+3, 7, 1x7: one dynamic-batch graph (size 1 may specialise)
        assert torch.allclose(compiled.encode_pixels(pixels, batch), eager.encode_pixels(pixels, batch), atol=1e-5)
    assert compiled.compiled  # no fallback happened
    # QAM's gradient path runs the fp32 model itself, never the compiled wrapper
    image = draw_scene()
    px, geometry = preprocess(image, eager.spec)
    text = eager.encode_text(["a red square"])
    assert torch.equal(compute_maps(compiled, px, geometry, text, "qa").raw, compute_maps(eager, px, geometry, text, "qa").raw)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(module):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    backbone = dataclasses.replace(make_backbone(), compiled=True)
    pixels = torch.randn(3, 3, 64, 64)
    with pytest.warns(BicmWarning, match=r"torch.compile failed \(RuntimeError: InductorError: no working C\+\+ compiler\)"):
        feats = backbone.encode_pixels(pixels)
    assert torch.allclose(feats, make_backbone().encode_pixels(pixels), atol=1e-6)
    assert not backbone.compiled and backbone.image_encoder() is backbone.model.visual


def test_threads_option_and_environment(scene_files, tiny_checkpoint):  # conftest restores the threads
    image, dets = scene_files
    args = ["ground", str(image), "the red square", "-c", str(tiny_checkpoint), "-p", str(dets), "--json"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    result = runner.invoke(app, args, env={"BICM_THREADS": "1"})
    assert result.exit_code == 0 and torch.get_num_threads() == 1
    result = runner.invoke(app, [*args, "--threads", "-2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "bicm: error: --threads must be 0 (torch's default) or more, not -2"


def test_eval_compile_option_reaches_the_encoder(tmp_path, tiny_checkpoint, monkeypatch):
    from .helpers import file_eval

    compiled = []

    def record(module):
        compiled.append(module)
        return module  # eager: this test checks the plumbing, the test above the compiler

    monkeypatch.setattr(torch, "compile", record)
    command = file_eval(tmp_path, tiny_checkpoint, 2)
    plain = CliRunner().invoke(app, command("a"))
    assert plain.exit_code == 0, plain.output
    assert compiled == []
    result = CliRunner().invoke(app, [*command("b"), "--compile"])
    assert result.exit_code == 0, result.output
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    summary = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("a", "b")]
    assert summary[0]["rows"] == summary[1]["rows"]


def test_crop_batch_follows_the_device_unless_set(monkeypatch):
    from bicm import BiCMConfig, Grounder, Proposals
    from bicm.api import default_crop_batch
    from bicm.encoder import Encoder

    assert default_crop_batch(torch.device("cpu")) == 64 and default_crop_batch(torch.device("cuda", 0)) == 256
    grounder = Grounder(make_backbone())
    seen = []
    real = Encoder.crops
    monkeypatch.setattr(Encoder, "crops", lambda self, *a, **k: seen.append(a[3]) or real(self, *a, **k))
    boxes = Proposals(torch.tensor([[10.0, 10.0, 90.0, 90.0], [100.0, 50.0, 300.0, 200.0]]), class_names=["a", "b"])
    grounder.ground(draw_scene(), "a red square", boxes)
    grounder.with_config(crop_batch_size=5).ground(draw_scene(), "a red square", boxes)
    assert seen == [64, 5]  # the proposals with QAM's box P_t, one call per ground
    with pytest.raises(Exception, match="crop batch size must be at least 1"):
        BiCMConfig(crop_batch_size=0)


def test_runs_differing_only_in_crop_batch_are_the_same_work():
    from bicm import BiCMConfig
    from bicm.config import config_dict
    from bicm.evaluate import EvalRun

    def run(**config):
        return EvalRun("d", "s", "p", "m", ["QAM"], config_dict(BiCMConfig(**config)))

    assert run().same_work(run(crop_batch_size=16))
    assert not run().same_work(run(thr_a=0.5))


def test_a_compiled_bf16_tower_leaves_fusing_to_the_compiler():
    """torch.compile cannot lower oneDNN's fused linear+SiLU ("weight must be a graph constant",
    seen with torch 2.14): the tower it compiles has plain layers; the eager one may fuse."""
    from bicm.tower import _LinearSiLU

    compiled = dataclasses.replace(make_backbone(), precision=torch.bfloat16, compiled=True)
    tower = compiled.image_encoder()._orig_mod  # not compiled until first called
    assert not any(isinstance(m, _LinearSiLU) for m in tower.modules())
    assert next(tower.parameters()).dtype == torch.bfloat16
