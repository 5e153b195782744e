"""The grounding service behind ``bicm serve``, without HTTP: decode, ground, draw, serialise.

:class:`DemoService` is what the web page asks for, callable from Python or a notebook
without the web packages (starlette, uvicorn, python-multipart); :mod:`bicm.serve` wraps it in
the web app. What a public demo needs, and how the service does it:

* the per-image work is shared: the phrases of one request go through one
  :meth:`~bicm.api.Grounder.ground_many`, and a :class:`~bicm.cache.MemoryFeatureCache` keeps the
  proposals and crop embeddings of the last few images (by :func:`bicm.imageio.image_digest`),
  so a follow-up request on the same image only pays for its new phrases;
* limits (:class:`ServeLimits`): upload bytes, image pixels (checked from the header, before
  decoding), number and length of the phrases, a request timeout;
* one CPU lock: requests are computed one at a time (torch already uses every core);
* the client never names a file on the server: examples are picked by name from a fixed
  table (:func:`bundled_examples`), and a detections file is not accepted;
* every refusal is a :class:`DemoError` carrying the HTTP status to answer it with.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .errors import BicmError, BicmWarning
from .jsonl import finite

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .api import Grounder, GroundingResult
    from .proposals.sources import ProposalSource

__all__ = [
    "ServeLimits",
    "Example",
    "DemoService",
    "DemoError",
    "bundled_examples",
]

MB = 1024 * 1024

#: How many of the best candidates the page's score table shows.
TOP_CANDIDATES = 8


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server.

    Attributes
    ----------
    max_upload_bytes: largest accepted image file.
    max_pixels: largest accepted image (width x height), checked before decoding.
    timeout_s: a request that has not been answered after this long (waiting for the CPU
        included) gets HTTP 503/504.
    max_queries: phrases per request.
    max_query_chars: characters per phrase.
    cache_images: images whose proposals and crop embeddings are kept in memory.
    """

    max_upload_bytes: int = 20 * MB
    max_pixels: int = 25_000_000
    timeout_s: float = 120.0
    max_queries: int = 16
    max_query_chars: int = 300
    cache_images: int = 8

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise BicmError("the upload and pixel limits must be positive")
        if not self.timeout_s > 0:
            raise BicmError("the request timeout must be positive")
        if self.max_queries < 1 or self.max_query_chars < 1 or self.cache_images < 1:
            raise BicmError("the phrase limits and the cache size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "timeout_s": self.timeout_s,
            "max_queries": self.max_queries,
            "max_query_chars": self.max_query_chars,
        }


