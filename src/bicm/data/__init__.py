"""Dataset readers: every one returns a list of :class:`GroundingSample`.

- TransVG / Pseudo-Q / CLIP-VG split files (:mod:`bicm.data.transvg`): ``flickr``,
  ``referit``, ``unc``, ``unc+``, ``gref``, ``gref_umd``; ``annotations`` is the folder of
  ``<name>_<split>.pth`` (or the file itself).
- The refer API (:mod:`bicm.data.refer`): ``refcoco``, ``refcoco+``, ``refcocog``,
  ``refclef``; ``annotations`` is the folder of ``refs(<split_by>).p`` and ``instances.json``.
- Raw Flickr30K Entities (:mod:`bicm.data.flickr30k`): ``flickr30k_entities``;
  ``annotations`` is the folder of ``Annotations/``, ``Sentences/`` and ``<split>.txt``.
- Your own JSON Lines (:mod:`bicm.data.jsonl`): ``jsonl``; ``annotations`` is the file.
- The shapes world (:mod:`bicm.shapes.dataset`): ``shapes-ref`` (RefCOCO-like) and
  ``shapes-phrase`` (Flickr30K Entities-like); ``annotations`` is the world's folder, by
  default ``~/.cache/bicm/shapes-v2`` (generated on first use; the images are there too, in
  one folder per protocol: pass ``image_root=<folder>/ref`` or ``/phrase``).

Example::

    from bicm.data import load_dataset
    samples = load_dataset("unc", "testA", "data/transvg-splits", image_root="data/coco/train2014")
    samples[0].query, samples[0].box, samples[0].image_path("data/coco/train2014")

All boxes are float ``xyxy`` in original-image pixels with exclusive ``x2``/``y2``; each reader
converts from its files' convention (documented in its module). Pass ``image_root`` to check,
before any work starts, that every image is there (:func:`check_images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import BicmError
from ..safeload import regular_file
from .flickr30k import read_flickr30k_entities
from .jsonl import read_jsonl_dataset
from .refer import REFER_DATASETS, read_refer
from .sample import BOX_CONVENTIONS, Box, GroundingSample, check_images, to_xyxy, union_box
from .transvg import TRANSVG_CONVENTIONS, TRANSVG_SPLITS, parse_split_name, read_transvg_split, transvg_file

__all__ = [
    "BOX_CONVENTIONS",
    "DATASETS",
    "Box",
    "DatasetInfo",
    "GroundingSample",
    "check_images",
    "load_dataset",
    "read_flickr30k_entities",
    "read_jsonl_dataset",
    "read_refer",
    "read_transvg_split",
    "to_xyxy",
    "union_box",
]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` knows about a dataset name.

    ``splits`` are the splits it is released with; for refer-API datasets the refs file is
    the authority (an unknown split is reported with the ones the file has).
    """

    name: str
    reader: str  # "transvg", "refer", "flickr30k_entities", "jsonl" or "shapes"
    splits: tuple[str, ...]
    description: str


_DESCRIPTIONS = {
    "flickr": "Flickr30K Entities (TransVG split file)",
    "referit": "ReferItGame / RefCLEF (TransVG split file)",
    "unc": "RefCOCO, UNC partition (TransVG split file)",
    "unc+": "RefCOCO+, UNC partition (TransVG split file)",
    "gref": "RefCOCOg, Google partition (TransVG split file)",
    "gref_umd": "RefCOCOg, UMD partition (TransVG split file)",
}

#: Every dataset name :func:`load_dataset` accepts.
DATASETS: dict[str, DatasetInfo] = {
    **{n: DatasetInfo(n, "transvg", TRANSVG_SPLITS[n], _DESCRIPTIONS[n]) for n in TRANSVG_CONVENTIONS},
    "refcoco": DatasetInfo("refcoco", "refer", ("train", "val", "testA", "testB"), "RefCOCO (refer API)"),
    "refcoco+": DatasetInfo("refcoco+", "refer", ("train", "val", "testA", "testB"), "RefCOCO+ (refer API)"),
    "refcocog": DatasetInfo("refcocog", "refer", ("train", "val", "test"), "RefCOCOg (refer API)"),
    "refclef": DatasetInfo("refclef", "refer", ("train", "val", "test"), "ReferItGame / RefCLEF (refer API)"),
    "flickr30k_entities": DatasetInfo(
        "flickr30k_entities", "flickr30k_entities", ("train", "val", "test"), "Flickr30K Entities (raw annotations)"
    ),
    "jsonl": DatasetInfo("jsonl", "jsonl", (), "your own JSON Lines file (any split name)"),
    "shapes-ref": DatasetInfo("shapes-ref", "shapes", ("test", "val"), "the shapes world, RefCOCO-like protocol (generated, offline)"),
    "shapes-phrase": DatasetInfo("shapes-phrase", "shapes", ("test", "val"), "the shapes world, Flickr30K-like protocol (generated, offline)"),
}


