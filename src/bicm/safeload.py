"""Reading files from strangers: regular files only, pickles checked, TorchScript never run.

Three guards every file reader in bicm goes through:

- :func:`regular_file`: a path must name a regular file (or a link to one). A FIFO would
  block the reader forever and ``/dev/zero`` would grow its memory until the kernel kills
  it; both are refused before anything is opened.
- :func:`check_pickle`: before a pickle is handed to ``torch.load(weights_only=True)`` its
  opcodes are scanned (nothing is built). torch's allow-list holds two callables that make a
  large object from a small file: ``bytearray`` given a size, and ``_codecs.encode`` with a
  bytes-to-bytes codec (``hex`` doubles its input; nested, 444 bytes ask for 32 GiB).
  Pickles that use either are refused.
- :func:`read_torchscript`: an OpenAI-style TorchScript archive is a zip of code and pickles.
  ``torch.jit.load`` compiles and runs that code (and the objects' ``__setstate__``), so bicm
  never calls it: the module tree in ``data.pkl`` is read with a restricted unpickler that
  knows only tensors, storages and placeholder objects for the ``__torch__`` classes, the
  storages are read from the archive's ``data/`` records, and which tensors are parameters or
  buffers is read from the ``__parameters__``/``__buffers__`` lines of the code files as text.
"""

from __future__ import annotations

import ast
import codecs
import io
import os
import pickle
import pickletools
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from .errors import BicmError

__all__ = ["regular_file", "check_pickle", "check_torch_file", "read_torchscript", "is_torchscript"]

#: A zip record may decompress to at most this many times its stored size (zip-bomb guard;
#: torch writes its records uncompressed).
MAX_ZIP_RATIO = 100


def regular_file(path: Union[str, Path], what: str = "file", missing: Optional[str] = None) -> Path:
    """``path`` as a :class:`Path` when it names a regular file; else a one-line BicmError.

    A missing path reads ``missing`` (default "<what> not found: <path>"); a folder, FIFO,
    socket or device reads "<what> <path> is not a regular file (it is a FIFO)". Links are
    followed. Only ``stat`` is called: a FIFO is never opened, so this cannot block.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise BicmError(missing or f"{what} not found: {path}") from None
    except OSError as exc:
        raise BicmError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte
        raise BicmError(f"bad {what} path {path!r}: {exc}") from None
    if not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            kind = "a folder"
        elif stat.S_ISFIFO(mode):
            kind = "a FIFO"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "a device"
        elif stat.S_ISSOCK(mode):
            kind = "a socket"
        else:
            kind = "special"
        raise BicmError(f"{what} {path} is not a regular file (it is {kind})")
    return path


def is_regular(path: Union[str, Path]) -> bool:
    """True when ``path`` exists and is a regular file (or a link to one); never blocks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def json_loads(text: Union[str, bytes], source: Any = "JSON") -> Any:
    """``json.loads`` whose pathological inputs end in one BicmError line.

    Deep nesting (RecursionError) and integers of more than Python's 4,300-digit limit are
    refused naming ``source``; malformed JSON still raises :class:`json.JSONDecodeError`, so
    callers keep their own messages for it.
    """
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise BicmError(f"{source}: JSON nested too deeply to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if "digits" in str(exc):
            raise BicmError(f"{source}: holds an integer of more than 4,300 digits") from None
        raise BicmError(f"{source}: unreadable JSON ({str(exc)[:120]})") from None


# --------------------------------------------------------------------------- pickle scan

_SIZE_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}


def _is_bytes_codec(name: str) -> bool:
    if len(name) > 32:
        return False
    try:
        info = codecs.lookup(name)
    except (LookupError, TypeError, ValueError):
        return False
    return not getattr(info, "_is_text_encoding", True)


