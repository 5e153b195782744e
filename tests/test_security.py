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
from typing import Optional

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bicm import BicmError
from bicm.checkpoints import read_state_dict
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
    from .helpers import draw_scene

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
        if path.name not in ("_pickle.py", "safeload.py"):
            assert not re.search(r"\bpickle\.(loads?|Unpickler)\b", text), path.name
            assert "allow_pickle=True" not in text, path.name
            assert "dill" not in text and "joblib.load" not in text, path.name


# --------------------------------------------------------------------------------------------
# Class 1: a TorchScript archive is code. bicm reads its tensors as data and never compiles it.

TORCHSCRIPT_EVIL = '''
import sys, warnings
from typing import Tuple
import torch
warnings.simplefilter("ignore")
marker, out, where = sys.argv[1], sys.argv[2], sys.argv[3]

class Evil(torch.nn.Module):
    """Its __setstate__ runs when torch.jit.load reads it: torch.from_file(shared=True) creates a file."""
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.path = marker
    def forward(self, x):
        return x * self.weight
    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.path = state[1]
        t = torch.from_file(self.path, True, 16, dtype=torch.uint8)
        self.training = state[2] and bool(t.numel() > 0)

class Holder(torch.nn.Module):
    """A plain module (parameters, a buffer) with the evil one inside."""
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.register_buffer("mask", torch.ones(3))
        self.evil = Evil()
    def forward(self, x):
        return self.evil(self.proj(x)) * self.mask[0]

model = Evil() if where == "root" else Holder()
torch.jit.save(torch.jit.script(model), out)
'''