def load_dataset(
    name: str,
    split: str,
    annotations: Optional[PathLike] = None,
    *,
    image_root: Optional[PathLike] = None,
    split_by: Optional[str] = None,
    query_field: str = "sent",
    box_convention: Optional[str] = None,
    split_file: Optional[PathLike] = None,
) -> list[GroundingSample]:
    """Read one split of a dataset by name.

    Parameters
    ----------
    name
        A key of :data:`DATASETS` (see the module docstring).
    split
        ``val``, ``testA``, ``test``, ...
    annotations
        Where the annotation files are (see the module docstring); required.
    image_root
        When given, :func:`check_images` checks every image of the split exists there.
    split_by
        refer-API partition (``unc``, ``umd``, ``google``, ``berkeley``); by default the
        dataset's usual one (``umd`` for RefCOCOg, ``unc`` otherwise).
    query_field
        refer API: ``"sent"`` or ``"raw"``.
    box_convention
        TransVG files: read the stored boxes in this convention instead of the dataset's.
    split_file
        Flickr30K Entities: the image id list instead of ``<annotations>/<split>.txt``.

    Raises
    ------
    BicmError
        For an unknown name or split, an option that does not apply to the dataset, missing
        or unsafe files, and missing images.
    """
    info = DATASETS.get(name)
    if name == "shapes":
        from ..shapes.dataset import protocol_of

        protocol_of(name)  # says which names replaced it
    if info is None:
        raise BicmError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if info.reader == "shapes":
        from ..shapes.dataset import protocol_of, read_shapes

        samples = read_shapes(annotations, split, protocol_of(name))
        if image_root is not None:
            check_images(samples, image_root)
        return samples
    if annotations is None:
        raise BicmError(f"dataset {name!r} needs annotations= (the folder holding its annotation files)")
    annotations = Path(annotations).expanduser()
    if not annotations.exists():
        raise BicmError(f"annotations {annotations} do not exist")
    _check_applicable(info, split_by=split_by, box_convention=box_convention, split_file=split_file,
                      query_field=query_field if query_field != "sent" else None)

    if info.reader == "transvg":
        path = transvg_file(annotations, name, split)
        if annotations.is_file():
            _check_file_matches(path, name, split)
        if path.exists():
            regular_file(path, "split file")
        if not path.is_file():
            if split not in info.splits:
                raise BicmError(f"unknown split {split!r} for {name!r}; choose one of {', '.join(info.splits)}")
            raise BicmError(f"split file {path} does not exist")
        samples = read_transvg_split(path, name, convention=box_convention)
    elif info.reader == "refer":
        split_by = split_by or REFER_DATASETS[name][0]
        if split_by not in REFER_DATASETS[name]:
            raise BicmError(f"{name!r} has no {split_by!r} partition; choose one of {', '.join(REFER_DATASETS[name])}")
        samples = read_refer(annotations, split, split_by, query_field=query_field)
    elif info.reader == "jsonl":
        if annotations.exists() and not annotations.is_dir():
            regular_file(annotations, "dataset file")
        if not annotations.is_file():
            raise BicmError(f"dataset jsonl needs annotations= the .jsonl file, not {annotations}")
        samples = read_jsonl_dataset(annotations, split)
    else:
        if split_file is None and split not in info.splits:
            raise BicmError(f"unknown split {split!r} for {name!r}; choose one of {', '.join(info.splits)}")
        samples = read_flickr30k_entities(annotations, split, split_file=split_file)

    if image_root is not None:
        check_images(samples, image_root)
    return samples


def _check_file_matches(path: Path, name: str, split: str) -> None:
    """Refuse a split file whose name says it is another dataset or split."""
    try:
        named = parse_split_name(path)
    except BicmError:
        return  # a renamed file: trust the caller
    if named != (name, split):
        raise BicmError(f"{path.name} holds {named[0]} {named[1]}, not {name} {split}")


def _check_applicable(info: DatasetInfo, **given: Any) -> None:
    """Refuse options that would be silently ignored for this dataset's reader."""
    applies = {
        "transvg": {"box_convention"},
        "refer": {"split_by", "query_field"},
        "flickr30k_entities": {"split_file"},
        "jsonl": set(),
        "shapes": set(),
    }[info.reader]
    wrong = sorted(k for k, v in given.items() if v is not None and k not in applies)
    if wrong:
        raise BicmError(f"option {', '.join(wrong)} does not apply to {info.name!r} ({info.description})")
