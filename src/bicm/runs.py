"""Run folders of the resumable commands (``bicm eval``, ``bicm pseudo-label``).

A run folder holds ``run.json`` (the settings of the work) beside an append-only JSON Lines
file of finished records (:class:`~bicm.jsonl.JsonlAppender`). Running the same command
again resumes: :func:`check_run_file` refuses a folder begun with other settings (one line,
no traceback) and writes ``run.json`` for a new one; :func:`kept_on_interrupt` turns Ctrl-C
into the :class:`~bicm.interrupt.Interrupted` that says how much was kept;
:func:`print_note` and :class:`ProgressBar` are what the user sees meanwhile.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from .atomic import atomic_write_text
from .errors import BicmError, warn
from .interrupt import Interrupted
from .jsonl import JsonlAppender
from .safeload import json_loads

__all__ = ["RunSettings", "check_run_file", "kept_on_interrupt", "print_note", "ProgressBar"]


class RunSettings(Protocol):
    """What a run is (a dataclass written to ``run.json``), e.g. :class:`bicm.evaluate.EvalRun`."""

    def same_work(self, other: Any) -> bool:
        """Whether a run begun with ``other`` settings may be resumed with these."""
        ...


def check_run_file(out_dir: Path, run: RunSettings, *, kind: str = "") -> None:
    """Refuse ``out_dir`` when its ``run.json`` is not a run of ``kind`` (``"pseudo-label"``;
    empty for ``bicm eval``) or holds other settings; else create the folder and write ``run``.

    A run that records its ``versions`` (bicm, torch, ...) and resumes one begun with other
    versions goes on with a warning.
    """
    path = out_dir / "run.json"
    label = f"{kind} " if kind else ""
    if path.is_file():
        try:
            previous = type(run)(**json_loads(path.read_text(), path))
        except (json.JSONDecodeError, TypeError):
            raise BicmError(f"{path} is not a bicm {label}run file; use another --out") from None
        if not previous.same_work(run):
            raise BicmError(f"{out_dir} holds a {label}run with other settings; use another --out (or delete it)")
        before, now = getattr(previous, "versions", None), getattr(run, "versions", None)
        if before and now and before != now:
            changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v)
            warn(f"resuming a run begun with other versions ({changed}); its predictions may mix them")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(run), indent=1) + "\n")  # type: ignore[call-overload]


@contextmanager
def kept_on_interrupt(out: JsonlAppender, total: int, what: str = "queries") -> Iterator[None]:
    """Ctrl-C: say how many of ``total`` ``what`` the records file keeps (see :mod:`bicm.interrupt`)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"{len(out.done)} of {total} {what} are kept in {out.path}") from None


def print_note(message: str) -> None:
    """One ``bicm: ...`` line on stderr (e.g. that a run resumes)."""
    print(f"bicm: {message}", file=sys.stderr)


class ProgressBar:
    """A rich progress bar (items done of ``total``, ETA, a short ``info`` text), or nothing
    when not ``enabled``."""

    def __init__(self, enabled: bool, title: str, total: int, done: int = 0) -> None:
        self.enabled, self.title, self.total, self.done = enabled, title, total, done
        self._bar: Any = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(self.title), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total, completed=self.done, info="")
        return self

    def advance(self, n: int = 1, info: Optional[str] = None) -> None:
        """``n`` more items done; ``info`` replaces the text after the bar when given."""
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({} if info is None else {"info": info}))

    def advance_to(self, n: int) -> None:
        """``n`` items done in all."""
        if self._bar is not None:
            self._bar.update(self._task, completed=n)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
