"""The command line's option groups are declared once (bicm.options) and every command that
loads a model offers the same ones, with the same defaults and help."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from typing import get_args, get_type_hints

import pytest
import typer.main

from bicm import cli
from bicm import config as config_module
from bicm.config import BiCMConfig
from bicm.options import Group, MethodOptions, ModelOptions, SourceOptions, groups

MODEL_COMMANDS = ("ground", "eval", "pseudo-label", "serve", ("proposals", "extract"))


def _command(name):
    root = typer.main.get_command(cli.app)
    if isinstance(name, tuple):
        group = root.get_command(None, name[0])
        return group.get_command(None, name[1])
    return root.get_command(None, name)


def _options(command) -> dict:
    return {p.name: p for p in command.params if p.param_type_name == "option"}


def test_every_model_command_has_the_whole_model_group():
    wanted = [f.name for f in fields(ModelOptions)]
    seen = {}
    for name in MODEL_COMMANDS:
        options = _options(_command(name))
        missing = [w for w in wanted if w not in options]
        assert not missing, f"{name} lacks {missing}"
        seen[name] = {w: (tuple(options[w].opts), options[w].envvar) for w in wanted}
    first = next(iter(seen.values()))
    for name, flags in seen.items():
        assert flags == first, name  # the same flags and environment variables everywhere


def test_method_knobs_have_one_default_everywhere():
    """ground, eval and pseudo-label read thr_a, lambda_t and the working-size limits from
    one declaration whose defaults are the config's."""
    config = BiCMConfig()
    for name in ("ground", "eval", "pseudo-label"):
        options = _options(_command(name))
        assert options["thr_a"].default == config.thr_a
        assert float(options["lambda_t"].default) == config.lambda_t
        assert options["max_pixels"].default == config.max_pixels
        assert options["max_proposals"].default == config.max_proposals
    # the choices are the config's types, not a copy of them
    hints = get_type_hints(MethodOptions)
    assert hints["attention"] is config_module.MapKind and hints["com_mode"] is config_module.ComMode
    assert hints["region_rule"] is config_module.RegionRule and hints["td_scale"] is config_module.TdScale
    assert set(get_args(hints["selection"])) == {"paper", *config_module.SELECTION_POLICIES}


def test_per_command_defaults():
    assert _options(_command("eval"))["selection"].default == "paper"
    assert _options(_command("ground"))["selection"].default == "argmax"
    extract = _options(_command(("proposals", "extract")))
    assert extract["proposals"].default == "selective-search" and "--source" in extract["proposals"].opts
    assert "components" not in _options(_command("eval"))  # the ablation rows choose them


def test_groups_pack_and_refuse_clashes():
    @groups(model=Group(ModelOptions, only=("device", "threads")), method=Group(MethodOptions, defaults={"thr_a": 0.5}))
    def command(x: int = 0, *, model: ModelOptions, method: MethodOptions):
        return model, method

    model, method = command(x=1, device="cpu", threads=3, **{f.name: f.default for f in fields(MethodOptions) if f.name != "thr_a"}, thr_a=0.4)
    assert model.device == "cpu" and model.threads == 3 and model.precision == "auto"
    assert method.thr_a == 0.4

    with pytest.raises(TypeError, match="declared by the command and by a group"):

        @groups(model=ModelOptions)
        def clash(device: str = "cpu", *, model: ModelOptions):
            return None


def test_method_options_build_the_config():
    method = MethodOptions(components="qam,com", selection="paper", thr_a=0.6, max_pixels=0)
    config = method.config(ModelOptions(), dataset="shapes-ref")
    assert config.components == ("qam", "com") and config.thr_a == 0.6
    assert config.selection == "largest-above-mean" and config.max_pixels is None
    assert method.config(ModelOptions()).selection == "argmax"  # no dataset: the method as described


def test_source_options_make_the_source(tmp_path):
    assert SourceOptions().source() is None
    source = SourceOptions(proposals="selective-search", top_n=7, ss_mode="quality").source()
    assert "top_n=7" in source.id and "quality" in source.id


def test_help_does_not_import_torch():
    code = "import sys; from bicm import cli, options, config; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_from_pretrained_takes_proposals_and_naming_by_name():
    """One construction path: the source and the naming are the Grounder's, no patching."""
    from bicm import Grounder
    from bicm.shapes.examples import example_image, example_queries

    grounder = Grounder.from_pretrained("shapes", device="cpu", proposals="selective-search", name_with="shapes")
    result = grounder.ground(example_image(), example_queries()[0])
    assert result.proposal_source.startswith("selective-search")
    assert any(note == "proposals named by CLIP over shapes" for note in result.notes)
    proposals = [n for i, n in enumerate(result.candidates.class_names) if i != result.candidates.qam_index]
    assert proposals and all(n is not None for n in proposals)
    assert result.candidates.s_cq is not None  # COM used the class names CLIP gave
    # given boxes still take precedence over the Grounder's own source
    given = grounder.ground(example_image(), example_queries()[0], [[0, 0, 20, 20]])
    assert given.proposal_source == "user"
