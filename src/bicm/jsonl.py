"""Append-only JSON Lines files that survive a crash: the resumable runs' output format."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from .errors import BicmError
from .safeload import json_loads

__all__ = ["JsonlAppender", "finite", "finite_json", "read_jsonl"]


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def finite_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become null)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def read_jsonl(path: Union[str, Path], *, drop_cut_tail: bool = True) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file. A last line without its newline (a crash while
    writing it) is skipped when ``drop_cut_tail``; any other bad line is an error."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1 if drop_cut_tail else len(data)
    for number, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json_loads(line, f"{path} line {number}")
        except json.JSONDecodeError:
            raise BicmError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise BicmError(f"{path} line {number} is not a JSON object")
        yield record


class JsonlAppender:
    """Append records to a JSON Lines file so that a run can resume.

    Opening an existing file reads the keys it already holds (``record[key_field]``, in
    :attr:`done`) and removes a last line cut short by a crash. :meth:`append` writes a
    batch of records and fsyncs once, so a crash loses at most the batch in flight.
    """

    def __init__(self, path: Union[str, Path], key_field: str) -> None:
        self.path = Path(path)
        self.key_field = key_field
        self.done: set[str] = set()
        if self.path.exists():
            for number, record in enumerate(read_jsonl(self.path), start=1):
                if key_field not in record:
                    raise BicmError(f"{self.path} record {number} has no {key_field!r}; not appending to it")
                self.done.add(str(record[key_field]))
            data = self.path.read_bytes()
            good = data.rfind(b"\n") + 1
            if good < len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(good)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        self._handle.write("".join(finite_json(r) + "\n" for r in records))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.update(str(r[self.key_field]) for r in records)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
