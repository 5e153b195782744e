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
import builtins
import codecs
import io
import os
import pickle
import pickletools
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

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


# --------------------------------------------------------------------------- capped unpickling

_BUILTIN_TYPES = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int",
                  "list", "set", "str", "tuple")

def _sized(kind: type) -> Any:
    """``bytes``/``bytearray`` that refuse a size argument: ``bytearray(10**12)`` in a pickle is
    a memory bomb (data pickles rebuild them from their contents, never from a size)."""

    def build(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise BicmError(f"refusing to read a pickle that asks for {kind.__name__}({args[0]}) (a size, not data)")
        return kind(*args)

    return build


def _refuse(what: str) -> BicmError:
    return BicmError(f"refusing to read a pickle that asks for {what}, which builds a large object from a small input")


def _text_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` for what protocol-2 pickles need (``bytes`` as latin-1 text) only:
    bytes-to-bytes codecs (``hex`` doubles its input; nested, a few bytes ask for gigabytes) are refused."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or not isinstance(errors, str):
        raise _refuse(f"_codecs.encode({type(obj).__name__}, ...)")
    import codecs

    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise BicmError(f"refusing to read a pickle that asks for the unknown codec {encoding[:40]!r}") from None
    if not getattr(info, "_is_text_encoding", True):
        raise _refuse(f"_codecs.encode(..., {encoding[:40]!r})")
    return __import__("_codecs").encode(obj, encoding, errors)


def _plain_str(*args: Any) -> str:
    """``str`` of text or bytes only: ``str`` of a container is its repr, which repeats shared
    objects and so turns a few bytes of memo references into gigabytes."""
    if not args:
        return ""
    if isinstance(args[0], str) and len(args) == 1:
        return args[0]
    if isinstance(args[0], (bytes, bytearray)) and len(args) >= 2:
        return str(*args)
    if isinstance(args[0], (int, float)) and len(args) == 1:
        return str(args[0])
    raise _refuse(f"str({type(args[0]).__name__})")


#: Names a pickle of plain Python data may need (``__builtin__`` is Python 2's module name;
#: ``_codecs.encode`` is how protocol-2 pickles rebuild ``bytes``).
BUILTIN_NAMES: dict[str, Any] = {
    **{f"{m}.{t}": getattr(builtins, t) for m in ("builtins", "__builtin__") for t in _BUILTIN_TYPES},
    **{f"{m}.{t.__name__}": _sized(t) for m in ("builtins", "__builtin__") for t in (bytes, bytearray)},
    "builtins.str": _plain_str,
    "__builtin__.str": _plain_str,
    "__builtin__.unicode": _plain_str,
    "__builtin__.long": int,
    "_codecs.encode": _text_encode,
}


MB = 1 << 20

#: What one new object of a container built by an allowed call may cost beyond its slot: the
#: items of ``list(text)`` are new one-character strings (cached only for Latin-1).
_NEW_ITEM_BYTES = 80


def _built_size(value: Any, args: tuple[Any, ...] = ()) -> int:
    """About how many bytes an object built by an allowed callable holds: the container itself
    (``sys.getsizeof``: a set or dict table is several times 8 bytes an item), plus new items
    when it was made by iterating text (what it refers to otherwise was built, and counted, before)."""
    import sys

    if isinstance(value, (str, bytes, bytearray)):
        return len(value) + 64
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        size = sys.getsizeof(value)
        if any(isinstance(a, (str, bytes, bytearray)) for a in args):
            size += _NEW_ITEM_BYTES * len(value)
        return size
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) + 64 if isinstance(nbytes, int) else 64


def pickle_budget(pickle_bytes: int) -> int:
    """What the calls of a pickle of ``pickle_bytes`` bytes may build in all: 64 MB + 16 x its size."""
    return 64 * MB + 16 * max(int(pickle_bytes), 0)


class CappedUnpickler(pickle.Unpickler):
    """The C unpickler, restricted to the names of ``allowed``, whose calls may build at most
    :func:`pickle_budget` of ``size`` bytes in all.

    Every allowed callable copies at most a few times its input, but the memo lets a pickle
    pass one large container to thousands of calls for two bytes each (``set(s)``,
    ``OrderedDict(s)``, ``torch.Size(s)``...): without a total, a 1 MB file could still ask for
    gigabytes. Subclasses charge what else they build (:meth:`charge`).
    """

    #: what the refusal says the file's kind never needs
    needs = "model weights"

    def __init__(self, file: Any, allowed: Mapping[str, Any], source: str, size: int = 0, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._source = source
        self._budget = pickle_budget(size)
        self._spent = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` built for ``what`` against the budget; refuse past it."""
        self._spent += max(int(nbytes), 0)
        if self._spent > self._budget:
            raise BicmError(
                f"refusing to read {self._source}: its calls ({what} and others) build more than "
                f"{self._budget // MB} MB from the file (nothing from the file was run)"
            )

    def _counted(self, func: Any, key: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            self.charge(_built_size(result, args), key)
            return result

        return call

    def refuse_name(self, key: str) -> BicmError:
        return BicmError(
            f"refusing to read {self._source}: it asks for {key}, which {self.needs} never need "
            "(nothing from the file was run)"
        )

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self._allowed:
            found = self._allowed[key]
            return found if getattr(found, "bicm_argument", False) else self._counted(found, key)
        raise self.refuse_name(key)


# --------------------------------------------------------------------------- torch.save files

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "complex64", "complex128", "float", "double", "half", "long", "int", "short")


class _StorageType:
    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


class _Storage:
    """A storage from the file: its flat tensor (``None`` when only scanning) and element count.
    No ``__dict__``, and ``__setstate__`` refuses: a BUILD cannot grow it."""

    __slots__ = ("flat", "numel", "dtype", "claimed")

    def __init__(self, flat: Any, numel: int, dtype: Any) -> None:
        self.flat, self.numel, self.dtype, self.claimed = flat, numel, dtype, 0

    def __setstate__(self, state: Any) -> None:
        raise BicmError("a storage in the file is given a state (torch never writes one)")


class _Scanned:
    """What a tensor reads as while a legacy file is only scanned: nothing to BUILD on."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise BicmError("a tensor in the file is given a state (torch never writes one)")


def _no_build(state: Any) -> None:
    raise BicmError("a tensor in the file is given a state (torch never writes one)")


class TorchUnpickler(CappedUnpickler):
    """Reads the pickle of a ``torch.save`` file within :func:`pickle_budget`; nothing is run.

    Knows tensors (``_rebuild_tensor_v2``/``_rebuild_parameter`` over the ``('storage', type,
    key, location, numel)`` references of the pickle, read from ``storage(key, dtype, numel)``),
    ``collections.OrderedDict`` (a BUILD on one, as state dicts carry their ``_metadata``, is
    counted), ``torch.Size``, ``torch.device``, torch dtypes, the names of ``allowed`` (plain
    containers by default) and nothing else. A tensor must lie inside its storage, and views of
    one storage larger in all than it are counted against the budget (they become memory as soon
    as anything copies them). ``storage=None`` only scans: tensors are placeholders.
    """

    def __init__(self, data: Any, source: str, storage: Optional[Any], allowed: Optional[Mapping[str, Any]] = None,
                 size: Optional[int] = None, needs: str = "model weights") -> None:
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        if size is None:
            size = len(data) if isinstance(data, (bytes, bytearray)) else 0
        super().__init__(stream, BUILTIN_NAMES if allowed is None else allowed, source,
                         size, encoding="utf-8")
        self.needs = needs
        self._storage_reader = storage
        self._storages: dict[str, _Storage] = {}
        self._guarded: list[Any] = []

    # -- names
    def find_class(self, module: str, name: str) -> Any:
        import collections

        import torch

        key = f"{module}.{name}"
        if key in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._rebuild_tensor
        if key == "torch._utils._rebuild_parameter":
            return self._rebuild_parameter
        if key == "torch._utils._rebuild_parameter_with_state":
            return self._rebuild_parameter_with_state
        if key == "torch._tensor._rebuild_from_type_v2":
            return self._rebuild_from_type_v2
        if key == "collections.OrderedDict":
            return self._counted(self._ordered_dict, key)
        if key == "torch.Size":
            return self._counted(torch.Size, key)
        if key == "torch.device":
            return self._counted(self._device, key)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(getattr(torch, _STORAGE_DTYPES[name]))
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if key in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            return {"torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter}[key]
        return super().find_class(module, name)

    @staticmethod
    def _device(spec: Any, index: Any = None) -> Any:
        import torch

        if not isinstance(spec, (str, int)) or (isinstance(spec, str) and len(spec) > 32):
            raise BicmError("a device in the file is not a short name")
        return torch.device(spec) if index is None else torch.device(spec, index)

    def _guard(self, obj: Any, setstate: Any) -> Any:
        """Give ``obj`` its own ``__setstate__`` for the load (a BUILD looks it up on the
        instance first); :meth:`load` takes it off again."""
        obj.__setstate__ = setstate
        self._guarded.append(obj)
        return obj

    def _ordered_dict(self, *args: Any) -> Any:
        import collections
        import sys

        made = collections.OrderedDict(*args)

        def setstate(state: Any) -> None:
            # what torch's own loader does for an OrderedDict (its `_metadata`), counted: a memo
            # lets one large state be given to thousands of them
            if not isinstance(state, dict):
                raise BicmError("an OrderedDict in the file is given a state that is not a dict")
            self.charge(sys.getsizeof(state), "collections.OrderedDict (its state)")
            made.__dict__.update({k: v for k, v in state.items() if k != "__setstate__"})

        return self._guard(made, setstate)

    # -- tensors
    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise BicmError(f"cannot read {self._source}: unknown storage reference in its pickle")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if len(key) > 64 or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise BicmError(f"cannot read {self._source}: malformed storage reference in its pickle")
        found = self._storages.get(key)
        if found is not None:
            if found.dtype != kind.dtype or found.numel != numel:
                raise BicmError(f"cannot read {self._source}: storage {key} is referred to with two sizes")
            return found
        self.charge(256, "a storage")
        flat = None if self._storage_reader is None else self._storage_reader(key, kind.dtype, numel)
        made = _Storage(flat, numel, kind.dtype)
        self._storages[key] = made
        return made

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        hooks: Any = None, metadata: Any = None) -> Any:
        import torch

        if not isinstance(storage, _Storage):
            raise BicmError(f"cannot read {self._source}: a tensor does not refer to a storage")
        ints = lambda v: isinstance(v, (tuple, list)) and len(v) <= 64 and all(type(i) is int for i in v)  # noqa: E731
        if not (ints(size) and ints(stride) and len(size) == len(stride) and type(offset) is int):
            raise BicmError(f"cannot read {self._source}: a tensor has a malformed size or stride")
        if any(i < 0 for i in size) or any(i < 0 for i in stride) or offset < 0:
            raise BicmError(f"cannot read {self._source}: a tensor has a negative size, stride or offset")
        numel = 1
        for i in size:
            numel *= i
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else 0
        if numel and last >= storage.numel:
            raise BicmError(
                f"cannot read {self._source}: a tensor of shape {tuple(size)} does not fit in its storage of "
                f"{storage.numel:,} elements"
            )
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        self.charge(256 + 16 * len(size), "a tensor")
        # views of one storage beyond its size become memory as soon as something copies them
        storage.claimed += numel
        if storage.claimed > storage.numel:
            self.charge(numel * itemsize if storage.claimed - numel >= storage.numel else
                        (storage.claimed - storage.numel) * itemsize, "tensors sharing one storage")
        if storage.flat is None:
            return _Scanned()
        try:
            tensor = storage.flat.as_strided(tuple(size), tuple(stride), offset)
            if requires_grad is True:
                tensor.requires_grad_(True)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise BicmError(f"cannot read {self._source}: a tensor does not fit its storage ({str(exc).splitlines()[0][:120]})") from None
        return self._guard(tensor, _no_build)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = True, hooks: Any = None) -> Any:
        import torch

        if isinstance(data, _Scanned):
            return data
        if not isinstance(data, torch.Tensor):
            raise BicmError(f"cannot read {self._source}: a parameter holds no tensor")
        self.charge(256, "a parameter")
        return self._guard(torch.nn.Parameter(data, requires_grad=bool(requires_grad)), _no_build)

    def _set_state(self, obj: Any, state: Any) -> Any:
        import sys

        if state is None or isinstance(obj, _Scanned):
            return obj
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict) or not all(isinstance(k, str) for k in part):
                raise BicmError(f"cannot read {self._source}: a tensor's attributes are not a dict of names")
            self.charge(sys.getsizeof(part) + 64 * len(part), "a tensor's attributes")
            for k, v in part.items():
                if k.startswith("__"):
                    raise BicmError(f"cannot read {self._source}: a tensor's attributes name {k[:40]!r}")
                setattr(obj, k, v)
        return obj

    def _rebuild_parameter_with_state(self, data: Any, requires_grad: Any, hooks: Any, state: Any) -> Any:
        return self._set_state(self._rebuild_parameter(data, requires_grad, hooks), state)

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        import torch

        if func not in (self._rebuild_tensor, self._rebuild_parameter) or not isinstance(args, tuple):
            raise BicmError(f"cannot read {self._source}: a tensor is rebuilt by something other than torch's tensor rebuild")
        made = func(*args)
        if new_type is torch.nn.Parameter and isinstance(made, torch.Tensor) and not isinstance(made, torch.nn.Parameter):
            made = self._guard(torch.nn.Parameter(made, requires_grad=made.requires_grad), _no_build)
        elif new_type not in (torch.Tensor, torch.nn.Parameter):
            raise BicmError(f"cannot read {self._source}: a tensor of type {getattr(new_type, '__name__', '?')}, which {self.needs} never need")
        return self._set_state(made, state)

    def load(self) -> Any:
        try:
            return super().load()
        finally:
            for obj in self._guarded:
                try:
                    del obj.__setstate__
                except AttributeError:
                    pass
            self._guarded.clear()