@pytest.fixture(scope="module")
def evil_torchscript(tmp_path_factory):
    """(marker, {"root": archive, "child": archive}); each runs code when torch.jit.load reads it."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("evil-ts")
    marker = folder / "MARKER"
    script = folder / "make.py"
    script.write_text(TORCHSCRIPT_EVIL)
    archives = {}
    for where in ("root", "child"):
        archives[where] = folder / f"evil-{where}.pt"
        subprocess.run([sys.executable, str(script), str(marker), str(archives[where]), where], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert not marker.exists()
    return marker, archives


@pytest.mark.slow
def test_the_evil_torchscript_archive_really_runs_code_under_torch_jit_load(evil_torchscript, tmp_path):
    """The control: the payload works, so the tests below prove something."""
    import subprocess
    import sys

    marker, archives = evil_torchscript
    code = "import sys, torch, warnings; warnings.simplefilter('ignore'); torch.jit.load(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(archives["root"])], check=True, timeout=300)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("where", ["root", "child"])
def test_a_torchscript_checkpoint_is_read_without_running_its_code(evil_torchscript, where):
    marker, archives = evil_torchscript
    try:
        contents = read_state_dict(archives[where])
    except BicmError as exc:  # the root one holds its tensor in a tuple state: no tensors found
        assert where == "root" and "\n" not in str(exc)
    else:
        assert where == "child"
        assert set(contents.state) == {"proj.weight", "proj.bias", "mask"} and contents.is_torchscript
        assert contents.optional == {"mask"}
    assert not marker.exists(), "the archive's code ran"


@pytest.mark.parametrize("command", ["ground", "serve"])
def test_the_cli_never_runs_a_torchscript_checkpoint(evil_torchscript, tmp_path, command):
    from .helpers import draw_scene

    marker, archives = evil_torchscript
    draw_scene().save(tmp_path / "img.png")
    args = {"ground": ["ground", str(tmp_path / "img.png"), "a dog"], "serve": ["serve", "--port", "0"]}[command]
    for archive in archives.values():
        result = CliRunner().invoke(app, args + ["--checkpoint", str(archive)])
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
        assert len(errors) == 1, result.stderr
    assert not marker.exists(), "the archive's code ran"


def test_torchscript_reader_matches_torch_jit_state_dict(tmp_path):
    """Parameters, buffers, views with offsets and strides come out as torch.jit.load gives them."""
    import warnings

    from bicm.safeload import read_torchscript

    class Sub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.register_buffer("mask", torch.arange(6.0).view(2, 3))
            self.plain = torch.zeros(1)  # an attribute, neither parameter nor buffer

        def forward(self, x):
            return self.lin(x) * self.mask[0, 0] + self.plain

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Sub(), Sub()])
            self.p = torch.nn.Parameter(torch.arange(8.0).view(2, 4)[:, 1])  # a strided view at an offset
            self.h16 = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)[:, :3]
            return x + self.p.sum() + self.h16.float().sum()

    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Top()), str(path))
        loaded = torch.jit.load(str(path))
    state, buffers = read_torchscript(path)
    reference = loaded.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value) and state[key].dtype == value.dtype, key
    assert buffers == {name for name, _ in loaded.named_buffers()}


def _rezip(data: bytes, change) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in source.namelist():
            replaced = change(name, source.read(name))
            if replaced is not None:
                archive.writestr(name, replaced)
    return out.getvalue()


@pytest.mark.parametrize("case", ["os-system-in-data", "lying-numel", "missing-record", "two-data-pkl", "big-endian",
                                  "tensor-out-of-storage", "truncated-pickle", "deep-nesting"])
def test_broken_or_hostile_torchscript_archives_end_in_one_line(tmp_path, case):
    import warnings

    marker = tmp_path / "MARKER"
    good = tmp_path / "good.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(good))
    data = good.read_bytes()
    evil = pickle.dumps(WritesMarker(marker), protocol=2)

    def change(name, content):
        if case == "os-system-in-data" and name.endswith("/data.pkl"):
            return evil
        if case == "lying-numel" and name.endswith("/data.pkl"):
            assert b"K\x04t" in content
            return content.replace(b"K\x04t", b"J\x00\x00\x00\x40t")
        if case == "missing-record" and name.endswith("/data/0"):
            return None
        if case == "two-data-pkl" and name.endswith("/version"):
            return content
        if case == "big-endian" and name.endswith("/byteorder"):
            return b"big"
        if case == "tensor-out-of-storage" and name.endswith("/data.pkl"):
            assert b"(K\x02K\x02t" in content
            return content.replace(b"(K\x02K\x02t", b"(K\x09K\x09t", 1)
        if case == "truncated-pickle" and name.endswith("/data.pkl"):
            return content[: len(content) // 2]
        if case == "deep-nesting" and name.endswith("/data.pkl"):
            return b"\x80\x02" + b"]" * 200000 + b"."
        return content

    crafted = _rezip(data, change)
    if case == "two-data-pkl":
        crafted = _rezip(crafted, lambda n, c: c)
        buffer = io.BytesIO(crafted)
        with zipfile.ZipFile(buffer, "a") as archive:
            archive.writestr("other/data.pkl", evil)
        crafted = buffer.getvalue()
    path = tmp_path / "weights.pt"
    path.write_bytes(crafted)
    with pytest.raises(BicmError) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_no_torch_jit_load_anywhere_in_bicm():
    src = Path(__file__).resolve().parents[1] / "src" / "bicm"
    for path in src.rglob("*.py"):
        assert not re.search(r"jit\.load\(", path.read_text()), path.name


# --------------------------------------------------------------------------------------------
# Class 2: every path bicm reads must be a regular file. A FIFO would block the reader forever,
# /dev/zero would grow its memory until the kernel kills it.


def _library_readers():
    """(label, reader taking a path): every kind of file bicm reads, through the library."""
    from bicm.cache import FeatureCache
    from bicm.data.flickr30k import parse_annotation_xml, read_split_ids
    from bicm.data.jsonl import read_jsonl_dataset
    from bicm.data.refer import _read_instances
    from bicm.imageio import load_image
    from bicm.kam import KamModel
    from bicm.proposals.files import read_detections, read_proposals_file
    from bicm.proposals.naming import Vocabulary
    from bicm.pseudo import read_image_list, read_query_list

    return {
        "checkpoint": read_state_dict,
        "kam-model": KamModel.load,
        "feature-cache": FeatureCache,
        "vocabulary": lambda p: Vocabulary.load(str(p)),
        "query-list": read_query_list,
        "image-list": read_image_list,
        "detections": read_detections,
        "proposals-file": read_proposals_file,
        "dataset-jsonl": read_jsonl_dataset,
        "annotation-pickle": load_pickle,
        "torch-split": load_torch_file,
        "transvg-split": read_transvg_split,
        "image": load_image,
        "split-list": read_split_ids,
        "flickr-xml": parse_annotation_xml,
        "instances-json": _read_instances,
    }


READERS = list(_library_readers())


def _special_file(tmp_path, kind):
    path = tmp_path / "unc_testA.pth"  # a name the TransVG reader accepts: only the file's type is wrong
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_what_is_not_a_regular_file(tmp_path, reader, kind):
    """Refused from the file's type alone (stat), in under a few seconds: never opened."""
    import threading
    import time

    if reader == "image-list" and kind == "folder":
        pytest.skip("a folder of images is a valid image list")
    path = _special_file(tmp_path, kind)
    unblock = threading.Timer(20.0, lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))) if kind == "fifo" else None
    if unblock is not None:  # a reader that opens the FIFO would hang the suite: give it EOF after 20 s
        unblock.daemon = True
        unblock.start()
    start = time.monotonic()
    try:
        with pytest.raises(BicmError) as info:
            _library_readers()[reader](path)
    finally:
        if unblock is not None:
            unblock.cancel()
    assert time.monotonic() - start < 10
    if reader == "vocabulary" and kind == "folder":
        assert "unknown vocabulary" in str(info.value) or "not a regular file" in str(info.value)
    else:
        assert "not a regular file" in str(info.value), str(info.value)
    assert "not found" not in str(info.value) and "\n" not in str(info.value)


