"""Proposal sources: a registry of named sources, each with its own options.

A source turns one image into :class:`~bicm.proposals.Proposals`::

    from bicm.proposals.sources import make_source
    source = make_source("selective-search", mode="fast", top_n=100)
    proposals = source(pil_image, key="photo.jpg")

Names: ``selective-search`` (no weights), ``faster-rcnn`` (torchvision, COCO classes), and
any existing detections file (bicm JSON/JSONL, ReCLIP JSON, bottom-up-attention TSV). A
spec ``oracle:FILE`` reads ground-truth boxes from a file and labels them as the oracle in
every output, so that nobody mistakes them for a real result.

Every source caches its last few images (keyed by the pixels), so grounding several
phrases, or the same image again, does not recompute them.
"""

from __future__ import annotations

import abc
import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from ..errors import BicmError
from ..imageio import image_digest
from . import Proposals

__all__ = [
    "ProposalSource",
    "FileSource",
    "OracleSource",
    "register_source",
    "available_sources",
    "make_source",
    "ORACLE_ID",
]

ORACLE_ID = "oracle:ground-truth"

_REGISTRY: dict[str, Callable[..., "ProposalSource"]] = {}


class ProposalSource(abc.ABC):
    """Makes the proposals of one image. Subclasses implement :meth:`propose`."""

    #: how many images the in-memory cache keeps
    cache_size: int = 16

    def __init__(self) -> None:
        self._cache: "OrderedDict[str, Proposals]" = OrderedDict()

    @property
    @abc.abstractmethod
    def id(self) -> str:
        """Names the source and its options (goes into every output and cache key)."""

    @abc.abstractmethod
    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        """Proposals of ``image`` (RGB). ``key`` is the image's path or id, when known."""

    def __call__(self, image: Image.Image, key: Optional[str] = None, digest: Optional[str] = None) -> Proposals:
        """Proposals of ``image``, cached; ``digest`` is :func:`bicm.imageio.image_digest` of
        the image when the caller has it already."""
        digest = f"{key}|{digest or image_digest(image)}"
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        proposals = self.propose(image, key)
        proposals.meta.setdefault("image_size", [image.width, image.height])
        self._cache[digest] = proposals
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return proposals


def register_source(name: str) -> Callable[[Callable[..., ProposalSource]], Callable[..., ProposalSource]]:
    """Class decorator: make a source constructible by ``name``."""

    def decorate(factory: Callable[..., ProposalSource]) -> Callable[..., ProposalSource]:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_sources() -> list[str]:
    """Registered source names (files are accepted too)."""
    _import_builtin_sources()
    return sorted(_REGISTRY)


def make_source(spec: str, **options: Any) -> ProposalSource:
    """Build a source from a name, a detections file, or ``oracle:FILE``.

    ``options`` that the chosen source does not take are ignored, so one set of CLI flags
    can serve every source.
    """
    _import_builtin_sources()
    if spec.startswith("oracle:"):
        return OracleSource.from_file(Path(spec[len("oracle:") :]), **_accepted(OracleSource.from_file, options))
    factory = _REGISTRY.get(spec)
    if factory is not None:
        return factory(**_accepted(factory, options))
    path = Path(spec)
    if path.exists():
        return FileSource(path, **_accepted(FileSource, options))
    if path.suffix.lower() in (".json", ".jsonl", ".tsv") or "/" in spec:
        raise BicmError(f"detections file not found: {spec}")
    raise BicmError(
        f"unknown proposal source {spec!r}: not one of {', '.join(available_sources())} and not an existing file"
    )


def _accepted(factory: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params and v is not None}


def _import_builtin_sources() -> None:
    from . import detector, selective  # noqa: F401  (they register themselves)
    from ..shapes import detector as shapes_detector  # noqa: F401  (registers shapes-detector)


class FileSource(ProposalSource):
    """Proposals read from a detections file (see :mod:`bicm.proposals.files`)."""

    def __init__(
        self,
        path: Path,
        box_format: Optional[str] = None,
        file_format: str = "auto",
        vocabulary: str = "vg1600",
        class_offset: int = 0,
    ) -> None:
        from .files import read_proposals_file

        super().__init__()
        self.path = Path(path)
        self.detections = read_proposals_file(self.path, file_format, box_format, vocabulary, class_offset)

    @property
    def id(self) -> str:
        return f"file:{self.path.name}"

    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        if key is None:
            raise BicmError(f"{self.path.name} holds detections by image name: the image's path is needed")
        return self.detections.lookup(key)


class OracleSource(ProposalSource):
    """Ground-truth boxes as proposals: for analysis only, labelled in every output."""

    def __init__(self, boxes_by_key: dict[str, Proposals]) -> None:
        super().__init__()
        self.entries = {
            k: Proposals(p.boxes, p.scores, p.class_names, ORACLE_ID, dict(p.meta), p.name_scores)
            for k, p in boxes_by_key.items()
        }

    @classmethod
    def from_file(cls, path: Path, box_format: Optional[str] = None) -> "OracleSource":
        from .files import read_proposals_file

        return cls(read_proposals_file(path, box_format=box_format).entries)

    @property
    def id(self) -> str:
        return ORACLE_ID

    def propose(self, image: Image.Image, key: Optional[str] = None) -> Proposals:
        from .files import DetectionsFile

        if key is None:
            raise BicmError("the oracle source needs the image's path or id")
        return DetectionsFile(Path("ground truth"), self.entries).lookup(key)
