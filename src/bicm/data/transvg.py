"""Reader for the TransVG / Pseudo-Q / CLIP-VG split files (``unc_testA.pth``, ``flickr_test.pth``...).

A split file is a ``torch.save`` pickle of a list with one entry per query:

- Flickr30K Entities (``flickr_*.pth``): ``(image_file, box, phrase)``;
- the others: ``(image_file, mask_file, box, phrase, parse)``.

It is read through :mod:`bicm.data._pickle` (an allow-list unpickler: builtins and numpy
arrays only, no pickled code runs). File names are ``<dataset>_<split>.pth`` with the
datasets below.

Box conventions, checked on the real files (``../shared/data/transvg-splits``), each turned
into bicm's float ``xyxy`` with exclusive ``x2``/``y2``:

- ``flickr``: ``xyxy_inclusive_1based`` (the raw Flickr30K Entities XML values: 1-based
  pixel indices, last pixel included) -> ``(x1 - 1, y1 - 1, x2, y2)``;
- ``referit``: ``xyxy_inclusive`` (0-based pixel indices, last pixel included) ->
  ``(x1, y1, x2 + 1, y2 + 1)``;
- ``unc``, ``unc+``, ``gref``, ``gref_umd``: ``xywh`` (COCO ``[x, y, w, h]`` floats) ->
  ``(x, y, x + w, y + h)``.

Flickr (x1 - 1, y1 - 1, x2, y2): in ``flickr_test.pth`` / ``flickr_val.pth`` the smallest x1
and y1 are 1, never 0 (1,712 test boxes have x1 = 1, none x1 = 0), while the largest x2/y2
equal the image sides (500, 375, 333: 384 test images have a box ending at x2 = 500, 131 at
y2 = 375, against 14 at 374). A box touching the left edge starts at 1 and one touching the
right edge ends at the width: 1-based pixel indices with the last pixel included, the PASCAL
VOC convention. The official Flickr30K Entities reader (``flickr30k_entities_utils.py``,
``get_annotations``) says so too: it subtracts 1 from every coordinate because "matlab
indexing is 1-based". Shifting x1/y1 by -1 and keeping x2/y2 gives the exclusive-edge box
over the same pixels (a full-width box becomes ``0 .. 500``).

ReferIt (x1, y1, x2 + 1, y2 + 1): x1/y1 are 0 for boxes at the left/top edge (924 of 1,000
val images) and the largest x2 of an image is 479, 359 or 319 (633, 272, 28 images), never 480,
360 or 320: SAIAPR TC-12 images are 480x360, 360x480 or 320x240, so x2/y2 index the last pixel.

Pass ``convention=`` to read the numbers another way (``"xyxy"`` takes them as is, which is
what TransVG's own loader does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import BicmError, warn
from ._pickle import load_torch_file
from .sample import BOX_CONVENTIONS, GroundingSample, coco_image_id, is_proper_box, to_xyxy

__all__ = ["TRANSVG_CONVENTIONS", "TRANSVG_SPLITS", "parse_split_name", "read_transvg_split", "transvg_file"]

#: Box convention of each dataset's split files (see the module docstring for the evidence).
TRANSVG_CONVENTIONS: dict[str, str] = {
    "flickr": "xyxy_inclusive_1based",
    "referit": "xyxy_inclusive",
    "unc": "xywh",
    "unc+": "xywh",
    "gref": "xywh",
    "gref_umd": "xywh",
}

#: Splits the TransVG data release has for each dataset (Pseudo-Q adds e.g. ``train_pseudo``).
TRANSVG_SPLITS: dict[str, tuple[str, ...]] = {
    "flickr": ("train", "val", "test"),
    "referit": ("train", "val", "trainval", "test"),
    "unc": ("train", "val", "trainval", "testA", "testB"),
    "unc+": ("train", "val", "trainval", "testA", "testB"),
    "gref": ("train", "val"),
    "gref_umd": ("train", "val", "test"),
}

PathLike = Union[str, Path]


def parse_split_name(path: PathLike) -> tuple[str, str]:
    """``"gref_umd_val.pth"`` -> ``("gref_umd", "val")``; ``"unc+_testA.pth"`` -> ``("unc+", "testA")``.

    Raises
    ------
    BicmError
        When the file name does not start with a known dataset name and ``_``.
    """
    stem = Path(path).stem
    for name in sorted(TRANSVG_CONVENTIONS, key=len, reverse=True):  # gref_umd before gref
        if stem.startswith(name + "_") and len(stem) > len(name) + 1:
            return name, stem[len(name) + 1 :]
    raise BicmError(
        f"cannot tell the dataset of {Path(path).name}: TransVG split files are named "
        f"<dataset>_<split>.pth with dataset one of {', '.join(TRANSVG_CONVENTIONS)}; pass dataset="
    )


def transvg_file(folder: PathLike, dataset: str, split: str) -> Path:
    """Path of ``<dataset>_<split>.pth`` in ``folder`` (or ``folder`` itself when it is a file)."""
    folder = Path(folder).expanduser()
    return folder if folder.is_file() else folder / f"{dataset}_{split}.pth"


def read_transvg_split(
    path: PathLike,
    dataset: Optional[str] = None,
    *,
    convention: Optional[str] = None,
) -> list[GroundingSample]:
    """Read one TransVG-format split file.

    Parameters
    ----------
    path
        The ``.pth`` file (legacy or zip ``torch.save``, or a plain pickle).
    dataset
        ``flickr``, ``referit``, ``unc``, ``unc+``, ``gref`` or ``gref_umd``; by default taken
        from the file name (``<dataset>_<split>.pth``).
    convention
        How the stored boxes are to be read (a key of :data:`~bicm.data.sample.BOX_CONVENTIONS`);
        by default :data:`TRANSVG_CONVENTIONS` of the dataset.

    Returns
    -------
    One :class:`GroundingSample` per entry, in file order, with ``sample_id`` =
    ``"<file stem>:<entry index>"``, ``image_id`` the file stem (the COCO id for
    ``COCO_train2014_<id>.jpg``) and one box (the files already store the union box of
    multi-box Flickr phrases). Entries with an empty phrase or a degenerate box are dropped
    with a warning; the real files have none.

    Raises
    ------
    BicmError
        When the file is missing, unsafe (asks for code), or not in the layout above.
    """
    path = Path(path).expanduser()
    if dataset is None:
        dataset, _ = parse_split_name(path)
    if dataset not in TRANSVG_CONVENTIONS:
        raise BicmError(f"unknown TransVG dataset {dataset!r}; choose one of {', '.join(TRANSVG_CONVENTIONS)}")
    convention = convention or TRANSVG_CONVENTIONS[dataset]
    if convention not in BOX_CONVENTIONS:
        raise BicmError(f"unknown box convention {convention!r}; choose one of {', '.join(BOX_CONVENTIONS)}")

    entries = load_torch_file(path)
    if not isinstance(entries, (list, tuple)):
        raise BicmError(f"{path} is not a TransVG split file: it holds a {type(entries).__name__}, not a list")

    samples: list[GroundingSample] = []
    empty = degenerate = 0
    for index, entry in enumerate(entries):
        image_file, box_values, phrase = _unpack(entry, index, path)
        query = phrase.strip()
        box = to_xyxy(box_values, convention)
        if not query:
            empty += 1
            continue
        if not is_proper_box(box):
            degenerate += 1
            continue
        stem = Path(image_file).stem
        samples.append(
            GroundingSample(f"{path.stem}:{index}", coco_image_id(stem), image_file, query, (box,), box)
        )
    if empty:
        warn(f"{path.name}: dropped {empty} entries with an empty phrase")
    if degenerate:
        warn(f"{path.name}: dropped {degenerate} entries with a degenerate box (x2 <= x1 or y2 <= y1)")
    return samples


def _unpack(entry: Any, index: int, path: Path) -> tuple[str, Sequence[float], str]:
    """``(image_file, box, phrase)`` of one entry in either layout, checked."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4, 5):
        raise BicmError(
            f"{path.name}, entry {index}: expected (image_file, box, phrase) or "
            f"(image_file, mask_file, box, phrase, parse), got {_short(entry)}"
        )
    if len(entry) == 3:
        image_file, box, phrase = entry
    else:
        image_file, _mask, box, phrase = entry[:4]
    if not isinstance(image_file, str) or not image_file:
        raise BicmError(f"{path.name}, entry {index}: the image file name is {_short(image_file)}, not a string")
    if not isinstance(phrase, str):
        raise BicmError(f"{path.name}, entry {index}: the phrase is {_short(phrase)}, not a string")
    if hasattr(box, "tolist"):
        box = box.tolist()
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BicmError(f"{path.name}, entry {index}: the box must be 4 numbers, got {_short(box)}")
    return image_file, box, phrase


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