CLI_PATH_CASES = {
    "checkpoint": lambda p, img: ["ground", img, "a dog", "--checkpoint", p],
    "kam": lambda p, img: ["ground", img, "a dog", "--kam", p],
    "detections": lambda p, img: ["ground", img, "a dog", "--proposals", p],
    "image": lambda p, img: ["ground", p, "a dog"],
    "convert-source": lambda p, img: ["proposals", "convert", p, p + ".out.jsonl"],
    "pseudo-queries": lambda p, img: ["pseudo-label", "-o", p + ".run", "--images", str(Path(img).parent), "--queries", p],
    "eval-jsonl": lambda p, img: ["eval", "--dataset", "jsonl", "--split", "test", "--annotations", p, "--images", str(Path(img).parent)],
    "cache": lambda p, img: ["eval", "--dataset", "shapes-ref", "--split", "test", "--limit", "1", "--cache", p],
}


@pytest.mark.parametrize("case", list(CLI_PATH_CASES))
def test_the_cli_refuses_a_fifo_in_one_line(tmp_path, case):
    from .helpers import draw_scene

    img = tmp_path / "img.png"
    draw_scene().save(img)
    path = _special_file(tmp_path, "fifo")
    import threading

    unblock = threading.Timer(30.0, lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.daemon = True
    unblock.start()
    try:
        result = CliRunner().invoke(app, CLI_PATH_CASES[case](str(path), str(img)))
    finally:
        unblock.cancel()
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and "not a regular file" in errors[0], result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Class 3: allowed pickle callables that build a large object from a few bytes.


def _x(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def nested_hex(depth: int) -> bytes:
    """_codecs.encode(..._codecs.encode(_codecs.encode('aaaaaaaa', 'latin1'), 'hex')..., 'hex'): 8 * 2**depth bytes."""
    call = b"c_codecs\nencode\n(" + _x("a" * 8) + _x("latin1") + b"tR"
    for _ in range(depth):
        call = b"c_codecs\nencode\n(" + call + _x("hex") + b"tR"
    return b"\x80\x02" + call + b"."


def shared_repr(width: int = 2000) -> bytes:
    """str() of a list holding a list holding one string `width` times each: width**2 * 1000 chars."""
    body = _x("a" * 1000) + b"q\x00"
    body += b"](" + b"h\x00" * width + b"eq\x01"
    body += b"](" + b"h\x01" * width + b"eq\x02"
    return b"\x80\x02cbuiltins\nstr\n(h\x02tR" + b"." if False else b"\x80\x02cbuiltins\nstr\n(" + body + b"tR."


MEMORY_BOMBS = {
    "nested-hex-40": nested_hex(40),  # asks for 8 TiB
    "nested-base64-40": nested_hex(40).replace(_x("hex"), _x("base64")),
    "str-of-shared-list": shared_repr(),  # 4 GB of repr
    "bytearray-size": b"\x80\x02c__builtin__\nbytearray\n(J\x00\x00\x00\x7ftR.",
    "numpy-scalar-no-data": b"\x80\x02cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(" + _x("V2000000000") + b"tRtR.",
    "numpy-empty-array": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\nJ\x00\x00\x00\x7f\x85" + _x("b") + b"tR.",
    "numpy-ndarray-call": b"\x80\x02cnumpy\nndarray\n(J\x00\x00\x00\x7f\x85" + _x("b") + b"tR.",
}

BOMB_CONTAINERS = ["plain", "torch-zip", "torch-legacy"]


def _bomb_file(tmp_path: Path, bomb: str, container: str) -> Path:
    data = MEMORY_BOMBS[bomb]
    if container == "torch-zip":
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buffer)
        data = _rezip(buffer.getvalue(), lambda name, content: data if name.endswith("data.pkl") else content)
    elif container == "torch-legacy":
        buffer = io.BytesIO()
        torch.save({"w": 1}, buffer, _use_new_zipfile_serialization=False)
        head = buffer.getvalue()
        # magic, protocol, system info, then the object
        stream = io.BytesIO(head)
        for _ in range(3):
            pickle.load(stream)
        data = head[: stream.tell()] + data
    path = tmp_path / "bomb.pth"
    path.write_bytes(data)
    return path


_MEASURE = r'''
import resource, sys, json
from pathlib import Path
from typing import Optional
import torch  # noqa: F401  (its import is part of the baseline)
from bicm import BicmError
from bicm.checkpoints import read_state_dict
from bicm.data._pickle import load_pickle, load_torch_file
readers = {"load_pickle": load_pickle, "load_torch_file": load_torch_file, "read_state_dict": read_state_dict}
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))  # a safety net, not the bound
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in sys.argv[2:]:
    try:
        readers[name](Path(sys.argv[1]))
        outcome = "loaded"
    except BicmError as exc:
        outcome = "refused: " + str(exc)
    except MemoryError:
        outcome = "MemoryError"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak so far: growth is cumulative
    print(json.dumps({"reader": name, "outcome": outcome, "grew_mb": (after - before) / 1024}), flush=True)
'''

#: The bound: reading a file of a few hundred bytes may raise peak memory by at most this.
PEAK_GROWTH_MB = 64


@pytest.mark.parametrize("container", BOMB_CONTAINERS)
@pytest.mark.parametrize("bomb", list(MEMORY_BOMBS))
@pytest.mark.slow
def test_memory_bombs_from_allowed_names_are_refused_within_the_bound(tmp_path, bomb, container):
    import json
    import subprocess
    import sys

    path = _bomb_file(tmp_path, bomb, container)
    assert path.stat().st_size < 100_000
    readers = ["read_state_dict", "load_torch_file"] + (["load_pickle"] if container == "plain" else [])
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), *readers], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["reader"] for r in reports] == readers
    for report in reports:
        assert report["outcome"].startswith("refused: "), report
        assert report["grew_mb"] < PEAK_GROWTH_MB, report


