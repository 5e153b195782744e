"""The Ray engine: ``bicm eval``, ``bicm ground --input``, ``bicm pseudo-label`` and ``bicm proposals extract`` on a Ray
cluster (``--engine ray``), with the same results as on one machine.

The work is a Ray Dataset of items (an image with all its queries; a block of images to
match; a pseudo-label pair; an image to propose boxes for). ``map_batches`` sends the items,
one per batch, to a pool of actors (:class:`_Worker`); each actor builds its model ONCE, the
way the command line builds it (:class:`GrounderSpec`: ``model.grounder(config, source=...,
cache=..., kam=...)``), and runs on each item the SAME per-item function as the local engine
(:func:`bicm.evaluate._evaluate_image`, :func:`bicm.pseudo.embed_and_match`,
:func:`bicm.pseudo.ground_pair`, :func:`bicm.cli.propose_image`). The results stream back to
this process in order (``preserve_order``), which writes the run folder exactly as the local
engine does: predictions, labels and detections files are byte-identical, and resuming skips
what is already written.

Faults: an actor that dies is restarted and its item retried (``max_restarts`` and
``max_task_retries`` are unlimited); items are pure functions of their inputs, so a retried
item gives the same records. Ctrl-C on the driver ends the Ray job (its actors and tasks) and
keeps the records already written. A missing ``ray``, a wrong address or a cluster without
the resources asked for end in one :class:`~bicm.errors.BicmError`.

The feature cache on a cluster (:func:`worker_cache`): every node keeps its own SQLite file
(``<cache>.<hostname>.sqlite``, shared by the actors of that node only); the driver opens no
cache. Several machines never write one SQLite file.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from .errors import BicmError
from .options import EngineOptions, ModelOptions, RunOptions, SourceOptions

if TYPE_CHECKING:  # pragma: no cover
    from .api import Grounder
    from .config import BiCMConfig, Needs
    from .data import GroundingSample

__all__ = ["GrounderSpec", "RayEngine", "engine", "require_ray", "worker_cache"]

#: How long a ``--ray-address`` may take to answer before it counts as unreachable.
CONNECT_TIMEOUT_S = 5.0


def require_ray() -> Any:
    """The ``ray`` module, or one clear error when the ``bicm[ray]`` extra is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BicmError("--engine ray needs Ray: pip install 'bicm[ray]' (or use --engine local)") from None
    return ray


@dataclass(frozen=True)
class GrounderSpec:
    """How to build the Grounder: the command's option groups, passed to every actor as they
    are (plain frozen dataclasses), so each builds its model exactly as the command line does."""

    model: ModelOptions
    config: Optional["BiCMConfig"] = None
    source: Optional[SourceOptions] = None
    kam: Optional[Path] = None
    run: RunOptions = RunOptions()

    def build(self, cache: Any = None) -> "Grounder":
        """The Grounder (``model.grounder(config, source=..., cache=..., kam=...)``)."""
        self.model.prepare()
        return self.model.grounder(self.config, source=self.source, cache=cache, kam=self.kam)


def worker_cache(run: RunOptions) -> Any:
    """A worker's feature cache: none with ``--no-cache``, else this node's own SQLite file,
    ``<cache stem>.<hostname>.sqlite`` (the actors of one node share it; SQLite's WAL is safe
    between processes of ONE machine, never over a network filesystem between machines)."""
    if run.no_cache:
        return None
    from .cache import FeatureCache

    path = run.cache_path
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "node"
    return FeatureCache(path.with_name(f"{path.stem}.{host}{path.suffix or '.sqlite'}"))


# ----------------------------------------------------------------------------------------
# Jobs: what an actor builds once (setup) and runs on each item
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GrounderJob:
    spec: GrounderSpec

    def setup(self) -> Any:
        return self.spec.build(worker_cache(self.spec.run))


@dataclass(frozen=True)
class _EvalJob(_GrounderJob):
    """Item: ``(image_file, samples)``; result: the image's prediction records."""

    image_root: Path = Path(".")
    rows: tuple = ()
    needs: Any = None
    oracle: bool = False
    any_box: bool = False

    def __call__(self, grounder: "Grounder", item: Any) -> Any:
        from .evaluate import _evaluate_image

        image_file, group = item
        source = "oracle" if self.oracle else grounder.proposals
        return _evaluate_image(grounder, self.image_root, image_file, group, self.rows, self.needs, source, any_box=self.any_box)


@dataclass(frozen=True)
class _BatchJob(_GrounderJob):
    """Item: a :class:`bicm.batch.BatchItem`; result: its records (:func:`bicm.batch.ground_item`)."""

    max_pixels: Optional[int] = None

    def __call__(self, grounder: "Grounder", item: Any) -> Any:
        from .batch import ground_item

        return ground_item(grounder, item, max_pixels=self.max_pixels)