class DemoError(BicmError):
    """A request the demo refuses, with the HTTP status to answer it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Example:
    """A bundled image the page can pick by ``name`` (never by path)."""

    name: str
    path: Path
    queries: tuple[str, ...]
    description: str = ""


def bundled_examples() -> dict[str, Example]:
    """The examples that ship with bicm, by name."""
    from .shapes.examples import example_image, example_queries

    shapes = Example(
        "shapes",
        example_image(),
        tuple(example_queries()),
        "a scene of the shapes world (what the shipped shapes CLIP was trained on)",
    )
    return {shapes.name: shapes}


# ----------------------------------------------------------------------------------------
@dataclass
class _Timing:
    start: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.marks[name] = round(now - since, 4)
        return now


class DemoService:
    """What the page asks for, without HTTP: decode, ground, draw, serialise.

    Parameters
    ----------
    grounder: a :class:`~bicm.api.Grounder` (its namer, if any, names the proposals; its KAM
        model, if any, makes ``"kam"`` a component the page offers). The service gives it a
        :class:`~bicm.cache.MemoryFeatureCache`.
    model_name: shown on the page.
    limits: :class:`ServeLimits`.
    top_n, ss_mode: selective-search options (as ``bicm ground``).
    examples: bundled images by name (default :func:`bundled_examples`).
    detector: a proposal source offered first on the page as ``"shapes-detector"`` (the
        shapes world's detector, with the shipped shapes CLIP), or ``None``.
    """

    def __init__(
        self,
        grounder: "Grounder",
        *,
        model_name: str = "",
        limits: Optional[ServeLimits] = None,
        top_n: int = 100,
        ss_mode: str = "fast",
        examples: Optional[Mapping[str, Example]] = None,
        detector: Optional["ProposalSource"] = None,
    ) -> None:
        from .api import Grounder
        from .cache import MemoryFeatureCache
        from .proposals.selective import SelectiveSearch

        self.limits = limits or ServeLimits()
        self.cache = MemoryFeatureCache(images=self.limits.cache_images)
        self.grounder = Grounder(
            grounder.backbone,
            grounder.config,
            name_with=grounder.namer,
            cache=self.cache,
            kam=grounder.kam,
            class_names=grounder.class_names,
        )
        self.model_name = model_name or grounder.backbone.name
        self.sources: dict[str, Optional["ProposalSource"]] = {
            **({"shapes-detector": detector} if detector is not None else {}),
            "selective-search": SelectiveSearch(mode=ss_mode, top_n=top_n),
            "none": None,
        }
        self.examples = dict(bundled_examples() if examples is None else examples)
        self.cpu_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bicm-serve")
        self.grounder.backbone.fingerprint()  # hashes the weights once, now rather than in the first request

    # -- what the page needs to draw its form ---------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        """The components the page offers: QAM, COM, SF, and KAM when the Grounder has a model."""
        from .api import COMPONENTS

        return COMPONENTS + (("kam",) if self.grounder.kam is not None else ())

    def info(self) -> dict[str, Any]:
        """Model, choices and limits, for the page's form."""
        namer = self.grounder.namer
        return {
            "model": self.model_name,
            "components": list(self.components),
            "default_components": list(self.grounder.config.components),
            "proposal_sources": list(self.sources),
            "naming": None if namer is None else namer.vocabulary.name,
            "examples": [
                {"name": e.name, "queries": list(e.queries), "description": e.description, "url": f"/api/examples/{e.name}.png"}
                for e in self.examples.values()
            ],
            "limits": self.limits.to_dict(),
        }

    def example(self, name: str) -> Example:
        """The bundled example ``name``; only names of the fixed table are accepted."""
        found = self.examples.get(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted(self.examples)) or "none"
            raise DemoError(f"unknown example {str(name)[:40]!r}; the examples are: {known}", 404)
        return found

    # -- inputs ---------------------------------------------------------------------------
    def decode_upload(self, data: bytes, filename: str = "") -> "Image.Image":
        """The uploaded bytes as an RGB image, within the byte and pixel limits."""
        from .imageio import load_image

        shown = _display_name(filename)
        if len(data) > self.limits.max_upload_bytes:
            raise DemoError(
                f"{shown} is {len(data) / MB:.1f} MB; this server accepts images up to {self.limits.max_upload_bytes / MB:g} MB",
                413,
            )
        if not data:
            raise DemoError(f"{shown} is empty")
        with tempfile.TemporaryDirectory(prefix="bicm-serve-") as folder:
            path = Path(folder) / ("upload" + _safe_suffix(filename))
            path.write_bytes(data)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", BicmWarning)
                    return load_image(path, max_pixels=self.limits.max_pixels)
            except BicmError as exc:
                message = str(exc).replace(f"image {path}", shown).replace(str(path), shown)
                message = message.split("; raise it with")[0]
                raise DemoError(message, 413 if "more than the limit" in message else 400) from None

    def parse_queries(self, text: str) -> list[str]:
        """One phrase per non-blank line, within the limits."""
        queries = [" ".join(line.split()) for line in (text or "").splitlines()]
        queries = [q for q in queries if q]
        if not queries:
            raise DemoError("type at least one phrase (one per line)")
        if len(queries) > self.limits.max_queries:
            raise DemoError(f"{len(queries)} phrases; this server takes at most {self.limits.max_queries} per request")
        long = [q for q in queries if len(q) > self.limits.max_query_chars]
        if long:
            raise DemoError(f"a phrase is longer than {self.limits.max_query_chars} characters: {long[0][:40]!r}...")
        return queries

    def parse_components(self, value: str | Sequence[str]) -> tuple[str, ...]:
        """Components from ``"qam,com,sf"`` (or a list); validated by :class:`~bicm.api.BiCMConfig`."""
        items = value.split(",") if isinstance(value, str) else list(value)
        comps = tuple(dict.fromkeys(c.strip().lower() for c in items if c and c.strip()))
        if not comps:
            raise DemoError("choose at least one component")
        if "kam" in comps and "kam" not in self.components:
            raise DemoError("KAM needs a trained KAM model: this server was started without --kam")
        unknown = [c for c in comps if c not in self.components]
        if unknown:
            raise DemoError(f"unknown component {unknown[0][:20]!r}; choose from {', '.join(self.components)}")
        return comps

    # -- the work -------------------------------------------------------------------------
    def ground(
        self,
        image: "Image.Image",
        queries: Sequence[str],
        *,
        proposals: str = "selective-search",
        components: Sequence[str] = ("qam", "com", "sf"),
        image_name: str = "",
        deadline: Optional[float] = None,
    ) -> dict[str, Any]:
        """Ground ``queries`` in ``image`` and build the page's answer (JSON-ready).

        Waits for the CPU lock until ``deadline`` (``time.monotonic()``; default: the
        limits' timeout from now) and answers 503 when it passes first.

        Returns
        -------
        ``{"image": {...}, "results": [{"result": to_dict(), "top": [...], "picture":
        "data:image/png;base64,..."}], "timing": {...}, "cache": {...}, "warnings": [...]}``
        """
        from .imageio import image_digest
        from .viz import render_visualization

        if proposals not in self.sources:
            raise DemoError(f"unknown proposal source {str(proposals)[:40]!r}; choose from {', '.join(self.sources)}")
        timing = _Timing()
        grounder = self.grounder.with_config(components=tuple(components))
        deadline = time.monotonic() + self.limits.timeout_s if deadline is None else deadline
        wait = deadline - time.monotonic()
        if wait <= 0 or not self.cpu_lock.acquire(timeout=wait):
            raise DemoError("the server is busy with other requests; try again in a moment", 503)
        try:
            now = timing.mark("wait_s", timing.start)
            digest = image_digest(image)
            seen = self.cache.has_image(digest)
            hits_before = self.cache.stats.hits
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BicmWarning)
                results = grounder.ground_many(image, list(queries), self.sources[proposals])
            now = timing.mark("ground_s", now)
            pictures = [render_visualization(image, [r]) for r in results]
            timing.mark("render_s", now)
        finally:
            self.cpu_lock.release()
        timing.marks["total_s"] = round(time.perf_counter() - timing.start, 4)
        messages = sorted({str(w.message) for w in caught if issubclass(w.category, BicmWarning)})
        return finite(
            {
                "image": {"name": image_name, "width": image.width, "height": image.height, "digest": digest},
                "model": self.model_name,
                "proposals": proposals,
                "components": list(grounder.config.components),
                "results": [
                    {"result": r.to_dict(), "top": _top(r), "picture": "data:image/png;base64," + base64.b64encode(p).decode()}
                    for r, p in zip(results, pictures)
                ],
                "timing": timing.marks,
                "cache": {"image_seen_before": seen, "hits": self.cache.stats.hits - hits_before},
                "warnings": messages,
            }
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _top(result: "GroundingResult", k: int = TOP_CANDIDATES) -> list[int]:
    """Indices of the ``k`` best candidates by fused score, the chosen ones first."""
    fused = result.candidates.fused
    if fused.numel() == 0:
        return []
    order = [int(i) for i in fused.argsort(descending=True).tolist()]
    chosen = [i for i in order if i in result.selected]
    return (chosen + [i for i in order if i not in result.selected])[:k]


def _display_name(filename: str) -> str:
    """The client's file name, for messages: base name only, printable, short."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:60]
    return f"the file {base!r}" if base else "the uploaded file"


def _safe_suffix(filename: str) -> str:
    """The extension of the client's file name if harmless (``.png``), else nothing."""
    suffix = Path((filename or "").replace("\\", "/").rsplit("/", 1)[-1]).suffix.lower()
    return suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ""
