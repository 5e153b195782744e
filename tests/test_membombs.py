"""Issue 25, class 1: memory bombs through every torch-format reader, and absurd declared sizes.

Each hostile file holds real tensors (so it looks valid) beside a pickle part of under 1 MB that
passes one memo'd container to hundreds of allowed calls (``set``, ``OrderedDict``,
``torch.Size``). The reader runs in a child process whose own peak resident memory (VmHWM) is
compared with the same reader on an ordinary file: at most 256 MB more, and a one-line refusal.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BOUND_MB = 256


class _Call:
    """Pickles as ``func(arg)``: the pickler memoizes ``arg``, so each call costs a few bytes."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _bomb_object(payload: dict) -> dict:
    numbers = list(range(100_000))
    pairs = [(i, i) for i in range(0, 100_000, 4)]
    junk = [_Call(set, numbers) for _ in range(300)] + [_Call(torch.Size, numbers) for _ in range(300)]
    junk += [_Call(collections.OrderedDict, pairs) for _ in range(60)]
    return {**payload, "junk": junk}


def _payloads() -> dict:
    model = torch.nn.Linear(4, 3)
    return {"weights": dict(model.state_dict())}


def _write(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


_CHILD = r'''
import sys, json
from pathlib import Path
kind, path = sys.argv[1], Path(sys.argv[2])
from bicm.errors import BicmError
outcome = "loaded"
try:
    if kind == "checkpoint":
        from bicm.checkpoints import read_state_dict
        read_state_dict(path)
    elif kind == "split":
        from bicm.data._pickle import load_torch_file
        load_torch_file(path)
    elif kind == "state":
        from bicm.interrupt import load_state
        load_state(path, "bicm-test", {})
    elif kind == "detector":
        from bicm.proposals.detector import FasterRCNN
        FasterRCNN("fasterrcnn_mobilenet_v3_large_320_fpn", checkpoint=path, device="cpu")
except BicmError as exc:
    outcome = "refused: " + str(exc)
except Exception as exc:
    outcome = "crashed: " + type(exc).__name__ + ": " + str(exc)[:200]
hwm = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]) // 1024
print(json.dumps({"outcome": outcome, "peak_mb": hwm}))
'''


def _peak(kind: str, path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _normal(kind: str, tmp_path: Path) -> Path:
    if kind == "detector":
        from torchvision.models import detection

        model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
        return _write(tmp_path / "normal.pth", model.state_dict())
    if kind == "state":
        return _write(tmp_path / "normal.state.pt", {"format": "other", "settings": {}, **_payloads()})
    return _write(tmp_path / "normal.pth", _payloads()["weights"] if kind == "checkpoint" else [["a.jpg", [1, 2, 3, 4], "x"], torch.ones(3)])


@pytest.mark.slow
@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["checkpoint", "split", "state", "detector"])
def test_every_torch_reader_refuses_a_memory_bomb_within_the_bound(tmp_path, kind, container):
    bomb = tmp_path / "bomb.pth"
    torch.save(_bomb_object(_payloads()), bomb, _use_new_zipfile_serialization=(container == "zip"))
    pickle_part = bomb.stat().st_size
    assert pickle_part < 1 << 20
    normal = _peak(kind, _normal(kind, tmp_path))
    hostile = _peak(kind, bomb)
    assert hostile["outcome"].startswith("refused: "), hostile
    assert "\n" not in hostile["outcome"] and "nothing from the file was run" in hostile["outcome"], hostile
    assert hostile["peak_mb"] <= normal["peak_mb"] + BOUND_MB, (normal, hostile)


def test_a_bomb_on_an_ordered_dicts_build_state_is_counted(tmp_path):
    """BUILD on an OrderedDict (state dicts carry ``_metadata`` that way) copies its state: a memo'd
    large state given to many of them is counted against the budget."""
    import pickle
    import zipfile

    from bicm.errors import BicmError
    from bicm.safeload import read_torch_file

    big = {f"k{i}": i for i in range(50_000)}
    body = bytearray(b"\x80\x02")
    body += pickle.dumps(big, protocol=2)[2:-1] + b"q\x00"  # the state, memo 0
    body += b"ccollections\nOrderedDict\nq\x01]("
    body += b"h\x01)Rh\x00b" * 4000  # OrderedDict() BUILD <state>: 9 bytes each
    body += b"e."
    normal = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(2)}, normal)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(normal) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, bytes(body) if info.filename.endswith("data.pkl") else src.read(info))
    with pytest.raises(BicmError, match="build more than"):
        read_torch_file(path)