def test_ordinary_numpy_and_bytes_still_load(tmp_path):
    """The guards leave real data alone: arrays, scalars, bytes and bytearrays, protocol 2 and 4."""
    import numpy as np

    value = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.float64(2.5), "b": b"\x00\xffxyz",
             "ba": bytearray(b"abc"), "o": np.array(["x", 1], dtype=object), "t": "text", "n": [1, 2.0, None]}
    for protocol in (2, 4):
        path = tmp_path / f"ok{protocol}.p"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        loaded = load_torch_file(path)
        assert np.array_equal(loaded["a"], value["a"]) and loaded["s"] == 2.5 and loaded["b"] == value["b"]
        assert loaded["ba"] == value["ba"] and list(loaded["o"]) == ["x", 1] and loaded["n"] == value["n"]


def test_the_nested_hex_bomb_is_real():
    """The control: an unrestricted unpickler really doubles the input per level."""
    assert len(pickle.loads(nested_hex(20))) == 8 * 2**20


# --------------------------------------------------------------------------------------------
# Class 7: numeric options have ranges; JSON output never holds NaN or Infinity.

BAD_NUMBERS = [
    ("serve", "--port", "70000"), ("serve", "--port", "-1"), ("serve", "--max-upload-mb", "inf"),
    ("serve", "--max-upload-mb", "nan"), ("serve", "--max-upload-mb", "0"), ("serve", "--timeout", "-inf"),
    ("serve", "--timeout", "0"), ("serve", "--cache-images", "-1"), ("serve", "--top-n", "0"),
    ("ground", "--lambda-k", "inf"), ("ground", "--lambda-k", "nan"), ("ground", "--lambda-k", "-1"),
    ("ground", "--lambda-t", "inf"), ("ground", "--lambda-t", "nan"), ("ground", "--lambda-t", "-1"),
    ("ground", "--thr-a", "1.5"), ("ground", "--thr-a", "nan"), ("ground", "--score-floor", "-0.1"),
    ("ground", "--top-n", "0"), ("ground", "--max-proposals", "-5"), ("ground", "--max-pixels", "-1"),
    ("ground", "--max-image-pixels", "-1"), ("ground", "--tsv-class-offset", "-1"), ("ground", "--threads", "100000"),
    ("eval", "--limit", "-1"), ("eval", "--thr-a", "inf"),
    ("pseudo-label", "--thr-k", "nan"), ("pseudo-label", "--features-above", "inf"),
    ("train-kam", "--lr", "0"), ("train-kam", "--lr", "inf"), ("train-kam", "--epochs", "0"),
    ("train-kam", "--hidden", "0"), ("train-kam", "--batch-pairs", "0"), ("train-kam", "--seed", "-1"),
    ("train-clip", "--steps", "0"), ("train-clip", "--batch-size", "0"), ("train-clip", "--lr", "nan"),
    ("train-detector", "--steps", "-1"), ("train-detector", "--save-every", "-1"), ("train-detector", "--eval-images", "-1"),
]


def _base_args(command: str, tmp_path: Path) -> list[str]:
    from .helpers import draw_scene

    image = tmp_path / "img.png"
    draw_scene().save(image)
    return {
        "serve": ["serve"],
        "ground": ["ground", str(image), "a dog"],
        "eval": ["eval", "--dataset", "shapes-ref", "--split", "test", "--out", str(tmp_path / "run")],
        "pseudo-label": ["pseudo-label", "-o", str(tmp_path / "run"), "--images", str(tmp_path), "--queries", str(image)],
        "train-kam": ["train-kam", str(tmp_path / "run"), "-o", str(tmp_path / "k.safetensors")],
        "train-clip": ["train-clip", "-o", str(tmp_path / "c.safetensors")],
        "train-detector": ["train-detector", "-o", str(tmp_path / "d.safetensors")],
    }[command]


