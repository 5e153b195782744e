"""The shapes world (version 2): seeded scenes of coloured shapes with referring expressions.

The world stands in for the paper's benchmarks, so its numbers only mean something if it
poses their problems at their scale. Version 2 is fitted to statistics measured on the real
annotation files (:mod:`bicm.shapes.stats`; the table is in ``docs/shapes-world.md``): the
area of the referred box as a share of the image, box aspect ratios, objects per image, the
share of plural phrases and the query length. It has two *profiles*, one per protocol of the
paper:

* ``"phrase"`` (Flickr30K Entities-like): larger objects on average with a wide spread,
  square-ish boxes, short phrases with the stop words dropped ("red ellipse",
  "two stars"), about a fifth of them plural (the truth is the union box);
* ``"ref"`` (RefCOCO-like): one object per query, look-alikes in every scene, longer
  expressions ("the red ellipse on the left", "left star").

A scene holds 2-8 objects (:data:`SHAPES` x :data:`COLOURS`, any aspect ratio), drawn larger
first, so that a small object may lie on a large one as a cup lies on a table; an object is
never more than :data:`MAX_OCCLUDED` covered by the boxes of the objects drawn after it, and
objects that overlap differ in colour. Each category has its own surface pattern
(:data:`PATTERNS`: rings, stripes, dots) in a darker shade of the object's colour, so that
every part of an object shows what it is, as the parts of real objects do (a dog's fur, a
car's wheels); a shape known only by its outline would be recognisable only at its edges.
Backgrounds are textured and noisy.

Expressions (:func:`expressions`) come with their kind and truth, and refer unambiguously:

* ``category``: the only object of its shape ("the triangle");
* ``attribute``: unique by colour, or by relative size ("the large star": at least
  :data:`SIZE_RATIO` times the area of every other star), or both;
* ``position``: two or three look-alikes (same shape, or same shape and colour); the target is
  the left-, right-, top- or bottom-most by a clear margin (:data:`POSITION_MARGIN` of the
  image side);
* ``plural``: all 2-4 objects of a shape (or shape and colour); the truth is the union box.

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
    "WORLD_VERSION",
    "SHAPES",
    "COLOURS",
    "PROFILES",
    "Profile",
    "ShapeObject",
    "Scene",
    "Referent",
    "Expression",
    "make_scene",
    "render",
    "referents",
    "expressions",
    "phrase_text",
    "single_object_image",
    "iou",
]

#: Version of the world. Datasets, runs and models record it; other versions are refused.
WORLD_VERSION = "v2"

SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 70, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 50, 185),
    "white": (245, 245, 245),
}
#: "large"/"small" need this ratio of areas to every other object of the group
SIZE_RATIO = 2.0
#: a position needs this margin (share of the image side) between the target and the others
POSITION_MARGIN = 0.10
#: at most this share of an object's box may be covered by the boxes of later objects
MAX_OCCLUDED = 0.25
NUMBERS = {2: "two", 3: "three", 4: "four"}
WHERE_LONG = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
KINDS: tuple[str, ...] = ("category", "attribute", "position", "plural")


@dataclass(frozen=True)
class Profile:
    """How scenes of one protocol are drawn and phrased.

    Attributes
    ----------
    name: ``"phrase"`` or ``"ref"``.
    area_knots: ``((quantile, area fraction), ...)``: the distribution of an object's box
        area as a share of the image, as an inverse CDF interpolated in log area.
    log_aspect: mean and standard deviation of ``log(width / height)`` of an object's box.
    objects: the smallest and largest number of objects asked for (fewer are placed when
        the scene has no room left).
    kind_weights: how often :func:`bicm.shapes.dataset.pick_expressions` takes each kind.
    style: the phrasing (``"phrase"``: stop words dropped; ``"ref"``: referring expressions).
    """

    name: str
    area_knots: tuple[tuple[float, float], ...]
    log_aspect: tuple[float, float]
    objects: tuple[int, int]
    kind_weights: dict[str, float]
    style: str
    lookalike_prob: float = 0.5
    shrink: bool = False


PROFILES: dict[str, Profile] = {
    "phrase": Profile(
        "phrase",
        ((0.0, 0.011), (0.10, 0.024), (0.25, 0.075), (0.50, 0.17), (0.75, 0.32), (0.90, 0.50), (1.0, 0.70)),
        (0.0, 0.62),
        (4, 10),
        {"category": 0.50, "attribute": 0.22, "position": 0.06, "plural": 0.22},
        "phrase",
        0.3,
        True,
    ),
    "ref": Profile(
        "ref",
        ((0.0, 0.03), (0.10, 0.062), (0.25, 0.088), (0.50, 0.135), (0.75, 0.23), (0.90, 0.36), (1.0, 0.50)),
        (-0.29, 0.55),
        (3, 7),
        {"category": 0.15, "attribute": 0.30, "position": 0.55},
        "ref",
    ),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object: its kind and its box (float xyxy, exclusive edges, tight around the shape)."""

    shape: str
    colour: str
    box: Box

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    """A scene: size, background seed, objects in drawing order, and its profile."""

    width: int
    height: int
    background_seed: int
    objects: tuple[ShapeObject, ...]
    profile: str = "ref"


