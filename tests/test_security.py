"""Files from strangers: a malicious pickle is refused and runs nothing.

Every payload below would create a marker file if any of its code ran. Each reader must
refuse it with one clear :class:`BicmError` and the marker must not exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bicm import BicmError
from bicm.backbone import read_state_dict
from bicm.cli import app
from bicm.data._pickle import load_pickle, load_torch_file
from bicm.data.refer import read_refer  # noqa: F401  (the refer reader goes through load_pickle)
from bicm.data.transvg import read_transvg_split


class WritesMarker:
    """Unpickling this calls os.system (or a file write) that leaves ``marker`` behind."""

    def __init__(self, marker: Path, how: str = "system") -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))
        return (eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def payloads(marker: Path):
    """(name, bytes) of malicious files in the containers bicm reads."""
    evil = WritesMarker(marker)
    inner = [{"image": "a.jpg", "box": [1, 2, 3, 4]}, evil]
    out = {
        "plain-pickle-p2": pickle.dumps(inner, protocol=2),
        "plain-pickle-p5": pickle.dumps({"state_dict": {"w": evil}}, protocol=5),
        "exec-pickle": pickle.dumps(WritesMarker(marker, "exec"), protocol=4),
        "eval-pickle": pickle.dumps([WritesMarker(marker, "eval")], protocol=0),
    }
    buffer = io.BytesIO()
    torch.save({"visual.proj": torch.zeros(2, 2), "evil": evil}, buffer)  # zip torch.save with a payload
    out["torch-zip"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save([evil], buffer, _use_new_zipfile_serialization=False)  # legacy torch.save
    out["torch-legacy"] = buffer.getvalue()
    # a zip that looks like a TorchScript archive (what makes bicm call torch.jit.load)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps(evil, protocol=2))
        archive.writestr("model/constants.pkl", pickle.dumps((evil,), protocol=2))
        archive.writestr("model/code/__torch__.py", "import os\nos.system('touch " + str(marker) + "')\n")
        archive.writestr("model/version", "3\n")
    out["fake-torchscript"] = buffer.getvalue()
    return out


PAYLOADS = ["plain-pickle-p2", "plain-pickle-p5", "exec-pickle", "eval-pickle", "torch-zip", "torch-legacy", "fake-torchscript"]


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_checkpoint_loading_refuses_a_malicious_pickle(tmp_path, name, suffix):
    marker = tmp_path / "MARKER"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(payloads(marker)[name])
    with pytest.raises(BicmError) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("name", PAYLOADS)
def test_dataset_readers_refuse_a_malicious_pickle(tmp_path, name):
    marker = tmp_path / "MARKER"
    data = payloads(marker)[name]
    split = tmp_path / "unc_testA.pth"
    split.write_bytes(data)
    with pytest.raises(BicmError, match="refusing to read|cannot read"):
        read_transvg_split(split)
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(data)
    try:  # a legacy torch.save file starts with a harmless pickle (its magic number): that one may load
        assert load_pickle(refs) == 0x1950A86A20F9469CFC6C and name == "torch-legacy"
    except BicmError as exc:
        assert re.search("refusing to read|cannot read", str(exc))
    with pytest.raises(BicmError):
        load_torch_file(split)
    assert not marker.exists(), "the pickle's code ran"


def test_the_cli_refuses_a_malicious_checkpoint_in_one_line(tmp_path):
    from .conftest import draw_scene

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(payloads(marker)["torch-zip"])
    draw_scene().save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["ground", str(tmp_path / "img.png"), "a dog", "--checkpoint", str(ckpt)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and "cannot read checkpoint" in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("call", ["bytearray", "bytes"])
def test_the_restricted_reader_refuses_giant_allocations(tmp_path, call):
    """``bytearray(10**12)`` is an allowed type called with a size: a memory bomb, not data."""
    module = "__builtin__" if call == "bytearray" else "builtins"
    data = f"c{module}\n{call}\n(I1000000000000\ntR.".encode()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(BicmError, match="refusing to read"):
        load_pickle(path)


def test_no_unsafe_loader_is_used_anywhere_in_bicm():
    """The audit, kept: every torch.load says weights_only=True, nothing else unpickles."""
    src = Path(__file__).resolve().parents[1] / "src" / "bicm"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        if path.name != "_pickle.py":
            assert not re.search(r"\bpickle\.(loads?|Unpickler)\b", text), path.name
            assert "allow_pickle=True" not in text, path.name
            assert "dill" not in text and "joblib.load" not in text, path.name