@dataclass(frozen=True)
class _MatchJob(_GrounderJob):
    """Item: a block of ``(key, path)`` images; result: :func:`bicm.pseudo.embed_and_match`'s.
    The query embeddings are computed once by the driver and shared (``ray.put``)."""

    queries: Any = None  # an ObjectRef of the (Q, E) float32 array

    def setup(self) -> Any:
        import numpy as np
        import ray
        import torch

        return self.spec.build(worker_cache(self.spec.run)), torch.from_numpy(np.array(ray.get(self.queries)))

    def __call__(self, state: Any, item: Any) -> Any:
        from .pseudo import embed_and_match

        grounder, text = state
        return embed_and_match(grounder, item, text)


@dataclass(frozen=True)
class _GroundJob(_GrounderJob):
    """Item: a match; result: :func:`bicm.pseudo.ground_pair`'s ``(record, stored features)``."""

    cfg: Any = None
    features_above: float = 0.0

    def __call__(self, grounder: "Grounder", item: Any) -> Any:
        from .pseudo import ground_pair

        return ground_pair(grounder, self.cfg, item, grounder.proposals, self.features_above)


@dataclass(frozen=True)
class _ProposeJob:
    """Item: ``(key, path)``; result: ``(key, proposals or the error's text)``."""

    model: ModelOptions
    source: SourceOptions

    def setup(self) -> Any:
        from .cli import proposal_makers

        return proposal_makers(self.model, self.source)

    def __call__(self, state: Any, item: Any) -> Any:
        from .cli import propose_image

        key, path = item
        return key, propose_image(*state, key, path)


class _Worker:
    """The actor of ``map_batches``: sets its job up once, then runs it on each item.

    The job is a class attribute of a subclass made per run (:func:`_worker_for`), not a
    constructor argument: Ray keeps constructor arguments in the object store, where a
    restarted actor could lose them."""

    job: Any = None
    #: The command's working folder: relative paths (images, weights, cache) mean the same
    #: files as for the command where the folder exists on the worker's machine.
    cwd: Optional[str] = None

    def __init__(self) -> None:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the driver's to handle
        if self.cwd and os.path.isdir(self.cwd):
            os.chdir(self.cwd)
        self.state = self.job.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = np.empty(len(batch["item"]), dtype=object)  # one cell per result, whatever its shape
        for i, item in enumerate(batch["item"]):
            out[i] = _Cell(self.job(self.state, item.value))
        return {"result": out}


class _Cell:
    """One item or result as ONE object cell of a Ray Dataset (numpy never unpacks it into
    an array of its own). Ray moves it between the driver and its workers with its own
    serialiser; bicm itself unpickles nothing (a Ray cluster is a trusted network: README)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _worker_for(job: Any) -> type:
    """An actor class that runs ``job`` (shipped with the class, pickled by value)."""
    return type("BicmWorker", (_Worker,), {"job": job, "cwd": os.getcwd()})


# ----------------------------------------------------------------------------------------
# The driver side
# ----------------------------------------------------------------------------------------
class RayEngine:
    """A connected Ray runtime and the command's :class:`GrounderSpec`: runs the per-item
    work on the cluster and yields the results in the items' order."""

    def __init__(self, options: EngineOptions, spec: Optional[GrounderSpec], ray: Any) -> None:
        self.options, self.spec, self.ray = options, spec, ray

    def map(self, job: Any, items: Sequence[Any]) -> Iterator[Any]:
        """``job(state, item)`` of every item, on the actors, in order."""
        if not items:
            return iter(())
        ray = self.ray
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the records arrive (and are written) in the local order
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.from_items([{"item": _Cell(item)} for item in items], override_num_blocks=min(len(items), 200))
        workers = min(self.options.workers, len(items))
        with warnings.catch_warnings():  # Ray 2.60 names these "ray_remote_args" and would rather infer them
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            mapped = self._map_batches(dataset, job, workers)
        return (cell.value for batch in mapped.iter_batches(batch_size=None, batch_format="numpy") for cell in batch["result"])

    def _map_batches(self, dataset: Any, job: Any, workers: int) -> Any:
        ray = self.ray
        return dataset.map_batches(
            _worker_for(job),
            batch_size=1,  # one image (with all its queries) per call: its per-image work stays shared
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=self.options.cpus_per_worker,
            num_gpus=self.options.gpus_per_worker or None,
            max_restarts=-1,  # a dead actor is replaced ...
            max_task_retries=-1,  # ... and its batch run again
        )

    # the commands' work --------------------------------------------------------------------
    def eval_images(
        self, todo: Sequence[tuple[str, Sequence["GroundingSample"]]], image_root: Path, rows: Sequence[tuple[str, "BiCMConfig"]],
        needs: "Needs", oracle: bool, any_box: bool = False,
    ) -> Iterator[list[dict[str, Any]]]:
        """The prediction records of each ``(image, samples)`` of ``todo``."""
        assert self.spec is not None
        job = _EvalJob(self.spec, image_root=Path(image_root), rows=tuple(rows), needs=needs, oracle=oracle, any_box=any_box)
        return self.map(job, [(image, list(group)) for image, group in todo])

    def ground_items(self, items: Sequence[Any], max_pixels: Optional[int] = None) -> Iterator[list[dict[str, Any]]]:
        """The result records of each :class:`bicm.batch.BatchItem` (``bicm ground --input``)."""
        assert self.spec is not None
        return self.map(_BatchJob(self.spec, max_pixels=max_pixels), list(items))

    def match(self, blocks: Sequence[Sequence[tuple[str, Path]]], text: Any) -> Iterator[Any]:
        """:func:`bicm.pseudo.embed_and_match` of each image block against the ``(Q, E)`` query
        embeddings ``text`` (put once into the object store, read once per actor)."""
        assert self.spec is not None
        return self.map(_MatchJob(self.spec, queries=self.ray.put(text.numpy())), [list(b) for b in blocks])

    def ground_pairs(self, matches: Sequence[dict[str, Any]], cfg: "BiCMConfig", features_above: float) -> Iterator[Any]:
        """:func:`bicm.pseudo.ground_pair` of each match."""
        assert self.spec is not None
        return self.map(_GroundJob(self.spec, cfg=cfg, features_above=features_above), list(matches))

    def propose(self, model: ModelOptions, source: SourceOptions, images: Sequence[tuple[str, Path]]) -> Iterator[Any]:
        """``(key, proposals or error text)`` of each image."""
        return self.map(_ProposeJob(model, source), list(images))