def check_pickle(data: Union[bytes, Any], source: str, n_pickles: int = 1) -> None:
    """Refuse a pickle that would build a large object from a small input (nothing is run).

    Scans up to ``n_pickles`` consecutive pickles in ``data`` (bytes, or a binary stream read
    only as far as the pickles go). A pickle that cannot be parsed is left to the real
    reader, which fails on it with its own message.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    for _ in range(n_pickles):
        strings: list[str] = []
        names: list[str] = []
        pending: Optional[str] = None  # a size-taking callable waiting for its argument
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                    text = arg.decode("latin1") if isinstance(arg, bytes) else arg
                    strings.append(text)
                    continue
                name = None
                if op.name == "GLOBAL":
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name is not None:
                    names.append(name)
                    pending = name if name.rsplit(".", 1)[-1] in ("bytearray", "bytes") else None
                    continue
                if pending and op.name in _SIZE_OPS:
                    raise BicmError(
                        f"refusing to read {source}: it asks for {pending}(<size>), which builds memory from a "
                        "number instead of data (nothing from the file was run)"
                    )
                if op.name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "STOP"):
                    pending = None
                elif op.name not in ("MARK", "EMPTY_TUPLE", "TUPLE1", "TUPLE", "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE", "FRAME"):
                    pending = None
        except BicmError:
            raise
        except Exception:
            return  # not (or no longer) a pickle: the reader reports it
        if any(n.endswith("_codecs.encode") for n in names):
            bad = sorted({s for s in strings if _is_bytes_codec(s)})
            if bad:
                raise BicmError(
                    f"refusing to read {source}: it encodes data with the {bad[0]!r} codec, which can blow a "
                    "few bytes up into gigabytes (nothing from the file was run)"
                )
        at_end = not stream.peek(1) if hasattr(stream, "peek") else stream.tell() >= len(data)
        if at_end:
            return


def _zip_entries(path: Path, archive: zipfile.ZipFile) -> None:
    size = max(path.stat().st_size, 1)
    for info in archive.infolist():
        if info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1) or info.file_size > MAX_ZIP_RATIO * size:
            raise BicmError(f"refusing to read {path}: its record {info.filename} would unpack to {info.file_size:,} bytes")


def check_torch_file(path: Path, source: Optional[str] = None) -> None:
    """Scan the pickles of a ``torch.save`` file (zip or legacy) before ``torch.load`` reads it."""
    source = source or str(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                _zip_entries(path, archive)
                for name in archive.namelist():
                    if name.endswith(".pkl"):
                        check_pickle(archive.read(name), source)
        except zipfile.BadZipFile:
            return  # torch.load reports it
    else:
        with open(path, "rb") as handle:  # a legacy file's storages follow its pickles: not read
            check_pickle(handle, source, n_pickles=6)


# --------------------------------------------------------------------------- TorchScript

def is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (``code/``) or constants (``constants.pkl``)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class ScriptObject:
    """Placeholder for an object of a TorchScript class: its attributes, nothing callable."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_state", {})


class _StorageType:
    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> Any:
    import torch

    if not isinstance(storage, torch.Tensor):
        raise BicmError("a tensor in the archive does not refer to a storage")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BicmError(f"a tensor in the archive does not fit its storage ({str(exc).splitlines()[0][:120]})") from None


def _same(value: Any, *_ignored: Any) -> Any:
    return value


#: What TorchScript pickles call to tag typed lists (``List[int]``...): they return their input.
_JIT_BUILDERS = {name: _same for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_complexlist", "restore_type_tag",
)}


