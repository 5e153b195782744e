"""The bundled example: one scene of the shapes world's phrase protocol and three of its phrases.

The scene is drawn by the same generator as the ``shapes-phrase`` test split (another seed):
the first seed from :data:`FIRST_SEED` whose scene has 4-6 objects, is wider than high, and
can be described by an attribute phrase, a position phrase about another object, and a plural
phrase. Its phrases are those three
(Flickr30K Entities style), and it is grounded with that protocol's selection (the union of
the above-mean boxes), so ``bicm demo`` shows the method as the evaluation measures it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..world import Scene, expressions, make_scene

__all__ = ["FIRST_SEED", "EXAMPLE_PROTOCOL", "EXAMPLE_SELECTION", "example_seed", "example_scene", "example_image", "example_queries", "example_truths"]

FIRST_SEED = 20261200
EXAMPLE_PROTOCOL = "phrase"
#: the selection of the phrase protocol (Sec. 4.1, Flickr30K)
EXAMPLE_SELECTION = "union-above-mean"
_KINDS = ("attribute", "position", "plural")


def _chosen(scene: Scene) -> list:
    """The example's phrases: the first attribute phrase, the first position phrase about
    another object, the first plural phrase (fewer when the scene has none)."""
    found = expressions(scene, "phrase")
    out = []
    for kind in _KINDS:
        taken = {t for e in out for t in e.targets}
        match = next((e for e in found if e.kind == kind and (kind == "plural" or not taken & set(e.targets))), None)
        if match is not None:
            out.append(match)
    return out


def _suits(scene: Scene) -> bool:
    return len(_chosen(scene)) == 3 and 4 <= len(scene.objects) <= 6 and scene.width > scene.height


@lru_cache(maxsize=1)
def example_seed() -> int:
    """The seed of the example scene (see the module docstring)."""
    seed = FIRST_SEED
    while not _suits(make_scene(np.random.default_rng(seed), EXAMPLE_PROTOCOL)):
        seed += 1
    return seed


def example_scene() -> Scene:
    """The scene of the bundled example (deterministic)."""
    return make_scene(np.random.default_rng(example_seed()), EXAMPLE_PROTOCOL)


def example_image() -> Path:
    """Path of the bundled example PNG (``example.png``, rendered from :func:`example_scene`)."""
    return Path(str(resources.files("bicm.shapes.examples").joinpath("example.png")))


def example_queries() -> list[str]:
    """The example's attribute, position and plural phrase, in that order."""
    return [e.text for e in _chosen(example_scene())]


def example_truths() -> dict[str, tuple[float, float, float, float]]:
    """Every phrase of the example scene (the phrase protocol's expressions, not only the three
    of :func:`example_queries`) -> its true box (float xyxy pixels; the union box of a plural)."""
    return {e.text: tuple(float(v) for v in e.box) for e in expressions(example_scene(), EXAMPLE_PROTOCOL)}
