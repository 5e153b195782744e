"""The shapes world: seeded scenes of coloured shapes with referring expressions and truth.

Scenes are 240-400 px on each side, on a textured, noisy background, with 1-8 objects. Each
object has a shape (:data:`SHAPES`), a colour (:data:`COLOURS`), a size (small or large) and
a position; objects overlap little (IoU <= 0.05). Same-kind distractors are common, so many
expressions need an attribute or a position to pick one object out.

Expressions (:func:`expressions`) come with their type and ground truth:

* ``category``: "the triangle" (the only triangle);
* ``attribute``: "the blue circle", "the small star", "the large red square" (the shortest
  attribute description that is unique);
* ``position``: "the red square on the left" (two or three look the same; the target is
  the left-, right-, top- or bottom-most of them by a clear margin);
* ``plural``: "the two red squares", "the three stars" (all objects of a description; the
  ground truth is the union box, as in Flickr30K).

Everything is a pure function of a seed: the same seed gives the same pixels and text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..boxes import Box, union_box

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "ShapeObject",
    "Scene",
    "Expression",
    "make_scene",
    "render",
    "expressions",
    "single_object_image",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 70, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 50, 185),
    "white": (245, 245, 245),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "large": (0.23, 0.30)}  # side / min(W, H)
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class ShapeObject:
    """One object: its kind and its box (float xyxy, exclusive edges)."""

    shape: str
    colour: str
    size: str
    box: Box

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Scene:
    """A scene: size, background seed and objects."""

    width: int
    height: int
    background_seed: int
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class Expression:
    """A referring expression, its type and the objects (indices) it refers to."""

    text: str
    kind: str  # category | attribute | position | plural
    targets: tuple[int, ...]
    box: Box


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_scene(
    rng: np.random.Generator,
    n_objects: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
    max_objects: int = 8,
    distractor_prob: float = 0.5,
) -> Scene:
    """A random scene. With ``distractor_prob`` a new object copies the shape (and often the
    colour) of one already placed, so that attributes and positions are needed."""
    width, height = size or (int(rng.integers(240, 401)), int(rng.integers(240, 401)))
    n = int(n_objects if n_objects is not None else rng.integers(1, max_objects + 1))
    short = min(width, height)
    objects: list[ShapeObject] = []
    for _ in range(n):
        for _attempt in range(60):
            if objects and rng.random() < distractor_prob:
                model = objects[int(rng.integers(len(objects)))]
                shape = model.shape
                colour = model.colour if rng.random() < 0.6 else str(rng.choice(list(COLOURS)))
            else:
                shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            size_name = "small" if rng.random() < 0.5 else "large"
            side = short * float(rng.uniform(*SIZES[size_name]))
            x = float(rng.uniform(4, width - side - 4))
            y = float(rng.uniform(4, height - side - 4))
            box = (round(x), round(y), round(x + side), round(y + side))
            box = tuple(float(v) for v in box)
            if all(_iou(box, o.box) <= 0.05 for o in objects):  # type: ignore[arg-type]
                objects.append(ShapeObject(shape, colour, size_name, box))  # type: ignore[arg-type]
                break
    return Scene(width, height, int(rng.integers(0, 2**31 - 1)), tuple(objects))


def _background(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.uniform(70, 170, size=3) * np.array([1.0, rng.uniform(0.85, 1.1), rng.uniform(0.7, 1.05)])
    grid = (height // 16 + 2, width // 16 + 2)
    coarse = rng.normal(0, 18, size=grid + (1,)) + rng.normal(0, 5, size=grid + (3,))  # mostly luminance
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    texture = np.asarray(coarse_img, dtype=np.float32) - 128
    fine = rng.normal(0, float(rng.uniform(6, 16)), size=(height, width, 1))
    pixels = np.clip(base + texture + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _star(box: Box, points: int = 5) -> list[tuple[float, float]]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    outer = (box[2] - box[0]) / 2
    inner = outer * 0.42
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((cx + r * math.cos(a), cy + r * math.sin(a) + outer * 0.08))
    return out


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    """Draw one object into its box (the box is tight around the shape)."""
    x1, y1, x2, y2 = obj.box
    x2, y2 = x2 - 1, y2 - 1  # PIL boxes include their last pixel
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star((x1, y1, x2, y2)), fill=fill)
    elif obj.shape == "cross":
        w = (x2 - x1) / 3
        draw.rectangle((x1 + w, y1, x2 - w, y2), fill=fill)
        draw.rectangle((x1, y1 + w, x2, y2 - w), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(obj.shape)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic)."""
    image = _background(scene.width, scene.height, scene.background_seed)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def single_object_image(rng: np.random.Generator, side: int = 96) -> tuple[Image.Image, ShapeObject]:
    """A crop-like image: one object filling most of a small square (for CLIP training)."""
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    margin = float(rng.uniform(0.0, 0.2)) * side
    box = (margin, margin, side - margin, side - margin)
    box = tuple(float(round(v)) for v in box)
    obj = ShapeObject(shape, colour, "small" if rng.random() < 0.5 else "large", box)  # type: ignore[arg-type]
    image = _background(side, side, int(rng.integers(0, 2**31 - 1)))
    draw_object(ImageDraw.Draw(image), obj)
    return image.filter(ImageFilter.GaussianBlur(0.6)), obj


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") else "s")


