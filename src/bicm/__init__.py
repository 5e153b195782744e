"""bicm: unpaired referring expression grounding with CLIP (BiCM).

Public API::

    from bicm import Grounder
    grounder = Grounder.from_pretrained("ViT-B-32", "openai", proposals="selective-search", name_with="vg1600")
    result = grounder.ground("photo.jpg", "the bird on the left")
    result.box                      # (x1, y1, x2, y2) in pixels of the image

* :class:`Grounder`: loads CLIP, holds the method's settings, grounds phrases;
* :class:`BiCMConfig`: the method's settings (the paper's defaults), :class:`Needs` what they
  compute per image;
* :class:`GroundingResult` and :class:`Candidates`: what comes back;
* :class:`Proposals`: boxes, scores and class names of one image; :func:`read_detections`
  reads a detections file;
* :class:`BicmError` (a user mistake, one line) and :class:`BicmWarning`.

Names are imported lazily, so ``import bicm`` (and ``bicm --help``) does not pay for torch
until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Grounder": "api",
    "BiCMConfig": "config",
    "Needs": "config",
    "GroundingResult": "results",
    "Candidates": "results",
    "to_detections": "results",
    "read_items": "batch",
    "run_batch": "batch",
    "Proposals": "proposals",
    "read_detections": "proposals.files",
    "BicmError": "errors",
    "BicmWarning": "errors",
}

__all__ = list(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover  (names for type checkers; real imports are lazy)
    from .api import Grounder  # noqa: F401
    from .config import BiCMConfig, Needs  # noqa: F401
    from .errors import BicmError, BicmWarning  # noqa: F401
    from .proposals import Proposals  # noqa: F401
    from .proposals.files import read_detections  # noqa: F401
    from .batch import read_items, run_batch  # noqa: F401
    from .results import Candidates, GroundingResult, to_detections  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bicm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
