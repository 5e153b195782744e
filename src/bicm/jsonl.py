"""Append-only JSON Lines files that survive a crash: the resumable runs' output format."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from .errors import BicmError
from .safeload import json_loads

__all__ = ["FIELD_KINDS", "JsonlAppender", "check_field", "finite", "finite_json", "read_jsonl", "read_records"]


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


def read_jsonl(path: Union[str, Path], *, drop_cut_tail: bool = True, numbered: bool = False) -> Iterator[Any]:
    """The records of a JSON Lines file (``(line number, record)`` pairs when ``numbered``;
    blank lines are skipped). A last line without its newline (a crash while writing it) is
    skipped when ``drop_cut_tail``; any other bad line is an error."""
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
        yield (number, record) if numbered else record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _box(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_number(v) for v in value):
        return None
    return tuple(float(v) for v in value)


def _proper_box(value: Any) -> Any:
    box = _box(value)
    return box if box is not None and box[2] > box[0] and box[3] > box[1] else None


def _boxes(value: Any, one: Callable[[Any], Any]) -> Any:
    if not isinstance(value, list) or not value:
        return None
    boxes = [one(v) for v in value]
    return None if any(b is None for b in boxes) else boxes


def _text(value: Any) -> Any:
    return value if isinstance(value, str) and value.strip() else None


#: What a record field may hold, by kind: (checker returning the value to use or None, what it
#: must be in an error message). One set of rules for every dataset reader.
FIELD_KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "text": (_text, "a non-empty string"),
    "str": (lambda v: v if isinstance(v, str) else None, "a string"),
    "path": (_text, "a non-empty string (a file path)"),
    "box": (_box, "4 finite numbers"),
    "xyxy": (_proper_box, "4 finite numbers x1, y1, x2, y2 with x2 > x1 and y2 > y1"),
    "boxes": (lambda v: _boxes(v, _box), "a non-empty list of boxes of 4 finite numbers"),
    "xyxy_boxes": (lambda v: _boxes(v, _proper_box), "a non-empty list of boxes x1, y1, x2, y2 (x2 > x1, y2 > y1)"),
    "names": (lambda v: v if isinstance(v, list) and all(_text(n) for n in v) else None, "a list of non-empty strings"),
    "count": (lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None, "an integer >= 0"),
    "number": (lambda v: float(v) if _number(v) else None, "a finite number"),
}


def check_field(record: dict[str, Any], key: str, kind: str, where: str, *, required: bool = True) -> Any:
    """``record[key]`` checked against :data:`FIELD_KINDS` ``[kind]`` (boxes come back as tuples
    of floats); a missing or wrong value is one :class:`BicmError` naming ``where`` (the file
    and line) and the field. A missing optional field gives None."""
    if key not in record:
        if not required:
            return None
        raise BicmError(f"{where}: no {key!r}")
    check, what = FIELD_KINDS[kind]
    value = check(record[key])
    if value is None:
        shown = json.dumps(record[key], allow_nan=True, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise BicmError(f"{where}: {key!r} must be {what}, not {shown}")
    return value


def read_records(
    path: Union[str, Path], fields: dict[str, str], optional: Optional[dict[str, str]] = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of a dataset's JSON Lines file with their fields checked: yields ``(where,
    record)`` where ``where`` is ``"<path> line <n>"`` and the fields named in ``fields``
    (required) and ``optional`` (key -> kind of :data:`FIELD_KINDS`) hold the checked values.

    A dataset file is written whole (atomically), so unlike a run's append-only file a last
    line without its newline is an error here, like any other line that is not a JSON object
    or whose fields are missing or of the wrong type: one :class:`BicmError` naming the file
    and line.
    """
    path = Path(path)
    for line, record in read_jsonl(path, drop_cut_tail=False, numbered=True):
        where = f"{path} line {line}"
        checked = dict(record)
        for key, kind in fields.items():
            checked[key] = check_field(record, key, kind, where)
        for key, kind in (optional or {}).items():
            if key in record:
                checked[key] = check_field(record, key, kind, where)
        yield where, checked


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