def _desc(obj: ShapeObject, use_size: bool, use_colour: bool) -> str:
    words = ([obj.size] if use_size else []) + ([obj.colour] if use_colour else []) + [obj.shape]
    return " ".join(words)


def _matches(obj: ShapeObject, ref: ShapeObject, use_size: bool, use_colour: bool) -> bool:
    return obj.shape == ref.shape and (not use_size or obj.size == ref.size) and (not use_colour or obj.colour == ref.colour)


def _position(scene: Scene, group: Sequence[int], target: int) -> Optional[str]:
    """"on the left"/"on the right"/"at the top"/"at the bottom" when the target is the
    extreme of its group by a clear margin (10% of the image side)."""
    tx, ty = scene.objects[target].centre
    others = [scene.objects[i].centre for i in group if i != target]
    if not others:
        return None
    mx, my = 0.10 * scene.width, 0.10 * scene.height
    if all(tx + mx < ox for ox, _ in others):
        return "on the left"
    if all(tx - mx > ox for ox, _ in others):
        return "on the right"
    if all(ty + my < oy for _, oy in others):
        return "at the top"
    if all(ty - my > oy for _, oy in others):
        return "at the bottom"
    return None


def expressions(scene: Scene) -> list[Expression]:
    """Every expression of the four types that refers unambiguously in ``scene``."""
    objs = scene.objects
    out: list[Expression] = []
    seen_plural: set[str] = set()
    for t, obj in enumerate(objs):
        found = False
        for use_size, use_colour, kind in (
            (False, False, "category"),
            (False, True, "attribute"),
            (True, False, "attribute"),
            (True, True, "attribute"),
        ):
            group = [i for i, o in enumerate(objs) if _matches(o, obj, use_size, use_colour)]
            if group == [t]:
                out.append(Expression(f"the {_desc(obj, use_size, use_colour)}", kind, (t,), obj.box))
                found = True
                break
        if not found:
            group = [i for i, o in enumerate(objs) if _matches(o, obj, False, True)]
            where = _position(scene, group, t)
            if where is not None and len(group) <= 3:
                out.append(Expression(f"the {_desc(obj, False, True)} {where}", "position", (t,), obj.box))
        for use_colour in (True, False):
            group = tuple(i for i, o in enumerate(objs) if _matches(o, obj, False, use_colour))
            words = _desc(obj, False, use_colour).rsplit(" ", 1)
            phrase = " ".join(words[:-1] + [_plural(words[-1])])
            if 2 <= len(group) <= 4 and phrase not in seen_plural:
                seen_plural.add(phrase)
                text = f"the {NUMBERS[len(group)]} {phrase}"
                out.append(Expression(text, "plural", group, union_box(objs[i].box for i in group)))
    return out