@pytest.mark.parametrize("command,option,value", BAD_NUMBERS, ids=[f"{c}{o}={v}" for c, o, v in BAD_NUMBERS])
def test_out_of_range_numbers_end_in_one_line_before_any_work(tmp_path, command, option, value):
    import time

    start = time.monotonic()
    result = CliRunner().invoke(app, _base_args(command, tmp_path) + [option, value])
    assert time.monotonic() - start < 30
    assert result.exit_code == 2 and "Traceback" not in result.stderr, (result.exit_code, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and option in errors[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_finite_json_never_writes_nan_or_infinity():
    import json

    from bicm.jsonl import finite_json

    text = finite_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2.5, None), "e": "NaN"})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "a": None, "b": [1.0, None, {"c": None}], "d": [2.5, None], "e": "NaN"}


def test_ground_json_output_is_strict_json(tmp_path, tiny_checkpoint):
    import json

    from .helpers import draw_scene

    draw_scene().save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["ground", str(tmp_path / "img.png"), "a red ball", "--checkpoint", str(tiny_checkpoint),
                                      "--json", "--lambda-t", "1e308", "--lambda-k", "1e9"])
    assert result.exit_code == 0, result.stderr
    for line in result.stdout.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# --------------------------------------------------------------------------------------------
# Class 4: pathological but parseable text: deep nesting, giant integers, malformed KAM metadata.

DEEP = "[" * 200_000 + "]" * 200_000
HUGE_INT = "7" * 5000

PATHOLOGICAL_TEXT = {
    # (file name, text)
    "bicm-json-deep": ("dets.json", '{"box_format": "xyxy", "images": {"img.png": {"boxes": ' + DEEP + "}}}"),
    "bicm-json-huge-int": ("dets.json", '{"box_format": "xyxy", "images": {"img.png": {"boxes": [[1, 2, 3, ' + HUGE_INT + "]]}}}"),
    "bicm-jsonl-deep": ("dets.jsonl", '{"image": "img.png", "box_format": "xyxy", "boxes": ' + DEEP + "}\n"),
    "bicm-jsonl-huge-int": ("dets.jsonl", '{"image": "img.png", "box_format": "xyxy", "boxes": [[1, 2, 3, ' + HUGE_INT + "]]}\n"),
    "reclip-deep": ("reclip.json", '[{"image_id": 1, "box": ' + DEEP + "}]"),
    "reclip-huge-int": ("reclip.json", '{"1": [{"image_id": 1, "box": [1, 2, 3, ' + HUGE_INT + "]}]}"),
    "top-level-deep": ("dets.json", DEEP),
}


@pytest.mark.parametrize("case", list(PATHOLOGICAL_TEXT))
def test_pathological_detections_end_in_one_line(tmp_path, case):
    from bicm.proposals.files import read_proposals_file

    name, text = PATHOLOGICAL_TEXT[case]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BicmError) as info:
        read_proposals_file(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["deep", "huge-int"])
@pytest.mark.parametrize("where", ["ground", "convert", "eval-jsonl"])
def test_pathological_json_through_the_cli(tmp_path, case, where):
    from .helpers import draw_scene

    draw_scene().save(tmp_path / "img.png")
    bad = DEEP if case == "deep" else HUGE_INT
    dets = tmp_path / "dets.jsonl"
    dets.write_text('{"image": "img.png", "box_format": "xyxy", "boxes": ' + (bad if case == "deep" else f"[[1, 2, 3, {bad}]]") + "}\n")
    dataset = tmp_path / "data.jsonl"
    dataset.write_text('{"image": "img.png", "query": "a dog", "box": ' + (bad if case == "deep" else f"[1, 2, 3, {bad}]") + "}\n")
    args = {
        "ground": ["ground", str(tmp_path / "img.png"), "a dog", "--proposals", str(dets)],
        "convert": ["proposals", "convert", str(dets), str(tmp_path / "out.jsonl")],
        "eval-jsonl": ["eval", "--dataset", "jsonl", "--split", "test", "--annotations", str(dataset),
                       "--images", str(tmp_path), "--out", str(tmp_path / "run")],
    }[where]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1, result.stderr[-2000:]


def _kam_file(tmp_path: Path, meta_text: Optional[str], hidden: int = 8, embed: int = 4) -> Path:
    from safetensors.torch import save_file

    from bicm.kam import FILE_KEY, KamMLP

    state = {k: v.contiguous() for k, v in KamMLP(embed, hidden).state_dict().items()}
    path = tmp_path / "kam.safetensors"
    save_file(state, str(path), metadata={FILE_KEY: meta_text} if meta_text is not None else None)
    return path


