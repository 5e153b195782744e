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
persistent storage ids) does the reader hand the file to bicm's capped torch reader
(:func:`bicm.safeload.read_torch_file`), which knows tensors, with the same numpy names added.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import BicmError
from ..safeload import BUILTIN_NAMES, MB, CappedUnpickler, _refuse, read_torch_file, regular_file

__all__ = ["BUILTIN_NAMES", "NUMPY_NAMES", "load_pickle", "load_torch_file"]

# pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2): how a legacy torch.save file starts.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."

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


class _RestrictedUnpickler(CappedUnpickler):
    """bicm's capped unpickler (:class:`~bicm.safeload.CappedUnpickler`: only the names of
    ``allowed``, at most ``64 MB + 16 x the file's size`` built in all) for annotation data:
    a pickle that refers to torch goes to the torch reader instead."""

    needs = "annotation data"

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in self._allowed and (module == "torch" or module.startswith("torch.")):
            raise _HoldsTensors()  # the torch reader decides on torch's own names
        return super().find_class(module, name)

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
    """A ``torch.save`` file holding tensors, read by bicm's capped torch reader
    (:func:`~bicm.safeload.read_torch_file`) with ``allowed`` added to torch's names."""
    import torch

    # for a legacy file, which torch.load reads after the capped scan: torch only BUILDs objects
    # of allowed types; "numpy.ndarray" itself resolves to a stand-in that cannot be called, so
    # the real type goes in under a name GLOBAL (one line) cannot spell
    extra = [(obj, name) for name, obj in allowed.items() if not name.startswith(("builtins.", "__builtin__.", "_codecs."))]
    extra += _numpy_dtype_classes()
    extra.append((__import__("numpy").ndarray, "numpy.ndarray\n(built by _reconstruct, never looked up)"))
    try:
        return read_torch_file(path, "annotation file", allowed, needs="annotation data", torch_globals=extra)
    except BicmError:
        raise
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
