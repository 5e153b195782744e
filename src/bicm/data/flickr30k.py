"""Reader for raw Flickr30K Entities (BryanPlummer/flickr30k_entities).

Layout of the annotation folder::

    Annotations/<image id>.xml    PASCAL-VOC-like boxes, one <object> per box, named by entity ids
    Sentences/<image id>.txt      five captions, phrases marked "[/EN#18/people A group of people]"
    train.txt val.txt test.txt    image ids of each split, one per line

An ``<object>`` may carry several ``<name>`` elements (one box shared by several entities);
one without a ``<bndbox>`` flags its entities with ``<nobndbox>`` or ``<scene>``. Coordinates
are 1-based with the last pixel included (the official ``get_annotations`` subtracts 1 from
each because "matlab indexing is 1-based"); they become bicm's exclusive-edge ``xyxy`` as
``(xmin - 1, ymin - 1, xmax, ymax)``, like the ``flickr`` TransVG files
(:mod:`bicm.data.transvg` gives the evidence).

One sample per phrase occurrence whose entity has at least one box (the protocol behind the
14,481 test phrases): ``boxes`` are the entity's boxes, ``box`` their union, as in the paper.
Phrases without a box (scene, not visible, non-visual ``EN#0``) are skipped and counted in a
warning. The query is the phrase as written in the caption ("A group of people"); the
TransVG files instead hold it with stop words removed ("group people").
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import BicmError, warn
from ..safeload import regular_file
from .sample import Box, GroundingSample, is_proper_box, missing_report, to_xyxy

__all__ = [
    "FlickrAnnotation",
    "FlickrPhrase",
    "parse_annotation_xml",
    "parse_sentence",
    "read_flickr30k_entities",
    "read_split_ids",
]

PathLike = Union[str, Path]

# "[/EN#18/people A group of people]" -> entity id "18", types "/people", text "A group of people"
_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]*)*)\s+([^\]]*)\]")


@dataclass(frozen=True)
class FlickrPhrase:
    """One marked phrase of a caption: entity id, types (``("people",)``) and text."""

    entity_id: str
    types: tuple[str, ...]
    text: str


@dataclass
class FlickrAnnotation:
    """Boxes of one image: entity id -> its boxes (bicm ``xyxy``), and the flagged entities."""

    width: Optional[int] = None
    height: Optional[int] = None
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    scene: set[str] = field(default_factory=set)
    no_box: set[str] = field(default_factory=set)


def parse_sentence(line: str) -> list[FlickrPhrase]:
    """The marked phrases of one caption line, in order.

    >>> [(p.entity_id, p.types, p.text) for p in parse_sentence(
    ...     "[/EN#18/people A group of people] stand in front of [/EN#19/other an igloo] .")]
    [('18', ('people',), 'A group of people'), ('19', ('other',), 'an igloo')]
    """
    return [
        FlickrPhrase(m.group(1), tuple(t for t in m.group(2).split("/") if t), " ".join(m.group(3).split()))
        for m in _PHRASE.finditer(line)
    ]


def parse_annotation_xml(path: PathLike) -> FlickrAnnotation:
    """Read ``Annotations/<id>.xml``.

    Documents with a DTD or entity declarations are refused (annotations never need them;
    this keeps entity expansion and external entities out).

    Raises
    ------
    BicmError
        When the file is missing, not XML, or holds a box that is not four numbers.
    """
    path = regular_file(path, "annotation file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BicmError(f"{path}: refusing an annotation file with a DTD or entity declarations")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise BicmError(f"{path} is not valid XML ({exc})") from None

    ann = FlickrAnnotation(
        width=_int_or_none(root.findtext("size/width")), height=_int_or_none(root.findtext("size/height"))
    )
    for obj in root.iter("object"):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        bndbox = obj.find("bndbox")
        if bndbox is not None:
            values = [bndbox.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
            if any(v is None for v in values):
                raise BicmError(f"{path}: a <bndbox> lacks one of xmin, ymin, xmax, ymax")
            box = to_xyxy(values, "xyxy_inclusive_1based")  # type: ignore[arg-type]
            for name in names:
                ann.boxes.setdefault(name, []).append(box)
        else:
            if _int_or_none(obj.findtext("nobndbox")):
                ann.no_box.update(names)
            if _int_or_none(obj.findtext("scene")):
                ann.scene.update(names)
    return ann


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(float(text)) if text is not None and text.strip() else None
    except ValueError:
        return None


def read_split_ids(path: PathLike) -> list[str]:
    """Image ids of a split list (``test.txt``): one per line, blank lines ignored, order kept."""
    path = Path(path).expanduser()
    regular_file(path, "split list", missing=f"split list {path} does not exist")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise BicmError(f"split list {path} is empty")
    return list(dict.fromkeys(ids))


def read_flickr30k_entities(
    folder: PathLike,
    split: Optional[str] = None,
    *,
    split_file: Optional[PathLike] = None,
    image_ids: Optional[Sequence[str]] = None,
) -> list[GroundingSample]:
    """Read raw Flickr30K Entities annotations for a list of images.

    Parameters
    ----------
    folder
        Folder with ``Annotations/`` and ``Sentences/`` (and the split lists).
    split
        ``train``, ``val`` or ``test``: the ids of ``folder / f"{split}.txt"``.
    split_file
        A split list elsewhere (overrides ``split``).
    image_ids
        The ids themselves (overrides both).

    Returns
    -------
    One :class:`GroundingSample` per phrase occurrence with at least one box, ordered by image
    (split order), caption and phrase; ``sample_id`` = ``"<image id>:<caption>:<phrase>"``
    (indices count every marked phrase, so they do not move when boxes change), ``image_file``
    = ``"<image id>.jpg"``.

    Raises
    ------
    BicmError
        When the folder or a split list is missing, or annotation/sentence files of some images
        are missing (with the count and the first five).
    """
    folder = Path(folder).expanduser()
    if image_ids is None:
        if split_file is None:
            if split is None:
                raise BicmError("read_flickr30k_entities needs split=, split_file= or image_ids=")
            split_file = folder / f"{split}.txt"
        image_ids = read_split_ids(split_file)
    for sub in ("Annotations", "Sentences"):
        if not (folder / sub).is_dir():
            raise BicmError(f"{folder} is not a Flickr30K Entities folder: {sub}/ is missing")
    for sub, ext in (("Annotations", "xml"), ("Sentences", "txt")):
        missing = [f"{i}.{ext}" for i in image_ids if not (folder / sub / f"{i}.{ext}").is_file()]
        if missing:
            raise BicmError(missing_report(missing, len(image_ids), f"{sub.lower()} files", folder / sub))

    samples: list[GroundingSample] = []
    skipped = degenerate = 0
    for image_id in image_ids:
        ann = parse_annotation_xml(folder / "Annotations" / f"{image_id}.xml")
        lines = regular_file(folder / "Sentences" / f"{image_id}.txt", "sentences file").read_text(encoding="utf-8").splitlines()
        for s_idx, line in enumerate(lines):
            for p_idx, phrase in enumerate(parse_sentence(line)):
                boxes = ann.boxes.get(phrase.entity_id)
                if not boxes or not phrase.text:
                    skipped += 1
                    continue
                if not all(is_proper_box(b) for b in boxes):
                    degenerate += 1
                    continue
                sample_id = f"{image_id}:{s_idx}:{p_idx}"
                samples.append(GroundingSample.from_boxes(sample_id, image_id, f"{image_id}.jpg", phrase.text, boxes))
    if skipped:
        warn(f"Flickr30K Entities: skipped {skipped} phrases without a box (scene, not visible or non-visual)")
    if degenerate:
        warn(f"Flickr30K Entities: skipped {degenerate} phrases with a degenerate box (x2 <= x1 or y2 <= y1)")
    return samples