def _kam_meta(**change):
    import json

    meta = {"format": 1, "config": {"hidden": 8}, "embed_dim": 4, "backbone_id": "x", "backbone_name": "", "use_names": True, "info": {}}
    for key, value in change.items():
        if value is KeyError:
            meta.pop(key)
        else:
            meta[key] = value
    return json.dumps(meta)


KAM_META_CASES = {
    "no-metadata": None,
    "not-json": "{nope",
    "deep": DEEP,
    "huge-int": '{"format": 1, "embed_dim": ' + HUGE_INT + "}",
    "a-list": "[1, 2]",
    "a-number": "3",
    "format-missing": _kam_meta(format=KeyError),
    "config-missing": _kam_meta(config=KeyError),
    "config-a-string": _kam_meta(config="big"),
    "config-unknown-key": _kam_meta(config={"hidden": 8, "evil": 1}),
    "hidden-a-string": _kam_meta(config={"hidden": "8"}),
    "hidden-huge": _kam_meta(config={"hidden": 10**9}),
    "hidden-zero": _kam_meta(config={"hidden": 0}),
    "lr-nan": _kam_meta(config={"hidden": 8, "lr": float("nan")}),
    "embed-missing": _kam_meta(embed_dim=KeyError),
    "embed-negative": _kam_meta(embed_dim=-1),
    "embed-huge": _kam_meta(embed_dim=10**6),
    "embed-mismatch": _kam_meta(embed_dim=5),
    "backbone-id-missing": _kam_meta(backbone_id=KeyError),
    "backbone-id-a-list": _kam_meta(backbone_id=[1]),
    "info-a-string": _kam_meta(info="x"),
}


def test_the_kam_fixture_metadata_is_valid(tmp_path):
    from bicm.kam import KamModel

    model = KamModel.load(_kam_file(tmp_path, _kam_meta()))
    assert model.config.hidden == 8 and model.backbone_id == "x"


