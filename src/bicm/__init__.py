"""bicm: unpaired referring expression grounding with CLIP (BiCM).

Public API::

    from bicm import Grounder, BiCMConfig, Proposals
    grounder = Grounder.from_pretrained("ViT-B-32", "openai")
    result = grounder.ground("photo.jpg", "the bird on the left", proposals=boxes)

See ``bicm.api`` for the classes and the README for the command line. Names are imported
lazily, so ``import bicm`` (and ``bicm --help``) does not pay for torch until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BiCMConfig": "api",
    "Candidates": "api",
    "COMPONENTS": "api",
    "Grounder": "api",
    "GroundingResult": "api",
    "Backbone": "backbone",
    "load_backbone": "backbone",
    "save_checkpoint": "checkpoints",
    "BicmError": "errors",
    "BicmWarning": "errors",
    "load_image": "imageio",
    "Proposals": "proposals",
    "read_detections": "proposals.files",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover  (names for type checkers; real imports are lazy)
    from .api import COMPONENTS, BiCMConfig, Candidates, Grounder, GroundingResult  # noqa: F401
    from .backbone import Backbone, load_backbone  # noqa: F401
    from .checkpoints import save_checkpoint  # noqa: F401
    from .errors import BicmError, BicmWarning  # noqa: F401
    from .imageio import load_image  # noqa: F401
    from .proposals import Proposals  # noqa: F401
    from .proposals.files import read_detections  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bicm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
