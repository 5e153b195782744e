"""Ctrl-C (SIGINT) for long, resumable commands: stop cleanly, keep the finished work, say how
to go on.

A long command (``bicm eval``, ``bicm train-clip``, ``bicm proposals extract``, ...) writes its
finished work as it goes (fsynced JSON Lines, atomic state files). On Ctrl-C it should not
print a traceback: it should say what was kept and that the SAME command resumes, and exit
with code 130 (the shell's code for SIGINT). Reuse in a new command with ONE line, under
``@user_errors``::

    from .interrupt import resumable

    @app.command("pseudo-label")
    @user_errors
    @resumable
    def pseudo_label(...):
        ...

Library code that saves something on the way out can say so by raising
:class:`Interrupted` (a :class:`KeyboardInterrupt`) with what it kept::

    except KeyboardInterrupt:
        save_state(...)
        raise Interrupted(f"training state at step {step} saved to {path}") from None

and can keep a second Ctrl-C from cutting a write in half with :func:`deferred`::

    with deferred():            # SIGINT waits until the block ends
        write_state_file(...)

SIGKILL cannot be caught: resumable commands must write finished work as they go (see
:class:`bicm.jsonl.JsonlAppender`), so a kill loses at most the item in flight.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

__all__ = [
    "INTERRUPTED", "Interrupted", "resumable", "deferred", "resume_command", "ignore_in_worker",
    "state_path", "load_state", "save_state", "TrainingState",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that was handled: ``str(exc)`` says what was kept (e.g. a saved state)."""