def _storage_from_zip(archive: zipfile.ZipFile, prefix: str, source: str, charge: Any) -> Any:
    def read(key: str, dtype: Any, numel: int) -> Any:
        import torch

        record = f"{prefix}/data/{key}"
        try:
            info = archive.getinfo(record)
        except KeyError:
            raise BicmError(f"cannot read {source}: storage record {record} is missing") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size != numel * itemsize:
            raise BicmError(
                f"cannot read {source}: storage record {record} holds {info.file_size:,} bytes, "
                f"not the {numel:,} elements its pickle claims"
            )
        charge(info.file_size - info.compress_size, f"the compressed record {record}")
        if not numel:
            return torch.empty(0, dtype=dtype)
        raw = bytearray(info.file_size)
        with archive.open(info) as handle:
            if handle.readinto(raw) != info.file_size:
                raise BicmError(f"cannot read {source}: storage record {record} is truncated")
        return torch.frombuffer(raw, dtype=dtype)

    return read


def _torch_zip_pickle(archive: zipfile.ZipFile, path: Path) -> tuple[str, zipfile.ZipInfo]:
    pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pickles) != 1:
        raise BicmError(f"cannot read {path}: a torch zip file holds one data.pkl, found {len(pickles)}")
    prefix = pickles[0].filename.rsplit("/", 1)[0]
    if f"{prefix}/byteorder" in archive.namelist():
        order = archive.read(f"{prefix}/byteorder")[:16].decode("ascii", "replace").strip()
        if order != "little":
            raise BicmError(f"cannot read {path}: its tensors are stored {order}-endian")
    return prefix, pickles[0]


