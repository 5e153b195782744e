"""What produced an output file: the versions that decide the numbers, recorded everywhere.

Every file bicm writes for later comparison (an eval's ``run.json`` and ``summary.json``,
``bicm train-clip``'s model card, the records of ``bicm proposals extract``) carries
:func:`versions`, so that two results can be told apart when the software changed.
"""

from __future__ import annotations

import importlib
import platform
from functools import lru_cache
from importlib import metadata
from typing import Any

__all__ = ["versions"]


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    found = {"python": platform.python_version()}
    modules = {"bicm": "bicm", "torch": "torch", "open_clip_torch": "open_clip", "torchvision": "torchvision",
               "numpy": "numpy", "pillow": "PIL"}
    for package, module in modules.items():
        try:  # the module's own version says more (torch's "+cu130" build tag)
            found[package] = str(getattr(importlib.import_module(module), "__version__"))
        except (ImportError, AttributeError):
            try:
                found[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                found[package] = "not installed"
    return tuple(found.items())


def versions() -> dict[str, Any]:
    """``{"python": "3.11.9", "bicm": ..., "torch": ..., "open_clip_torch": ..., ...}``."""
    return dict(_versions())
