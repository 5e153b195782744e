"""A corpus of hostile inputs, generated here (no binary files in the repository).

Every case must end in a correct result or in ONE clear error: for the command line one
``bicm: error:`` line on stderr and exit code 2, never a traceback, never a hang; for the
library a :class:`~bicm.errors.BicmError`. Each case runs through ``bicm ground`` (typer's
CliRunner, in process) and through :class:`bicm.Grounder` with the tiny test model.
"""

from __future__ import annotations

import io
import json
import math
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from bicm import BicmError, Grounder
from bicm.cli import app
from bicm.proposals.sources import make_source

from .helpers import bomb_png, draw_scene, make_backbone

QUERY = "the red square"
GOOD_BOXES = [[20.0, 30.0, 91.0, 101.0], [200.0, 120.0, 281.0, 201.0]]


# --------------------------------------------------------------------------------------
# How the hostile files are made
# --------------------------------------------------------------------------------------
def _scene(width: int = 120, height: int = 90) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 140, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((5, 5, max(5, width // 3), max(5, height // 3)), fill=(220, 30, 30))
    return image


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noisy(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def animated_gif() -> bytes:
    frames = [_scene().convert("P"), Image.new("RGB", (120, 90), (0, 0, 200)).convert("P"), _scene(120, 90).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    """Stored 120x60; EXIF orientation 6 (rotate 90 clockwise): displayed 60x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(_scene(120, 60), "JPEG", exif=exif.tobytes(), quality=90)


def palette_transparent() -> bytes:
    image = _scene().convert("P")
    return save(image, "PNG", transparency=0)


def gray16() -> bytes:
    array = (np.arange(90 * 120).reshape(90, 120) * 6).astype(np.uint16)
    return save(Image.fromarray(array), "PNG")


def float_tiff() -> bytes:
    array = np.linspace(-3.0, 900.0, 90 * 120, dtype=np.float32).reshape(90, 120)
    return save(Image.fromarray(array, mode="F"), "TIFF")


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------
@dataclass
class Case:
    """One hostile input. ``error`` is a fragment of the one expected error line (None: must work)."""

    id: str
    image: Optional[Callable[[], bytes]] = None  # bytes of the image file (default: a good scene)
    image_name: str = "img.png"
    queries: tuple[str, ...] = (QUERY,)
    dets: Optional[str] = None  # text of the detections file (default: good boxes)
    dets_name: str = "dets.json"
    error: Optional[str] = None
    warns: Optional[str] = None  # a fragment of a warning that must be shown
    display_size: Optional[tuple[int, int]] = None  # (width, height) the result must report
    extra: tuple[str, ...] = ()
    table: bool = False  # print the table instead of JSON
    no_proposals: bool = False
    setup: Optional[Callable[[Path], None]] = None
    marks: list = field(default_factory=list)


def _dets(boxes, fmt="xyxy", **record) -> str:
    return json.dumps({"box_format": fmt, "images": {"img.png": {"boxes": boxes, **record}}})


GOOD_PNG = lambda: save(draw_scene(), "PNG")  # noqa: E731

CASES = [
    # ---- images ----------------------------------------------------------------------------
    Case("img-zero-byte", image=lambda: b"", error="cannot read image"),
    Case("img-truncated-png", image=lambda: GOOD_PNG()[:200], error="img.png"),
    Case("img-truncated-jpeg", image=lambda: save(noisy(200, 150), "JPEG")[:3000], image_name="img.jpg", error="truncated"),
    Case("img-text-named-png", image=lambda: b"hello, I am not an image\n" * 10, error="cannot read image"),
    Case("img-random-bytes", image=lambda: bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)), error="cannot read image"),
    Case("img-png-named-jpg", image=GOOD_PNG, image_name="img.jpg"),
    Case("img-jpeg-named-png", image=lambda: save(draw_scene(), "JPEG")),
    Case("img-bomb-header-100000x100000", image=lambda: bomb_png(100_000, 100_000), error="more than the limit"),
    Case("img-bomb-header-2x2000000000", image=lambda: bomb_png(2, 2_000_000_000), error="more than the limit"),
    Case("img-1x1", image=lambda: save(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"), warns="1x1", display_size=(1, 1)),
    Case("img-1x5000", image=lambda: save(_scene(1, 5000), "PNG"), display_size=(1, 5000)),
    Case("img-5000x1", image=lambda: save(_scene(5000, 1), "PNG"), display_size=(5000, 1)),
    Case("img-3x4000", image=lambda: save(_scene(3, 4000), "PNG"), display_size=(3, 4000), no_proposals=True),
    Case("img-gray-16-bit", image=gray16),
    Case("img-float32-tiff", image=float_tiff, image_name="img.tiff"),
    Case("img-cmyk-jpeg", image=lambda: save(_scene().convert("CMYK"), "JPEG"), image_name="img.jpg"),
    Case("img-palette-transparency", image=palette_transparent),
    Case("img-rgba", image=lambda: save(_scene().convert("RGBA"), "PNG")),
    Case("img-la", image=lambda: save(_scene().convert("LA"), "PNG")),
    Case("img-1-bit", image=lambda: save(_scene().convert("1"), "PNG")),
    Case("img-animated-gif", image=animated_gif, image_name="img.gif", display_size=(120, 90)),
    Case("img-exif-rotated", image=exif_rotated, image_name="img.jpg", display_size=(60, 120)),
    Case("img-missing", image=None, setup=lambda d: (d / "img.png").unlink(), error="image not found"),
    Case("img-is-a-folder", setup=lambda d: ((d / "img.png").unlink(), (d / "img.png").mkdir()), error="not a regular file"),
    # ---- queries -----------------------------------------------------------------------------
    Case("query-empty", queries=("",), error="query 1 is empty"),
    Case("query-whitespace", queries=(" \t\n\r\x0b\x0c  ",), error="query 1 is empty"),
    Case("query-second-empty", queries=(QUERY, "   "), error="query 2 is empty"),
    Case("query-10000-chars", queries=("red square " * 910,), warns="truncated"),
    Case("query-10000-chars-no-spaces", queries=("x" * 10_000,), warns="truncated"),
    Case("query-chinese", queries=("红色的正方形",)),
    Case("query-arabic-rtl", queries=("المربع الأحمر",)),
    Case("query-cyrillic-table", queries=("красный квадрат",), table=True),
    Case("query-devanagari-combining", queries=("लाल वर्ग", "cafe\u0301 au lait"),),
    Case("query-emoji", queries=("🐶 the dog 🐕‍🦺", "🟥"), table=True),
    Case("query-control-chars", queries=("the\x00red\x07square\x1b[31m",)),
    Case("query-control-chars-table", queries=("the\x1b[2J\x1b[31mred\x08\x08 square",), table=True),
    Case("query-only-control-chars", queries=("\x00\x01\x1b\x7f",), error="query 1 is empty"),
    Case("query-lone-surrogate", queries=("caf\udce9 au lait",), table=True, warns="not valid text"),
    Case("query-zero-width", queries=("\u200b\u200d\ufeff",), error="query 1 is empty"),
    Case("query-many", queries=tuple(f"object number {i}" for i in range(64))),
    # ---- detections files ---------------------------------------------------------------------
    Case("dets-nan", dets='{"box_format": "xyxy", "images": {"img.png": [[NaN, 1, 20, 20]]}}', error="non-finite"),
    Case("dets-inf", dets='{"box_format": "xyxy", "images": {"img.png": [[0, 0, Infinity, 20]]}}', error="non-finite"),
    Case("dets-overflow-1e400", dets='{"box_format": "xyxy", "images": {"img.png": [[0, 0, 1e400, 20]]}}', error="non-finite"),
    Case("dets-huge-1e300", dets=_dets([[0, 0, 1e300, 1e300], GOOD_BOXES[0]]), error="beyond +-1e15"),
    Case("dets-large-1e9", dets=_dets([[0, 0, 1e9, 1e9], GOOD_BOXES[0]]), warns="clipped"),
    Case("dets-negative", dets=_dets([[-50, -40, 60, 70], GOOD_BOXES[0]]), warns="clipped"),
    Case("dets-reversed", dets=_dets([[90, 100, 20, 30], GOOD_BOXES[0]]), warns="degenerate"),
    Case("dets-zero-area", dets=_dets([[20, 30, 20, 30], [20, 30, 91, 30], GOOD_BOXES[0]]), warns="degenerate"),
    Case("dets-all-degenerate", dets=_dets([[5, 5, 5, 5], [500, 500, 600, 600]]), warns="degenerate"),
    Case("dets-empty-list", dets=_dets([])),
    Case("dets-duplicate-boxes", dets=_dets([GOOD_BOXES[0]] * 5 + [GOOD_BOXES[1]])),
    Case(
        "dets-duplicate-image-ids",
        dets=json.dumps({"image": "img.png", "box_format": "xyxy", "boxes": GOOD_BOXES}) + "\n"
        + json.dumps({"image": "img.png", "box_format": "xyxy", "boxes": GOOD_BOXES}) + "\n",
        dets_name="dets.jsonl",
        error="appears twice",
    ),
    Case("dets-box-as-string", dets=_dets(["20,30,91,101"]), error="box 0 is not 4 numbers"),
    Case("dets-box-three-numbers", dets=_dets([[1, 2, 3]]), error="box 0 is not 4 numbers"),
    Case("dets-box-of-bools", dets=_dets([[True, False, True, True]]), error="box 0 is not 4 numbers"),
    Case("dets-box-nested", dets=_dets([[[1, 2], [3, 4]]]), error="box 0 is not 4 numbers"),
    Case("dets-boxes-not-a-list", dets=json.dumps({"box_format": "xyxy", "images": {"img.png": {"boxes": 7}}}), error="must be a list"),
    Case("dets-scores-strings", dets=_dets(GOOD_BOXES, scores=["high", "low"]), error="'scores' must be a list of numbers"),
    Case("dets-scores-nan", dets=_dets(GOOD_BOXES, scores=[float("nan"), 0.5]), error="scores"),
    Case("dets-scores-too-few", dets=_dets(GOOD_BOXES, scores=[0.5]), error="2 boxes but 1 scores"),
    Case("dets-class-names-numbers", dets=_dets(GOOD_BOXES, class_names=[1, 2]), error="class names must be a list of strings"),
    Case("dets-name-scores-strings", dets=_dets(GOOD_BOXES, class_names=["a", "b"], name_scores=["x", "y"]), error="name_scores"),
    Case("dets-unknown-box-format", dets=_dets(GOOD_BOXES, fmt="cxcywh"), error="unknown box_format"),
    Case("dets-no-box-format", dets=json.dumps({"images": {"img.png": GOOD_BOXES}}), error="box format is not declared"),
    Case("dets-json-null", dets="null", error="expected an object with an image and boxes"),
    Case("dets-empty-file", dets="", error="is empty"),
    Case("dets-binary-garbage", dets=None, setup=lambda d: (d / "dets.json").write_bytes(b"\xff\xfe\x00\x81garbage"), error="cannot read detections"),
    Case("dets-utf8-bom", dets="\ufeff" + _dets(GOOD_BOXES)),
    Case("dets-other-image-only", dets=json.dumps({"box_format": "xyxy", "images": {"zebra.png": GOOD_BOXES}}), error="no detections for img.png"),
    Case("dets-xywh-negative-size", dets=_dets([[50, 50, -10, -10], [10, 10, 30, 30]], fmt="xywh"), warns="degenerate"),
    Case("dets-tsv-garbage", dets="not\ta\tvalid\trow\n", dets_name="dets.tsv", error="dets.tsv"),
]


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------
@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the block takes longer than ``seconds``."""

    def expired(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def materialise(case: Case, folder: Path) -> tuple[Path, Optional[Path]]:
    image = folder / case.image_name
    image.write_bytes((case.image or GOOD_PNG)())
    dets: Optional[Path] = None
    if not case.no_proposals:
        dets = folder / case.dets_name
        dets.write_text(case.dets if case.dets is not None else _dets(GOOD_BOXES), encoding="utf-8")
    if case.setup is not None:
        case.setup(folder)
    return image, dets


def check_boxes(records: list[dict], case: Case) -> None:
    for record in records:
        width, height = record["image_size"]
        if case.display_size is not None:
            assert (width, height) == case.display_size
        for box in [record["box"], record["qam_box"]] + [c["box"] for c in record.get("candidates", [])]:
            if box is None:
                continue
            assert all(math.isfinite(v) for v in box)
            x1, y1, x2, y2 = box
            assert 0 <= x1 <= x2 <= width + 1e-6 and 0 <= y1 <= y2 <= height + 1e-6, (box, width, height)
        if record["score"] is not None:
            assert math.isfinite(record["score"])


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder(make_backbone())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli(case: Case, tmp_path, tiny_checkpoint):
    image, dets = materialise(case, tmp_path)
    args = ["ground", str(image), *case.queries, "--checkpoint", str(tiny_checkpoint), *case.extra]
    if dets is not None:
        args += ["--proposals", str(dets)]
    if not case.table:
        args.append("--json")
    with deadline(120):
        result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for line in result.stderr.splitlines():
        assert line.startswith("bicm: "), f"stray stderr line: {line!r}"
    if case.error is not None:
        assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("bicm: error:")]
        assert len(errors) == 1, result.stderr
        assert case.error in errors[0], errors[0]
        assert result.stdout == ""
        return
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    if case.warns is not None:
        assert any(case.warns in line for line in result.stderr.splitlines() if "warning" in line), result.stderr
    if case.table:
        assert "\x1b[2J" not in result.stdout and "\x00" not in result.stdout
        return
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(case.queries)
    check_boxes(records, case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_library(case: Case, tmp_path, grounder):
    image, dets = materialise(case, tmp_path)
    with deadline(120), pytest.warns() if case.warns else _nothing() as caught:
        try:
            source = make_source(str(dets)) if dets is not None else None
            results = grounder.ground_many(image, list(case.queries), source)
        except BicmError as exc:
            assert case.error is not None, f"unexpected error: {exc}"
            assert case.error in str(exc) and "\n" not in str(exc), str(exc)
            return
    assert case.error is None, f"expected an error with {case.error!r}"
    if case.warns:
        assert any(case.warns in str(w.message) for w in caught), [str(w.message) for w in caught]
    check_boxes([r.to_dict() for r in results], case)
    for r in results:
        if r.attention is not None:
            assert torch.isfinite(r.attention).all()


@contextmanager
def _nothing():
    yield []


# --------------------------------------------------------------------------------------
# Library-only hostile inputs (Python values the CLI cannot pass)
# --------------------------------------------------------------------------------------
LIBRARY_PROPOSALS = {
    "three-columns": ([[1, 2, 3]], "shape"),
    "huge": ([[0, 0, 1e300, 10]], "too large"),
    "nan-tensor": (torch.tensor([[float("nan"), 0, 10, 10]]), "NaN"),
    "strings": ([["a", "b", "c", "d"]], "numbers"),
    "ragged": ([[1, 2, 3, 4], [1, 2]], "numbers"),
    "none-inside": ([[None, 1, 2, 3]], "numbers"),
}


@pytest.mark.parametrize("name", list(LIBRARY_PROPOSALS))
def test_library_rejects_malformed_proposal_values(name, grounder):
    proposals, fragment = LIBRARY_PROPOSALS[name]
    with pytest.raises(BicmError, match=fragment):
        grounder.ground(draw_scene(), QUERY, proposals)


@pytest.mark.parametrize("queries", [[], [None], [3.5], [b"bytes"]], ids=["no-query", "none", "float", "bytes"])
def test_library_rejects_queries_that_are_not_text(queries, grounder):
    with pytest.raises(BicmError):
        grounder.ground_many(draw_scene(), queries, GOOD_BOXES)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (2, 40_000), (1, 1)], ids=["1x5000", "5000x1", "2x40000", "1x1"])
def test_preprocess_of_extreme_aspect_ratios_is_fast_and_small(mode, size):
    """A 2x40000 image (or proposal crop) must not become a 224 x 4,480,000 intermediate."""
    from bicm.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(size=(224, 224), resize_mode=mode)
    with deadline(10):
        pixels, geometry = preprocess(Image.new("RGB", size, (200, 10, 10)), spec)
    assert pixels.shape == (3, 224, 224) and torch.isfinite(pixels).all()
    x1, y1, x2, y2 = geometry.visible_box()
    assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