@pytest.mark.parametrize("case", list(KAM_META_CASES))
def test_malformed_kam_metadata_ends_in_one_line(tmp_path, case):
    from bicm.kam import KamModel

    path = _kam_file(tmp_path, KAM_META_CASES[case])
    with pytest.raises(BicmError) as info:
        KamModel.load(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Class 9 (part): the refusal of a malicious pickle is bicm's own, without torch's advice.


@pytest.mark.parametrize("name", ["torch-zip", "torch-legacy", "plain-pickle-p2"])
def test_checkpoint_refusal_never_advises_weights_only_false(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = tmp_path / "weights.pt"
    path.write_bytes(payloads(marker)[name])
    with pytest.raises(BicmError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message
    assert "refusing" in message and "nothing from the file was run" in message, message
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Class 5: outputs that cannot be written are refused before the work, or keep the results.


def _output_cases(tmp_path: Path) -> dict:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    return {
        "save-vis-a-folder": (["--save-vis", str(a_dir)], "is a folder"),
        "save-vis-under-a-file": (["--save-vis", str(a_file / "vis.png")], "is a file, not a folder"),
        "save-vis-unknown-type": (["--save-vis", str(tmp_path / "vis.xyz")], "unknown picture type"),
        "save-vis-no-suffix": (["--save-vis", str(tmp_path / "vis")], "unknown picture type"),
    }


@pytest.mark.parametrize("case", ["save-vis-a-folder", "save-vis-under-a-file", "save-vis-unknown-type", "save-vis-no-suffix"])
def test_ground_refuses_an_unwritable_picture_before_the_work(tmp_path, case):
    from .helpers import draw_scene

    draw_scene().save(tmp_path / "img.png")
    extra, expected = _output_cases(tmp_path)[case]
    # no --checkpoint: the default model would need a download, so the refusal must come first
    result = CliRunner().invoke(app, ["ground", str(tmp_path / "img.png"), "a dog", *extra])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.parametrize("command", ["eval-out-a-file", "eval-summary-a-folder", "demo-out-a-folder", "demo-bad-type",
                                     "train-kam-out-under-a-file", "convert-out-a-folder", "extract-out-a-folder",
                                     "pseudo-out-a-file", "eval-merge-out-a-file"])
def test_other_commands_refuse_unwritable_outputs_before_the_work(tmp_path, command):
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    args = {
        "eval-out-a-file": ["eval", "--dataset", "shapes-ref", "--split", "test", "--out", str(a_file)],
        "eval-summary-a-folder": ["eval", "--dataset", "shapes-ref", "--split", "test", "--out", str(tmp_path / "run"),
                                  "--summary-json", str(a_dir)],
        "demo-out-a-folder": ["demo", "-o", str(a_dir)],
        "demo-bad-type": ["demo", "-o", str(tmp_path / "demo.nope")],
        "train-kam-out-under-a-file": ["train-kam", str(tmp_path), "-o", str(a_file / "kam.safetensors")],
        "convert-out-a-folder": ["proposals", "convert", str(a_file), str(a_dir)],
        "extract-out-a-folder": ["proposals", "extract", str(tmp_path), "-o", str(a_dir)],
        "pseudo-out-a-file": ["pseudo-label", "-o", str(a_file), "--images", str(tmp_path), "--queries", str(a_file)],
        "eval-merge-out-a-file": ["eval-merge", str(tmp_path), "--out", str(a_file)],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "folder" in errors[0] or "picture type" in errors[0], errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_picture_that_fails_to_write_keeps_the_printed_results(tmp_path, tiny_checkpoint, monkeypatch):
    """The write itself fails (disk full, simulated): the JSON is printed, then one error line."""
    import json

    import bicm.viz

    from .helpers import draw_scene

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bicm.viz, "save_visualization", full)
    draw_scene().save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["ground", str(tmp_path / "img.png"), "a red ball", "--checkpoint", str(tiny_checkpoint),
                                      "--json", "--save-vis", str(tmp_path / "vis.png")])
    assert result.exit_code == 2, result.stderr
    assert len([json.loads(line) for line in result.stdout.splitlines()]) == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "results above are complete" in errors[0]


# --------------------------------------------------------------------------------------------
# Class 6: a broken feature cache never stops a run: one warning with the real cause, no cache.


def _entry():
    return {"x": torch.arange(4.0)}, {"n": 1}


@pytest.mark.parametrize("fault", ["garbage-pages", "under-a-file", "disk-full", "not-sqlite"])
def test_a_broken_cache_warns_once_and_the_work_goes_on(tmp_path, fault):
    import sqlite3
    import warnings

    from bicm import BicmWarning
    from bicm.cache import CacheKey, FeatureCache

    def K(name):
        return CacheKey("test", "m", None, name)

    path = tmp_path / "features.sqlite"
    if fault == "garbage-pages":
        good = FeatureCache(path)
        good.put_many({K(f"k{i}"): _entry() for i in range(200)})
        good.close()
        data = bytearray(path.read_bytes())
        data[100:] = bytes(np.random.default_rng(0).integers(0, 256, len(data) - 100, dtype=np.uint8))
        path.write_bytes(bytes(data))  # the 100-byte header is intact
        for extra in tmp_path.glob("features.sqlite-*"):
            extra.unlink()
    elif fault == "under-a-file":
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "features.sqlite"
    elif fault == "not-sqlite":
        path.write_bytes(b"hello" * 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = FeatureCache(path)
        if fault == "disk-full":
            cache._connect().execute("PRAGMA max_page_count = 3")  # SQLite's own "disk is full"
        cache.put_many({K("a"): _entry()})
        cache.put_many({K(f"b{i}"): ({"x": torch.zeros(10_000)}, {}) for i in range(5)})
        assert cache.get_many([K("a"), K("b0")]) == {} or fault == "disk-full"
        len(cache)
    notes = [str(w.message) for w in caught if issubclass(w.category, BicmWarning)]
    assert len(notes) == 1, notes
    assert cache.broken is not None
    if fault == "disk-full":
        assert "full" in notes[0], notes[0]  # the real cause, not the rollback's error
    assert sqlite3  # noqa: B018


def test_xdg_cache_home_pointing_at_a_file_does_not_stop_eval(tmp_path, monkeypatch):
    """The default cache lies under XDG_CACHE_HOME; a file there turns the cache off with a warning."""
    from bicm.cache import CacheKey
    from bicm.options import RunOptions

    (tmp_path / "xdg").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.warns(Warning, match="cannot be used"):
        cache = RunOptions().feature_cache()
    assert cache.broken is not None and cache.get_many([CacheKey("text", "m", None, "k")]) == {}


# --------------------------------------------------------------------------------------------
# Class 9 (part): dataset image paths that leave --images are refused, not read.


@pytest.mark.parametrize("image", ["/etc/hostname", "../outside.png", "a/../../outside.png", "C:\\\\x.png", "..\\\\x.png"])
def test_dataset_image_paths_that_escape_the_image_folder_are_refused(tmp_path, image):
    import json

    from bicm.data import load_dataset

    from .helpers import draw_scene

    (tmp_path / "images").mkdir()
    draw_scene().save(tmp_path / "images" / "ok.png")
    draw_scene().save(tmp_path / "outside.png")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": name, "query": "a dog", "box": [1, 2, 30, 40], "split": "test"}) + "\n"
                            for name in ("ok.png", image)))
    with pytest.raises(BicmError, match="leave the image folder") as info:
        load_dataset("jsonl", "test", data, image_root=tmp_path / "images")
    assert "\n" not in str(info.value)


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    """Two evals into one --out used to duplicate every record; the second is now refused."""
    import subprocess
    import sys

    from bicm.atomic import folder_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bicm.atomic import folder_lock\n"
        "with folder_lock(sys.argv[1], 'bicm eval'):\n    print('held', flush=True); time.sleep(60)"), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BicmError, match="another bicm eval is writing to"):
            with folder_lock(tmp_path / "run", "bicm eval"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path / "run", "bicm eval"):  # free again once the holder is gone (even killed)
        pass


