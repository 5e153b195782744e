"""The bundled example: one shapes-world scene (a PNG shipped with bicm) and its expressions."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..world import expressions, make_scene

__all__ = ["EXAMPLE_SEED", "example_scene", "example_image", "example_queries"]

EXAMPLE_SEED = 20261147  # a scene with all four expression types and good contrast


def example_scene():
    """The scene of the bundled example (deterministic)."""
    import numpy as np

    return make_scene(np.random.default_rng(EXAMPLE_SEED), n_objects=6, size=(360, 280))


def example_image() -> Path:
    """Path of the bundled example PNG (``example.png``, rendered from :func:`example_scene`)."""
    return Path(str(resources.files("bicm.shapes.examples").joinpath("example.png")))


def example_queries() -> list[str]:
    """Three expressions of the example of different types (attribute, position, plural first)."""
    found = expressions(example_scene())
    chosen: list[str] = []
    for kind in ("position", "attribute", "plural", "category"):
        chosen += [e.text for e in found if e.kind == kind][:1]
    return chosen[:3]