class _ScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._source = archive, prefix, source
        self._classes: dict[str, type] = {}
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        import collections

        import torch

        key = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if key not in self._classes:
                self._classes[key] = type(name, (ScriptObject,), {"qualname": key})
            return self._classes[key]
        if key in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
            return _JIT_BUILDERS[name]
        if key == "collections.OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(getattr(torch, _STORAGE_DTYPES[name]))
        raise BicmError(
            f"refusing to read {self._source}: its TorchScript pickle asks for {key}, which model weights never "
            "need (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise BicmError(f"cannot read {self._source}: unknown storage reference in its TorchScript pickle")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        dtype = kind.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        record = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            raise BicmError(f"cannot read {self._source}: storage record {record} is missing") from None
        if not isinstance(numel, int) or numel < 0 or info.file_size != numel * itemsize:
            raise BicmError(
                f"cannot read {self._source}: storage record {record} holds {info.file_size:,} bytes, "
                f"not the {numel!r} elements its pickle claims"
            )
        raw = bytearray(self._archive.read(record))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        self._storages[key] = flat
        return flat


_CLASS_RE = re.compile(r"^class (\w+)\(")
_LIST_RE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


def _declared_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, dict[str, list[str]]]:
    """``{qualified class: {"__parameters__": [...], "__buffers__": [...]}}`` read as text."""
    found: dict[str, dict[str, list[str]]] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        text = archive.read(name).decode("utf-8", "replace")
        current: Optional[str] = None
        for line in text.splitlines():
            match = _CLASS_RE.match(line)
            if match:
                current = f"{module}.{match.group(1)}"
                found.setdefault(current, {})
                continue
            match = _LIST_RE.match(line)
            if match and current is not None:
                try:
                    names = ast.literal_eval(match.group(2))  # a literal list of strings: evaluates nothing
                except (ValueError, SyntaxError):
                    names = []
                found[current][match.group(1)] = [str(n) for n in names]
    return found


def read_torchscript(path: Path) -> tuple[dict[str, Any], frozenset[str]]:
    """The parameters and buffers of a TorchScript archive, without compiling or running it.

    Returns ``(state, buffers)``: ``state`` maps dotted names to tensors as
    the state dict of the loaded archive would; ``buffers`` names the buffers among them.
    """
    import torch

    source = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            _zip_entries(path, archive)
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise BicmError(f"cannot read {path}: a TorchScript archive holds one data.pkl, found {len(pickles)}")
            prefix = pickles[0].rsplit("/", 1)[0]
            if f"{prefix}/byteorder" in archive.namelist():
                order = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise BicmError(f"cannot read {path}: its tensors are stored {order}-endian")
            declared = _declared_names(archive, prefix)
            try:
                root = _ScriptUnpickler(archive.read(pickles[0]), archive, prefix, source).load()
            except (BicmError, RecursionError, MemoryError):
                raise
            except Exception as exc:
                raise BicmError(f"cannot read {path}: broken TorchScript pickle ({type(exc).__name__}: {str(exc)[:120]})") from None
    except zipfile.BadZipFile as exc:
        raise BicmError(f"cannot read {path}: broken zip archive ({exc})") from None
    except RecursionError:
        raise BicmError(f"cannot read {path}: its pickle is nested too deeply") from None
    if not isinstance(root, ScriptObject):
        raise BicmError(f"cannot read {path}: the archive's data.pkl is not a module")
    state: dict[str, Any] = {}
    buffers: set[str] = set()
    seen: set[int] = set()

    def walk(obj: ScriptObject, prefix: str, depth: int) -> None:
        if id(obj) in seen or depth > 200:
            return
        seen.add(id(obj))
        attrs = obj.state if isinstance(obj.state, dict) else {}
        names = declared.get(obj.qualname)
        if names is None:  # no code file names this class: take every tensor as a parameter
            params = [k for k, v in attrs.items() if isinstance(v, torch.Tensor)]
            bufs: list[str] = []
        else:
            params, bufs = names.get("__parameters__", []), names.get("__buffers__", [])
        for key in list(params) + list(bufs):
            value = attrs.get(key)
            if isinstance(value, torch.Tensor):
                state[prefix + key] = value
                if key in bufs:
                    buffers.add(prefix + key)
        for key, value in attrs.items():
            if isinstance(value, ScriptObject):
                walk(value, f"{prefix}{key}.", depth + 1)

    walk(root, "", 0)
    return state, frozenset(buffers)