@dataclass(frozen=True)
class Referent:
    """What an expression says, before it is phrased: the kind, the words and the truth.

    ``size`` is ``"large"``/``"small"`` or ``None``; ``colour`` may be ``None``; ``where`` is
    ``"left"``/``"right"``/``"top"``/``"bottom"`` for positions; ``count`` for plurals.
    """

    kind: str
    targets: tuple[int, ...]
    shape: str
    colour: Optional[str] = None
    size: Optional[str] = None
    where: Optional[str] = None
    count: Optional[int] = None


@dataclass(frozen=True)
class Expression:
    """A phrased referring expression, its kind, the objects it refers to and the truth box."""

    text: str
    kind: str
    targets: tuple[int, ...]
    box: Box


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _sample_area(rng: np.random.Generator, knots: Sequence[tuple[float, float]]) -> float:
    """An area fraction from the inverse CDF through ``knots`` (linear in log area)."""
    u = float(rng.random())
    qs = [q for q, _ in knots]
    logs = [math.log(a) for _, a in knots]
    return math.exp(float(np.interp(u, qs, logs)))


def _canvas(rng: np.random.Generator) -> tuple[int, int]:
    """Image size: long side 320-400 px; landscape 4:3 or 3:2, portrait 3:4, or square."""
    long_side = int(rng.integers(320, 401))
    ratio = float(rng.choice([4 / 3, 3 / 2, 3 / 4, 1.0], p=[0.5, 0.15, 0.25, 0.10]))
    if ratio >= 1:
        return long_side, int(round(long_side / ratio))
    return int(round(long_side * ratio)), long_side