def _check_reachable(address: str) -> None:
    """One line, quickly, when nothing answers at ``host:port`` (Ray itself would retry for minutes)."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BicmError(f"--ray-address {address!r} is not host:port (e.g. 10.0.0.1:6379 from 'ray start --head', or ray://host:10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BicmError(f"cannot reach the Ray cluster at {address} ({reason}); is 'ray start --head' running there?") from None


def _connect(options: EngineOptions) -> Any:
    ray = require_ray()
    if options.workers < 1:
        raise BicmError(f"--workers must be at least 1, not {options.workers}")
    if options.cpus_per_worker < 0 or options.gpus_per_worker < 0:
        raise BicmError("--cpus-per-worker and --gpus-per-worker must be 0 or more")
    settings: dict[str, Any] = dict(log_to_driver=False, logging_level="error", configure_logging=True, include_dashboard=False)
    if options.ray_address:
        _check_reachable(options.ray_address)
        settings.pop("include_dashboard")
        settings["address"] = options.ray_address
    else:  # a local runtime with room for the actors (more CPUs than cores is allowed)
        settings["num_cpus"] = max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker))
    try:
        ray.init(**settings)
    except Exception as exc:  # ConnectionError, ValueError (a bad address), RuntimeError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BicmError(f"cannot start or join Ray{'' if not options.ray_address else f' at {options.ray_address}'}: {first}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset INFO lines between bicm's own
    total = ray.cluster_resources()
    for kind, per in (("CPU", options.cpus_per_worker), ("GPU", options.gpus_per_worker)):
        have, need = total.get(kind, 0.0), options.workers * per
        if need > have:  # a fixed pool of actors would wait for them for ever
            ray.shutdown()
            raise BicmError(
                f"--workers {options.workers} x --{kind.lower()}s-per-worker {per:g} needs {need:g} {kind}s but the Ray cluster has "
                f"{have:g}; use fewer workers or add machines"
            )
    return ray


@contextmanager
def engine(options: EngineOptions, spec: Optional[GrounderSpec] = None) -> Iterator[Optional[RayEngine]]:
    """``None`` for ``--engine local``; for ``ray``, a :class:`RayEngine` on a started or
    joined runtime, shut down (its job's actors and tasks ended) when the block ends, Ctrl-C
    included (a runtime this process had already joined stays as it was)."""
    if not options.on_cluster:
        yield None
        return
    ray = require_ray()
    if ray.is_initialized():  # a program that connected to Ray itself keeps its connection
        yield RayEngine(options, spec, ray)
        return
    ray = _connect(options)
    try:
        yield RayEngine(options, spec, ray)
    finally:
        ray.shutdown()