def read_torch_file(path: Union[str, Path], what: str = "file", allowed: Optional[Mapping[str, Any]] = None,
                    needs: str = "model weights", torch_globals: Any = ()) -> Any:
    """The object a ``torch.save`` file holds (tensors on the CPU), read within a memory budget.

    Zip files (torch >= 1.6) are read by :class:`TorchUnpickler` itself: tensors are views of
    the ``data/`` records, checked against them, and everything the pickle builds counts
    against :func:`pickle_budget` of its size. Legacy files (a chain of pickles with the
    storages after them) are scanned by the same unpickler first, tensors as placeholders, and
    only then handed to ``torch.load(weights_only=True)``, which then builds no more than the
    scan allowed. ``allowed``: the names beyond torch's the pickle may use (plain containers by
    default; ``torch_globals``: the same for ``torch.load``). Raises a one-line :class:`BicmError` for what it refuses; other failures
    (a broken file) are raised as they come, for the caller to word.
    """
    path = regular_file(path, what)
    source = str(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                _zip_entries(path, archive)
                prefix, info = _torch_zip_pickle(archive, path)
                data = archive.read(info)
                unpickler = TorchUnpickler(data, source, None, allowed, size=min(len(data), info.compress_size or len(data)),
                                           needs=needs)
                unpickler.charge(len(data) - info.compress_size, "its compressed pickle")
                unpickler._storage_reader = _storage_from_zip(archive, prefix, source, unpickler.charge)
                return _load(unpickler, path)
        except zipfile.BadZipFile as exc:
            raise BicmError(f"cannot read {path}: broken zip archive ({exc})") from None
    return _scan_legacy(path, source, allowed, needs, torch_globals)


def _scan_legacy(path: Path, source: str, allowed: Optional[Mapping[str, Any]], needs: str, torch_globals: Any) -> Any:
    """A legacy ``torch.save`` file: its pickles scanned within the budget (tensors as
    placeholders, storages declared no larger than the file), then ``torch.load``."""
    import torch

    check_torch_file(path, source)
    with open(path, "rb") as handle:
        data = handle.read(64 * MB)  # the pickles come first; the storages after them are not read here
    # magic number, protocol version, system info, the object; anything else is one pickle
    count = 4 if data.startswith(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.") else 1
    ends, stream = [], io.BytesIO(data)
    try:
        for _ in range(count):
            for _op in pickletools.genops(stream):
                pass
            ends.append(stream.tell())
    except Exception as exc:
        raise BicmError(f"cannot read {path}: broken pickle ({type(exc).__name__}: {str(exc)[:120]})") from None
    declared = [0]

    def scan(key: str, dtype: Any, numel: int) -> None:
        declared[0] += numel * torch.empty((), dtype=dtype).element_size()

    stream = io.BytesIO(data[: ends[-1]])
    for _ in range(count):
        unpickler = TorchUnpickler(stream, source, None, allowed, size=ends[-1], needs=needs)
        unpickler._storage_reader = scan
        _load(unpickler, path)
    if declared[0] > path.stat().st_size:
        raise BicmError(
            f"cannot read {path}: its pickle declares {declared[0]:,} bytes of tensors, more than the file holds "
            "(nothing from the file was run)"
        )
    with torch.serialization.safe_globals(list(torch_globals)):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _load(unpickler: TorchUnpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except (BicmError, MemoryError):
        raise
    except RecursionError:
        raise BicmError(f"cannot read {path}: its pickle is nested too deeply") from None
    except Exception as exc:
        raise BicmError(f"cannot read {path}: broken pickle ({type(exc).__name__}: {str(exc)[:120]})") from None


def stored_bytes(tensors: Any) -> int:
    """The bytes of distinct storage behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = max(seen.get(storage.data_ptr() or id(storage), 0), storage.nbytes())
    return sum(seen.values())


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


class ScriptObject:
    """Placeholder for an object of a TorchScript class: its attributes, nothing callable."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_state", {})


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

