"""Safe reading of the pickles that grounding annotations come in. No pickled code ever runs.

A pickle can name any importable callable and have it called while loading (``os.system``
included). The readers therefore unpickle with an allow-list: only the names in
:data:`BUILTIN_NAMES` (plain container and number types) and, for split files,
:data:`NUMPY_NAMES` (what rebuilds a numeric numpy array) can be looked up; any other name
stops the load with a :class:`~bicm.errors.BicmError` before it is called.

Three containers are read:

- plain pickles (the refer API's ``refs(unc).p``, written by Python 2);
- legacy ``torch.save`` files (the TransVG split files): a magic-number pickle, a protocol
  pickle, a system-info pickle, then the object pickle;
- zip ``torch.save`` files (torch >= 1.6): ``<archive>/data.pkl`` inside.

They are read with a restricted :class:`pickle.Unpickler` (the C one: the 3 MB RefCOCO split
loads in 0.2 s, against 1.3-1.6 s for ``torch.load(weights_only=True)``, whose unpickler is
pure Python). Only when the object holds torch tensors (it names ``torch.*`` rebuild functions or
persistent storage ids) does the reader hand the file to ``torch.load(weights_only=True)``,
whose own allow-list covers tensors, with the same numpy names added.
"""

from __future__ import annotations

import builtins
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import BicmError
from ..safeload import check_torch_file, regular_file

__all__ = ["BUILTIN_NAMES", "NUMPY_NAMES", "load_pickle", "load_torch_file"]

# pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2): how a legacy torch.save file starts.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."

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