# --------------------------------------------------------------------------------------------
# Class 8: an image half-written when the disk filled is recomputed whole on resume.


def test_a_half_written_image_resumes_to_the_same_bytes(tmp_path, tiny_checkpoint):
    import shutil

    from .helpers import file_eval

    command = file_eval(tmp_path, tiny_checkpoint, 4)
    reference = CliRunner().invoke(app, command("ref", "none"))
    assert reference.exit_code == 0, reference.stderr
    full = (tmp_path / "ref" / "predictions.jsonl").read_bytes()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 12
    # the disk filled in the middle of the second image's three records: one whole, one cut
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "predictions.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    resumed = CliRunner().invoke(app, command("run", "none"))
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming: 4 of 12 queries" in resumed.stderr, resumed.stderr
    assert sorted((tmp_path / "run" / "predictions.jsonl").read_bytes().splitlines()) == sorted(full.splitlines())


# --------------------------------------------------------------------------------------------
# Class 9 (part): the server and clients that leave or stall mid-upload.


def _asgi_upload(app, *, stall: bool, seconds: float = 20.0):
    """POST a multipart upload by hand: part of the body, then a disconnect (or nothing at all)."""
    import asyncio

    boundary = "bicmsecboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + b"\0" * 1000
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/ground", "raw_path": b"/api/ground", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode()), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    parts = [head]

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": True}
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    async def run():
        await asyncio.wait_for(app(scope, receive, send), timeout=seconds)

    asyncio.run(run())
    return [m["status"] for m in sent if m["type"] == "http.response.start"]


@pytest.mark.parametrize("stall", [False, True], ids=["disconnect", "stall"])
def test_clients_that_leave_or_stall_mid_upload(tiny_backbone, stall):
    import time

    pytest.importorskip("starlette")
    from bicm.serve import create_app

    from .helpers import make_service

    service = make_service(tiny_backbone, timeout_s=1.0)
    try:
        start = time.monotonic()
        statuses = _asgi_upload(create_app(service), stall=stall)  # no exception escapes: nothing for the log
        assert time.monotonic() - start < 10
        assert statuses == ([408] if stall else [400]), statuses
    finally:
        service.close()


def memo_reuse(calls: int = 20_000, size: int = 1 << 20, call: str = "c__builtin__\nbytearray\n") -> bytes:
    """One 1 MB string in the memo, then `calls` calls that each copy it: 2 bytes per call.
    (A 1.1 MB file asking for 20 GB.)"""
    body = b"\x80\x03" + b"B" + size.to_bytes(4, "little") + b"a" * size + b"q\x00"  # BINBYTES
    body += call + b"q\x01"  # the callable, memoized too
    body += b"]("
    body += b"h\x01h\x00\x85R" * calls  # BINGET callable, BINGET string, TUPLE1, REDUCE
    return body + b"e."


@pytest.mark.parametrize("call", ["c__builtin__\nbytearray\n", "c__builtin__\nlist\n", "c_codecs\nencode\n"])
@pytest.mark.slow
def test_memo_reuse_amplification_is_bounded(tmp_path, call):
    import json
    import subprocess
    import sys

    data = memo_reuse(call=call.encode() if isinstance(call, str) else call)
    if "encode" in call:  # encode needs a str and a codec: a memoized latin-1 string
        size = 1 << 20
        data = (b"\x80\x02X" + size.to_bytes(4, "little") + b"a" * size + b"q\x00" + _x("latin1") + b"q\x02"
                + b"c_codecs\nencode\nq\x01](" + b"h\x01(h\x00h\x02tR" * 20_000 + b"e.")
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), "load_pickle"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("refused: ") and "build more than" in report["outcome"], report
    assert report["grew_mb"] < 64 + 16 * len(data) / 2**20 + 64, report  # the budget, plus one call's overshoot


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_write_that_fails_after_the_work_ends_in_one_line(tmp_path, monkeypatch, code):
    """proposals convert onto a full or read-only disk (simulated at the write)."""
    import errno

    import bicm.proposals.files

    source = tmp_path / "dets.jsonl"
    source.write_text('{"image": "img.png", "box_format": "xyxy", "boxes": [[1, 2, 30, 40]]}\n')

    def fail(path, *args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(path))

    monkeypatch.setattr(bicm.proposals.files, "write_detections", fail)
    result = CliRunner().invoke(app, ["proposals", "convert", str(source), str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
    assert len(errors) == 1 and os.strerror(getattr(errno, code)) in errors[0], result.stderr