def make_scene(
    rng: np.random.Generator,
    profile: str = "ref",
    n_objects: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
    lookalike_prob: Optional[float] = None,
) -> Scene:
    """A random scene of ``profile`` (``"phrase"`` or ``"ref"``).

    Object sizes and aspect ratios come from the profile; with ``lookalike_prob`` a new
    object copies the shape (and often the colour) of one already drawn up, so that
    attributes and positions are needed. Objects are placed largest first; a placement is
    refused when it would cover more than :data:`MAX_OCCLUDED` of an earlier object's box
    or overlap an object of its own colour.
    """
    prof = PROFILES[profile]
    lookalike_prob = prof.lookalike_prob if lookalike_prob is None else lookalike_prob
    width, height = size or _canvas(rng)
    lo, hi = prof.objects
    n = int(n_objects if n_objects is not None else rng.integers(lo, hi + 1))
    # kinds first (look-alikes copy earlier kinds), then sizes, largest drawn first
    kinds: list[tuple[str, str]] = []
    for _ in range(n):
        if kinds and rng.random() < lookalike_prob:
            shape, colour = kinds[int(rng.integers(len(kinds)))]
            if rng.random() >= 0.6:
                colour = str(rng.choice(list(COLOURS)))
        else:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        kinds.append((shape, colour))
    areas = sorted((_sample_area(rng, prof.area_knots) for _ in range(n)), reverse=True)
    order = rng.permutation(n)  # which kind gets which size
    objects: list[ShapeObject] = []
    covered: list[float] = []  # box area of each placed object covered by later boxes
    for rank, area in enumerate(areas):
        shape, colour = kinds[int(order[rank])]
        for attempt in range(60):
            if attempt == 30 and prof.shrink:
                area *= 0.5  # no room at this size: a smaller object rather than none
            aspect = math.exp(float(rng.normal(*prof.log_aspect)))
            aspect = min(max(aspect, 0.25), 4.0)
            a = area * float(rng.uniform(0.9, 1.1)) * width * height
            w = min(math.sqrt(a * aspect), width - 8.0)
            h = min(a / w, height - 8.0)
            w = max(w, 6.0)
            h = max(h, 6.0)
            x = float(rng.uniform(4, width - w - 4))
            y = float(rng.uniform(4, height - h - 4))
            box = tuple(float(round(v)) for v in (x, y, x + w, y + h))
            inter = [_intersection(box, o.box) for o in objects]
            if any(i > 0 and o.colour == colour for i, o in zip(inter, objects)):
                continue
            if any((c + i) > MAX_OCCLUDED * o.area for c, i, o in zip(covered, inter, objects)):
                continue
            covered = [c + i for c, i in zip(covered, inter)] + [0.0]
            objects.append(ShapeObject(shape, colour, box))  # type: ignore[arg-type]
            break
    return Scene(width, height, int(rng.integers(0, 2**31 - 1)), tuple(objects), profile)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------
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
    """A star filling ``box`` (stretched with it)."""
    x1, y1, x2, y2 = box
    rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
    raw = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + k * math.pi / points
        raw.append((r * math.cos(a), r * math.sin(a)))
    ys = [p[1] for p in raw]
    top, bottom = min(ys), max(ys)  # a star is shorter than wide: stretch it to the box
    return [(x1 + (px + 1) * rx, y1 + (py - top) / (bottom - top) * 2 * ry) for px, py in raw]


#: The surface pattern of each category (drawn in a darker shade of the object's colour), so
#: that every part of an object shows what it is, as the parts of real objects do.
PATTERNS: dict[str, str] = {"ellipse": "rings", "rectangle": "horizontal stripes", "triangle": "vertical stripes",
                            "star": "dots", "cross": "diagonal stripes"}