def test_ordinary_torch_files_still_read_the_same(tmp_path):
    from bicm.safeload import read_torch_file

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    obj = {"sd": model.state_dict(), "opt": opt.state_dict(), "p": torch.nn.Parameter(torch.ones(2)),
           "size": torch.Size([2, 3]), "dtype": torch.float16, "view": torch.arange(10)[2:5],
           "bf": torch.ones(2, dtype=torch.bfloat16), "rng": torch.get_rng_state()}
    for zipped in (True, False):
        path = tmp_path / f"f{zipped}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        ours, theirs = read_torch_file(path), torch.load(path, weights_only=True)
        assert ours["sd"]._metadata == theirs["sd"]._metadata
        for key in theirs["sd"]:
            assert torch.equal(ours["sd"][key], theirs["sd"][key])
        assert torch.equal(ours["view"], theirs["view"]) and ours["size"] == theirs["size"]
        assert isinstance(ours["p"], torch.nn.Parameter) and ours["dtype"] is torch.float16
        model.load_state_dict(ours["sd"])
        opt.load_state_dict(ours["opt"])


def test_a_tensor_larger_than_its_storage_is_refused(tmp_path):
    import pickle
    import zipfile

    from bicm.errors import BicmError
    from bicm.safeload import read_torch_file

    normal = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(2)}, normal)
    with zipfile.ZipFile(normal) as src:
        data = src.read([n for n in src.namelist() if n.endswith("data.pkl")][0])
    assert b"K\x02\x85" in data
    hostile = data.replace(b"K\x02\x85", b"J\x00\x00\x00\x10\x85", 1)  # shape (2**28,) over 2 floats
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(normal) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, hostile if info.filename.endswith("data.pkl") else src.read(info))
    with pytest.raises(BicmError, match="does not fit in its storage"):
        read_torch_file(path)
    del pickle


_KAM_CHILD = r'''
import sys, json
from bicm.errors import BicmError
from bicm.kam import KamModel
try:
    KamModel.load(sys.argv[1]); outcome = "loaded"
except BicmError as exc:
    outcome = "refused: " + str(exc)
except Exception as exc:
    outcome = "crashed: " + type(exc).__name__
hwm = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]) // 1024
print(json.dumps({"outcome": outcome, "peak_mb": hwm}))
'''


@pytest.mark.slow
def test_a_kam_file_declaring_a_huge_hidden_width_is_refused_before_allocating(tmp_path):
    from safetensors.torch import save_file

    from bicm.kam import FILE_KEY, KamMLP, KamConfig, KamModel

    good = KamModel(KamMLP(1, 8), KamConfig(hidden=8), "x" * 16)
    good.save(tmp_path / "good.kam")
    meta = {"format": "bicm-kam-v1", "embed_dim": 1, "config": {"hidden": 20000}, "backbone_id": "x" * 16}
    from bicm import kam as kam_module

    meta["format"] = kam_module._FORMAT
    state = {k: v for k, v in good.mlp.state_dict().items()}
    state["net.0.weight"] = torch.zeros(20000, 4)  # the one layer the old check compared
    save_file(state, str(tmp_path / "bomb.kam"), metadata={FILE_KEY: json.dumps(meta)})
    runs = {}
    for name in ("good", "bomb"):
        done = subprocess.run([sys.executable, "-c", _KAM_CHILD, str(tmp_path / f"{name}.kam")], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["good"]["outcome"] == "loaded", runs
    assert runs["bomb"]["outcome"].startswith("refused: ") and "do not match" in runs["bomb"]["outcome"], runs
    assert runs["bomb"]["peak_mb"] <= runs["good"]["peak_mb"] + BOUND_MB, runs


@pytest.mark.parametrize("vision", [dict(width=8192, layers=1, patch_size=16, image_size=32),
                                    dict(width=4096, layers=1, patch_size=1, image_size=100_000_000),
                                    dict(width=64, layers=1_000_000, patch_size=16, image_size=32)])
def test_a_safetensors_config_declaring_an_absurd_architecture_is_refused_before_building(tmp_path, vision):
    from safetensors.torch import save_file

    from bicm.checkpoints import load_from_file
    from bicm.errors import BicmError

    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision,
                         "text_cfg": dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)}}
    path = tmp_path / "absurd.safetensors"
    save_file({"logit_scale": torch.ones(())}, str(path), metadata={"open_clip_config": json.dumps(cfg)})
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BicmError, match="does not fit the architecture|cannot build a model"):
        load_from_file(path, None, None)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < BOUND_MB