def resume_command(argv: Optional[list[str]] = None) -> Optional[str]:
    """The command line that was run, as the user can paste it (``bicm eval ...``), or None
    when bicm was not started from its command line (e.g. from Python)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program in ("bicm", "bicm.exe"):
        return shlex.join(["bicm", *argv[1:]])
    if program in ("cli.py", "__main__.py") and "bicm" in argv[0]:
        return shlex.join(["bicm", *argv[1:]])
    return None


def resumable(func: F) -> F:
    """Decorator for a command whose finished work survives an interruption.

    On Ctrl-C: one ``bicm: interrupted: ...`` line (what was kept, how to resume), exit code
    130, no traceback. Put it under ``@user_errors`` (which shows :class:`BicmError`).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as exc:
            kept = str(exc).strip() if isinstance(exc, Interrupted) else ""
            command = resume_command()
            how = f"run the same command again to resume: {command}" if command else "run the same command again to resume"
            what = f"{kept}; " if kept else "finished work is kept; "
            print(f"bicm: interrupted: {what}{how}", file=sys.stderr)
            raise SystemExit(INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back SIGINT while the block runs (e.g. writing a state file); a Ctrl-C that came
    meanwhile is raised as :class:`KeyboardInterrupt` when the block ends. Outside the main
    thread (where Python cannot set signal handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def ignore_in_worker() -> None:
    """``initializer=`` of a multiprocessing pool: workers ignore SIGINT, so a Ctrl-C in the
    terminal (sent to the whole process group) stops the parent alone, which ends the pool,
    instead of printing one traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def state_path(out: Union[str, Path]) -> Path:
    """Where a training command keeps its resumable state: ``<out stem>.state.pt`` beside ``out``."""
    out = Path(out)
    return out.parent / (out.stem + ".state.pt")


def load_state(path: Path, fmt: str, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The training state saved at ``path`` by :func:`save_state`, or None when there is none.

    Read with bicm's capped torch reader (:func:`bicm.safeload.read_torch_file`: tensors and
    plain containers only, within a memory budget; no code runs). Raises
    :class:`~bicm.errors.BicmError` when the file is unreadable, of another format, or saved
    with other ``settings`` (naming the ones that differ).
    """
    from .errors import BicmError

    from .safeload import read_torch_file, regular_file

    if not path.exists():
        return None
    regular_file(path, "training state")
    try:
        state = read_torch_file(path, "training state", needs="training states")  # torch's allow-list can build gigabytes
    except BicmError as exc:
        detail = str(exc).replace(f"cannot read {path}: ", "")
        if str(exc).startswith("refusing"):
            raise BicmError(f"{exc}; delete it to start over") from None
        raise BicmError(f"cannot read the training state {path} ({detail}); delete it to start over") from None
    except Exception as exc:
        raise BicmError(f"cannot read the training state {path} ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != fmt or not isinstance(state.get("settings"), dict):
        raise BicmError(f"{path} is not a state of this command; delete it to start over")
    if state["settings"] != settings:
        changed = sorted(k for k in set(settings) | set(state["settings"]) if state["settings"].get(k) != settings.get(k))
        raise BicmError(
            f"{path} holds a run with other settings ({', '.join(changed)}); "
            "run with those settings to resume it, or delete it to start over"
        )
    return state


def save_state(path: Path, fmt: str, settings: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a training state atomically (a second Ctrl-C cannot cut it in half)."""
    import torch

    from .atomic import atomic_path

    with deferred(), atomic_path(path) as tmp:
        torch.save({"format": fmt, "settings": settings, **state}, str(tmp))


class TrainingState:
    """The resumable state of a bicm training loop (``train-clip``, ``train-detector``).

    It holds what a resumed run needs to continue to the same weights as one uninterrupted run:
    the model's and optimizer's state, the data order's numpy random state, torch's random
    state, the history of finished steps and the seconds spent in earlier runs. ``resumed`` is
    what :func:`load_state` returned (None: a fresh run); :meth:`restore` puts it back into the
    model, optimizer and random generators, :meth:`save` writes the state after a step
    atomically, and :meth:`stopped` turns Ctrl-C into the :class:`Interrupted` that says what
    was kept.
    """

    def __init__(
        self, path: Path, fmt: str, settings: dict[str, Any], resumed: Optional[dict[str, Any]], started: float
    ) -> None:
        self.path, self.fmt, self.settings, self.resumed, self.started = path, fmt, settings, resumed, started
        self.history: list[dict[str, Any]] = []
        self.first = 0
        self.earlier_seconds = 0.0

    def restore(self, model: Any, optim: Any, rng: Any) -> int:
        """Load the resumed state (if any) into ``model``, ``optim``, the numpy generator ``rng``
        and torch's random state; returns the first step to run (0 for a fresh run)."""
        import torch

        if self.resumed is not None:
            model.load_state_dict(self.resumed["model"])
            optim.load_state_dict(self.resumed["optimizer"])
            rng.bit_generator.state = self.resumed["data_rng"]
            torch.set_rng_state(self.resumed["torch_rng"])
            self.history[:] = list(self.resumed["history"])
            self.first, self.earlier_seconds = int(self.resumed["step"]), float(self.resumed["seconds"])
        return self.first

    def seconds(self) -> float:
        """Seconds spent so far, earlier runs included."""
        import time

        return self.earlier_seconds + time.perf_counter() - self.started

    def save(self, step: int, model: Any, optim: Any, data_rng: dict, torch_rng: Any = None) -> None:
        """Write the state after ``step`` finished steps; ``data_rng`` and ``torch_rng`` (default:
        torch's state now) are the random states the next step starts from."""
        import torch

        from .provenance import versions

        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optim.state_dict(),
            "data_rng": data_rng,
            "torch_rng": torch.get_rng_state() if torch_rng is None else torch_rng,
            "history": self.history,
            "seconds": self.seconds(),
            "versions": versions(),
        }
        save_state(self.path, self.fmt, self.settings, state)

    def stopped(self, completed: int, total: int) -> Interrupted:
        """The :class:`Interrupted` for a Ctrl-C after ``completed`` of ``total`` steps (the state
        must already be saved when any step of this run finished)."""
        if completed == self.first:
            if self.resumed is None:
                return Interrupted("no training step had finished; nothing to keep")
            return Interrupted(f"training state at step {completed} is still in {self.path}")
        return Interrupted(f"training state at step {completed} of {total} saved to {self.path}")

    def kept(self) -> str:
        """What is kept when a run stops before its loop starts."""
        return f"training state at step {self.resumed['step']} in {self.path}" if self.resumed else "no training step had finished yet"