def _pattern(shape: str, w: int, h: int) -> np.ndarray:
    """``(h, w)`` bool: where the category's pattern is drawn in a ``w`` x ``h`` box."""
    period = max(4.0, min(w, h) / 4.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    kind = PATTERNS[shape]
    if kind == "rings":
        r = np.hypot((xx - w / 2) / max(w, 1) * min(w, h), (yy - h / 2) / max(h, 1) * min(w, h))
        return (r % period) < period / 2
    if kind == "horizontal stripes":
        return (yy % period) < period / 2
    if kind == "vertical stripes":
        return (xx % period) < period / 2
    if kind == "diagonal stripes":
        return ((xx + yy) % (1.4 * period)) < 0.7 * period
    cell = period  # dots
    cx, cy = (xx % cell) - cell / 2, (yy % cell) - cell / 2
    return np.hypot(cx, cy) < cell * 0.3


def _shape_mask(obj: ShapeObject, w: int, h: int) -> Image.Image:
    """The object's silhouette in its own box, as a PIL "L" mask."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x2, y2 = w - 1, h - 1  # PIL boxes include their last pixel
    if obj.shape == "ellipse":
        draw.ellipse((0, 0, x2, y2), fill=255)
    elif obj.shape == "rectangle":
        draw.rectangle((0, 0, x2, y2), fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(x2 / 2, 0), (x2, y2), (0, y2)], fill=255)
    elif obj.shape == "star":
        draw.polygon(_star((0, 0, x2, y2)), fill=255)
    elif obj.shape == "cross":
        tw, th = x2 / 3, y2 / 3
        draw.rectangle((tw, 0, x2 - tw, y2), fill=255)
        draw.rectangle((0, th, x2, y2 - th), fill=255)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(obj.shape)
    return mask


def draw_object(image: Image.Image, obj: ShapeObject) -> None:
    """Draw one object into its box of ``image`` (in place): its silhouette in its colour,
    the category's surface pattern in a darker shade, and a dark outline. The box is tight."""
    x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
    w, h = max(1, x2 - x1), max(1, y2 - y1)
    fill = np.array(COLOURS[obj.colour], dtype=np.float32)
    mask = _shape_mask(obj, w, h)
    edge = np.asarray(mask.filter(ImageFilter.MinFilter(2 * max(1, int(round(min(w, h) / 40))) + 1))) < 128
    inside = np.asarray(mask) >= 128
    patch = np.empty((h, w, 3), dtype=np.float32)
    patch[:] = fill
    patch[_pattern(obj.shape, w, h)] = fill * 0.68
    patch[edge] = fill * 0.55
    region = np.asarray(image.crop((x1, y1, x1 + w, y1 + h))).astype(np.float32)
    region[inside] = patch[inside]
    image.paste(Image.fromarray(region.astype(np.uint8)), (x1, y1))


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic)."""
    image = _background(scene.width, scene.height, scene.background_seed)
    for obj in scene.objects:
        draw_object(image, obj)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def single_object_image(rng: np.random.Generator, side: int = 96) -> tuple[Image.Image, ShapeObject]:
    """An object-centric image: one object of any aspect filling much of a small square."""
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    aspect = min(max(math.exp(float(rng.normal(0.0, 0.6))), 0.3), 3.3)
    fill = float(rng.uniform(0.55, 0.95)) * side
    w, h = (fill, fill / aspect) if aspect >= 1 else (fill * aspect, fill)
    x = float(rng.uniform(0, side - w))
    y = float(rng.uniform(0, side - h))
    box = tuple(float(round(v)) for v in (x, y, x + w, y + h))
    obj = ShapeObject(shape, colour, box)  # type: ignore[arg-type]
    image = _background(side, side, int(rng.integers(0, 2**31 - 1)))
    draw_object(image, obj)
    return image.filter(ImageFilter.GaussianBlur(0.6)), obj


# --------------------------------------------------------------------------------------
# What can be said about a scene
# --------------------------------------------------------------------------------------
def _group(objs: Sequence[ShapeObject], shape: str, colour: Optional[str]) -> list[int]:
    return [i for i, o in enumerate(objs) if o.shape == shape and (colour is None or o.colour == colour)]


def relative_size(objs: Sequence[ShapeObject], group: Sequence[int], target: int) -> Optional[str]:
    """``"large"`` / ``"small"`` when the target's area is at least :data:`SIZE_RATIO` times
    (at most 1 / that) the area of every other object of ``group``."""
    others = [objs[i].area for i in group if i != target]
    if not others:
        return None
    area = objs[target].area
    if all(area >= SIZE_RATIO * a for a in others):
        return "large"
    if all(area * SIZE_RATIO <= a for a in others):
        return "small"
    return None


def position(scene: Scene, group: Sequence[int], target: int) -> Optional[str]:
    """``"left"``/``"right"``/``"top"``/``"bottom"`` when the target is the extreme of its
    group by a clear margin (:data:`POSITION_MARGIN` of the image side)."""
    tx, ty = scene.objects[target].centre
    others = [scene.objects[i].centre for i in group if i != target]
    if not others:
        return None
    mx, my = POSITION_MARGIN * scene.width, POSITION_MARGIN * scene.height
    if all(tx + mx < ox for ox, _ in others):
        return "left"
    if all(tx - mx > ox for ox, _ in others):
        return "right"
    if all(ty + my < oy for _, oy in others):
        return "top"
    if all(ty - my > oy for _, oy in others):
        return "bottom"
    return None


def referents(scene: Scene) -> list[Referent]:
    """Every unambiguous thing that can be said of ``scene``, by kind.

    Per object: ``category`` when its shape is unique; else the shortest unique
    ``attribute`` (colour, then size, then size and colour); and a ``position`` among 2-3
    look-alikes (same shape and colour, or same shape) when it is their extreme. Per group of
    2-4 objects of a shape (or shape and colour): a ``plural``.
    """
    objs = scene.objects
    out: list[Referent] = []
    for t, obj in enumerate(objs):
        same_shape = _group(objs, obj.shape, None)
        same_kind = _group(objs, obj.shape, obj.colour)
        if same_shape == [t]:
            out.append(Referent("category", (t,), obj.shape))
        else:
            if same_kind == [t]:
                out.append(Referent("attribute", (t,), obj.shape, colour=obj.colour))
            elif relative_size(objs, same_shape, t):
                out.append(Referent("attribute", (t,), obj.shape, size=relative_size(objs, same_shape, t)))
            elif relative_size(objs, same_kind, t):
                out.append(Referent("attribute", (t,), obj.shape, colour=obj.colour, size=relative_size(objs, same_kind, t)))
            for group, colour in ((same_kind, obj.colour), (same_shape, None)):
                if 2 <= len(group) <= 3:
                    where = position(scene, group, t)
                    if where is not None:
                        out.append(Referent("position", (t,), obj.shape, colour=colour, where=where))
                        break
    seen: set[tuple[str, Optional[str]]] = set()
    for obj in objs:
        for colour in (obj.colour, None):
            group = tuple(_group(objs, obj.shape, colour))
            if 2 <= len(group) <= 4 and (obj.shape, colour) not in seen:
                seen.add((obj.shape, colour))
                if colour is not None and len(_group(objs, obj.shape, None)) == len(group):
                    continue  # "the two red stars" when they are the only stars: say "the two stars"
                out.append(Referent("plural", group, obj.shape, colour=colour, count=len(group)))
    return out


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("ss", "x")) else "s")


def phrase_text(ref: Referent, style: str = "ref", rng: Optional[np.random.Generator] = None) -> str:
    """Words for a referent.

    ``style="phrase"`` drops stop words as Flickr30K Entities' preprocessed phrases do
    ("red ellipse", "left star", "two red stars", "stars"); ``style="ref"`` phrases it as a
    RefCOCO expression ("the red ellipse on the left", "left star"). With ``rng`` a template
    is drawn; without it the first (canonical) one is used.
    """

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    desc = " ".join(w for w in (ref.size, ref.colour, ref.shape) if w)
    if ref.kind == "plural":
        noun = " ".join(w for w in (ref.colour, _plural(ref.shape)) if w)
        number = NUMBERS[ref.count or 2]
        if style == "phrase":
            return pick([f"{number} {noun}", noun])
        return pick([f"the {number} {noun}", f"{number} {noun}"])
    if ref.kind == "position":
        where = ref.where or ""
        if style == "phrase":
            return f"{where} {desc}"
        side = f"the {desc} on the {where} side" if where in ("left", "right") else f"the {desc} {WHERE_LONG[where]}"
        return pick([f"the {desc} {WHERE_LONG[where]}", f"{desc} {WHERE_LONG[where]}", side, f"the {where} {desc}", f"{where} {desc}", f"{desc} {where}"])
    if style == "phrase":
        return desc
    return pick([f"the {desc}", f"the {desc}", desc])


def expressions(scene: Scene, style: Optional[str] = None, rng: Optional[np.random.Generator] = None) -> list[Expression]:
    """Every unambiguous expression of ``scene`` (see :func:`referents`), phrased in ``style``
    (default: the scene's profile)."""
    style = style or PROFILES[scene.profile].style
    out = []
    for ref in referents(scene):
        box = union_box(scene.objects[i].box for i in ref.targets)
        out.append(Expression(phrase_text(ref, style, rng), ref.kind, ref.targets, box))
    return out
