"""Work ahead of the model: the next images decoded, their proposals found and their crops cut
on one background thread while the current image is encoded.

:func:`ahead` maps a function over items on one worker thread, at most ``depth`` items ahead,
and yields the results in the items' order, so a loop over it does the same work in the same
order as a loop without it (records, values and files are byte-identical). Memory: at most
``depth`` finished results wait, plus the one being computed; with :meth:`Grounder.prepare
<bicm.api.Grounder.prepare>` a result is the working image (at most ``max_pixels``, 16 MP: 48
MB as RGB) and its crops as uint8 (N x 3 x 224 x 224 bytes: 15 MB for 100 proposals), so with
the default depth of 2 about 3 x (image + 15 MB) for ViT-B/32 inputs and 100 proposals.

An exception raised by the function is handed back with its item and re-raised by
:meth:`Ahead.get` in the caller's thread, where the caller would have met it without
prefetching. When the consumer stops (a ``break``, an exception, Ctrl-C in the main thread),
the worker finishes the item it is on and exits; nothing it computed afterwards is used.
"""

from __future__ import annotations

import atexit
import queue
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar, Union

__all__ = ["Ahead", "DEFAULT_DEPTH", "ahead", "default_depth"]

T = TypeVar("T")
R = TypeVar("R")

#: Items prepared ahead where it pays: one to overlap, one to absorb an image that is slower to
#: prepare than the previous one is to encode.
DEFAULT_DEPTH = 2


def default_depth(device: Any) -> int:
    """How many items to prepare ahead for a model on ``device``: :data:`DEFAULT_DEPTH` on a
    GPU (the host is idle while the GPU encodes), 0 on a CPU, where the preparing thread takes
    cores from the encoder: on a quiet 2-core Xeon (AMX, bf16) the eval loop ran 0.645 images/s
    with nothing ahead and 0.531 with 2 ahead (``benchmarks/README.md``, bench_prefetch.py)."""
    return DEFAULT_DEPTH if getattr(device, "type", str(device)).startswith("cuda") else 0


class Ahead(Generic[R]):
    """The prepared result of one item, or the exception preparing it raised."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Optional[R] = None, error: Optional[BaseException] = None) -> None:
        self._value = value
        self._error = error

    def get(self) -> R:
        """The result; re-raises the preparation's exception."""
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


_DONE = object()


def ahead(items: Iterable[T], work: Callable[[T], R], depth: int = DEFAULT_DEPTH) -> Iterator[tuple[T, Union[Ahead[R], None]]]:
    """``(item, Ahead(work(item)))`` for every item, in order, ``work`` running on one
    background thread up to ``depth`` items ahead of the consumer.

    ``depth=0`` prepares nothing ahead: it yields ``(item, None)`` (the caller does the work
    inline, as before prefetching existed).
    """
    if depth < 0:
        raise ValueError("prefetch depth must be at least 0")
    if depth == 0:
        for item in items:
            yield item, None
        return
    results: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    done: Ahead[R] = Ahead(work(item))
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer with its item
                    done = Ahead(error=exc)
                while not stop.is_set():
                    try:
                        results.put((item, done), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        finally:
            while not stop.is_set():
                try:
                    results.put(_DONE, timeout=0.1)
                    return
                except queue.Full:
                    continue

    worker = threading.Thread(target=produce, name="bicm-prefetch", daemon=True)

    def finish() -> None:
        # Also at exit: an error re-raised by Ahead.get() keeps this generator suspended (its
        # frame is in the traceback) until the interpreter ends, and a daemon thread still
        # inside torch then is killed mid-call ("terminate called without an active
        # exception", exit -6). atexit handlers run before daemon threads are stopped.
        stop.set()
        if worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=60.0)

    atexit.register(finish)
    worker.start()
    try:
        while True:
            got = results.get()
            if got is _DONE:
                return
            yield got  # type: ignore[misc]
    finally:
        stop.set()
        atexit.unregister(finish)
        # the worker sees stop within 0.1 s of its current item; it is a daemon, so a slow item
        # (a detector on a large image) never holds up the consumer for long
        worker.join(timeout=5.0)
        if worker.is_alive():  # still on its item: the process's exit waits for it, not a kill mid-call
            atexit.register(finish)