def _numpy_names() -> dict[str, Any]:
    """Allow-list that rebuilds numeric numpy arrays and scalars (numpy 1 and 2 names)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    class ndarray_name:  # noqa: N801  (what "numpy.ndarray" resolves to)
        """Stands for ``numpy.ndarray`` as the argument of ``_reconstruct``; called itself (an
        array of any shape from a few bytes), it refuses."""

        bicm_argument = True  # passed to a callable, never called: not wrapped by the budget

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            raise _refuse("numpy.ndarray(<shape>)")

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        # numpy pickles start every array empty (shape (0,)) and fill it from its data;
        # another shape would allocate memory the file does not hold
        if subtype is ndarray_name:
            subtype = np.ndarray
        if not (isinstance(subtype, type) and issubclass(subtype, np.ndarray)):
            raise _refuse(f"numpy's _reconstruct of a {type(subtype).__name__}")
        if tuple(shape) != (0,):
            raise _refuse(f"an empty numpy array of shape {tuple(shape)!r}")
        return multiarray._reconstruct(subtype, shape, dtype)

    def scalar(dtype: Any, *data: Any) -> Any:
        if not isinstance(dtype, np.dtype):
            raise _refuse("a numpy scalar of no dtype")
        if not data and dtype.itemsize > 64:
            raise _refuse(f"a {dtype.itemsize:,}-byte numpy scalar without its data")
        if data and isinstance(data[0], (bytes, bytearray)) and len(data[0]) < dtype.itemsize:
            raise BicmError("a numpy scalar in the pickle is shorter than its dtype")
        return multiarray.scalar(dtype, *data)

    names: dict[str, Any] = {"numpy.ndarray": ndarray_name, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[f"{module}._reconstruct"] = reconstruct
        names[f"{module}.scalar"] = scalar
    return names


class _HoldsTensors(Exception):
    """The pickle refers to torch storages: only ``torch.load`` can rebuild those."""


MB = 1 << 20


def _built_size(value: Any) -> int:
    """About how many bytes an object built by an allowed callable holds (itself, not what it
    refers to: those were built, and counted, before)."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return 8 * len(value) + 64
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if isinstance(nbytes, int) else 64


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only look up the names of ``allowed``, and whose calls may build
    at most ``64 MB + 16 x the file's size`` in all.

    Every allowed callable copies at most a few times its input, but the memo lets a pickle
    pass one large string to thousands of calls for two bytes each (``list(s)``, ``bytearray(s)``...):
    without a total, a 1 MB file could still ask for gigabytes.
    """

    def __init__(self, file: io.BufferedIOBase, allowed: Mapping[str, Any], source: str, size: int = 0, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._source = source
        self._budget = 64 * MB + 16 * size
        self._spent = 0

    def _counted(self, func: Any, key: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            self._spent += _built_size(result)
            if self._spent > self._budget:
                raise BicmError(
                    f"refusing to read {self._source}: its calls ({key} and others) build more than "
                    f"{self._budget // MB} MB from the file (nothing from the file was run)"
                )
            return result

        return call

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self._allowed:
            found = self._allowed[key]
            return found if getattr(found, "bicm_argument", False) else self._counted(found, key)
        if module == "torch" or module.startswith("torch."):
            raise _HoldsTensors()  # torch.load(weights_only=True) decides on torch's own names
        raise BicmError(
            f"refusing to read {self._source}: it asks for {key}, which annotation data never needs "
            "(nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _HoldsTensors()


def _unpickle(data: bytes, allowed: Mapping[str, Any], source: str, n_objects: int = 1) -> list[Any]:
    """Read ``n_objects`` consecutive pickles from ``data``; UTF-8 strings, Latin-1 fallback.

    Python 2 pickles hold ``str`` as bytes of unknown encoding: UTF-8 is tried first (it is
    what the annotation tools wrote); files that are not valid UTF-8 are read as Latin-1.
    """
    for encoding in ("utf-8", "latin1"):
        stream = io.BytesIO(data)
        try:
            return [_RestrictedUnpickler(stream, allowed, source, len(data), encoding=encoding).load() for _ in range(n_objects)]
        except UnicodeDecodeError:
            continue
        except _HoldsTensors:
            raise
        except BicmError as exc:
            if source in str(exc):
                raise
            raise BicmError(f"{source}: {exc} (nothing from the file was run)") from None
        except Exception as exc:  # truncated or not a pickle at all
            raise BicmError(f"cannot read {source}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    raise AssertionError("latin1 decodes any bytes")  # pragma: no cover


def _read_bytes(path: Path) -> bytes:
    regular_file(path, "annotation file", missing=f"annotation file {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_pickle(path: Path, allowed: Mapping[str, Any] = BUILTIN_NAMES) -> Any:
    """Load a plain pickle whose globals are limited to ``allowed``.

    Raises
    ------
    BicmError
        When the file is missing or unreadable, or asks for a name outside ``allowed``.
    """
    return _unpickle(_read_bytes(path), allowed, str(path))[0]


def load_torch_file(path: Path, allowed: Mapping[str, Any] | None = None) -> Any:
    """Load a ``torch.save`` file (legacy or zip) or a plain pickle of numpy/builtin data.

    Parameters
    ----------
    path
        The file.
    allowed
        Names the pickle may look up; :data:`BUILTIN_NAMES` plus :data:`NUMPY_NAMES` by default.

    Raises
    ------
    BicmError
        When the file is missing or unreadable, or asks for any other name (``os.system``...).
    """
    allowed = dict(allowed) if allowed is not None else {**BUILTIN_NAMES, **NUMPY_NAMES}
    data = _read_bytes(path)
    try:
        if data.startswith(_LEGACY_MAGIC):
            # magic number, protocol version, system info, then the object itself
            return _unpickle(data, allowed, str(path), n_objects=4)[3]
        if data.startswith(b"PK\x03\x04"):
            return _unpickle(_zip_data_pkl(data, path), allowed, str(path))[0]
        return _unpickle(data, allowed, str(path))[0]
    except _HoldsTensors:
        return _torch_load(path, allowed)


def _zip_data_pkl(data: bytes, path: Path) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise BicmError(f"cannot read {path}: a torch zip file holds one data.pkl, found {len(names)}")
            return archive.read(names[0])
    except zipfile.BadZipFile as exc:
        raise BicmError(f"cannot read {path}: broken zip archive ({exc})") from None


def _torch_load(path: Path, allowed: Mapping[str, Any]) -> Any:
    """``torch.load(weights_only=True)`` with ``allowed`` added to torch's own allow-list."""
    import torch

    extra = [(obj, name) for name, obj in allowed.items() if not name.startswith(("builtins.", "__builtin__.", "_codecs."))]
    extra += _numpy_dtype_classes()
    # torch only BUILDs objects of allowed types; "numpy.ndarray" itself resolves to a stand-in
    # that cannot be called, so the real type goes in under a name GLOBAL (one line) cannot spell
    extra.append((__import__("numpy").ndarray, "numpy.ndarray\n(built by _reconstruct, never looked up)"))
    check_torch_file(path)  # torch's allow-list holds bytearray(size) and _codecs.encode(hex): memory bombs
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
        what = found.group(1) if found else "a name outside the allow-list"
        raise BicmError(
            f"refusing to read {path}: it asks for {what}, which annotation data never needs "
            "(nothing from the file was run)"
        ) from None
    except Exception as exc:
        raise BicmError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _numpy_dtype_classes() -> list[Any]:
    """numpy 2's per-dtype classes (``Float32DType``...) that ``torch.load`` must also allow."""
    import numpy as np

    return [type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"] if hasattr(np, "dtypes") else []


#: Names that rebuild numpy arrays and scalars (numpy 1 and 2 module names). The elements
#: of an object array come through the same allow-list.
NUMPY_NAMES: Mapping[str, Any] = _numpy_names()
