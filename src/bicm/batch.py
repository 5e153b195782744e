"""Batch grounding of your own images: ``bicm ground --input ITEMS --out DIR``.

No ground truth is needed. The items are either

- a JSON Lines file, one image per line: ``{"image": "a.jpg", "queries": ["the dog", "a red ball"]}``
  or ``{"image": "a.jpg", "query": "the dog"}``; image paths are relative to the file; or
- a folder of images together with a text file of queries (one per line, blank lines
  skipped): every query is grounded in every image.

Every item is checked before any work starts (:func:`read_items`): a malformed line, a
missing image or an empty query is one :class:`~bicm.errors.BicmError` naming the line.

The run folder holds ``run.json`` (what the run is) and ``results.jsonl``: one record per
(image, query), the fields of ``bicm ground --json`` (``image``, ``query``, ``box``,
``score``, ``qam_box``, ``notes``, the candidates...) plus ``id`` (``"LINE:K"``, the K-th
query of the item on line LINE) and ``item`` (LINE). An image's queries share all its
per-image work, and the image's records are appended together (fsynced, Ctrl-C deferred), so
a killed run started again computes only the images it lacks and ends with the same lines,
none twice. With ``formats=("jsonl", "coco")`` a COCO-style file is written beside it
(:func:`write_coco`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from .atomic import atomic_write_text, folder_lock
from .errors import BicmError, warn
from .interrupt import deferred
from .jsonl import JsonlAppender, finite, finite_json, read_jsonl
from .provenance import versions
from .runs import ProgressBar, check_run_file, kept_on_interrupt, print_note
from .safeload import json_loads, regular_file

if TYPE_CHECKING:  # pragma: no cover
    from .api import Grounder, PreparedImage
    from .prefetch import Ahead

__all__ = ["BatchItem", "BatchRun", "read_items", "run_batch", "ground_item", "write_coco", "RESULTS", "COCO_RESULTS"]

#: The records file and the COCO-style file of a run folder.
RESULTS = "results.jsonl"
COCO_RESULTS = "results.coco.json"

#: Longest query accepted (characters); CLIP reads at most 77 tokens in any case.
MAX_QUERY_CHARS = 2000


@dataclass(frozen=True)
class BatchItem:
    """One image and its queries.

    Attributes
    ----------
    line: 1-based line of the items file (for a folder: the image's place in name order).
    image: the image's name as the input gives it (relative to the items file or folder);
        it is the ``image`` of the records and the key file-based proposal sources look up.
    path: where the image is read from.
    queries: the phrases, in order (at least one).
    """

    line: int
    image: str
    path: Path
    queries: tuple[str, ...]

    def ids(self) -> list[str]:
        """The records' ids, one per query: ``"LINE:K"``."""
        return [f"{self.line}:{k}" for k in range(len(self.queries))]


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _check_query(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BicmError(f"{where}: a query must be a string, not {type(value).__name__}")
    if not value.strip():
        raise BicmError(f"{where}: empty query")
    if len(value) > MAX_QUERY_CHARS:
        raise BicmError(f"{where}: a query of {len(value):,} characters (at most {MAX_QUERY_CHARS:,})")
    return value


def _check_image(path: Path, where: str) -> Path:
    try:
        return regular_file(path, "image", missing=f"{where}: image {path} does not exist")
    except BicmError as exc:
        text = str(exc)
        raise BicmError(text if text.startswith(where) else f"{where}: {text}") from None


def _items_from_jsonl(path: Path) -> list[BatchItem]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc.strerror or exc}") from None
    root = path.parent
    items: list[BatchItem] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path} line {number}"
        if not raw.strip():
            continue
        try:
            record = json_loads(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            raise BicmError(f"{where} is not UTF-8 text") from None
        except json.JSONDecodeError:
            raise BicmError(f"{where} is not valid JSON (a line cut short, or not JSON Lines?)") from None
        if not isinstance(record, dict):
            raise BicmError(f'{where} is not a JSON object like {{"image": "a.jpg", "queries": ["the dog"]}}')
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise BicmError(f'{where} has no "image" (a path relative to {path.name})')
        if ("query" in record) == ("queries" in record):
            raise BicmError(f'{where} needs one of "query" (a string) or "queries" (a list of strings)')
        if "query" in record:
            queries = [_check_query(record["query"], where)]
        else:
            listed = record["queries"]
            if not isinstance(listed, list) or not listed:
                raise BicmError(f'{where}: "queries" must be a non-empty list of strings')
            queries = [_check_query(q, where) for q in listed]
        items.append(BatchItem(number, image, _check_image(root / image, where), tuple(queries)))
    if not items:
        raise BicmError(f"{path} holds no items")
    return items


def _queries_from_file(path: Path) -> list[str]:
    regular_file(path, "queries file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BicmError(f"queries file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise BicmError(f"cannot read {path}: {exc.strerror or exc}") from None
    queries = [_check_query(line.strip(), f"{path} line {n}") for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not queries:
        raise BicmError(f"queries file {path} holds no queries (one per line)")
    return queries


def _items_from_folder(folder: Path, queries_file: Path) -> list[BatchItem]:
    queries = tuple(_queries_from_file(queries_file))
    suffixes = _image_suffixes()
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
    except OSError as exc:
        raise BicmError(f"cannot list {folder}: {exc.strerror or exc}") from None
    items = [BatchItem(n, name, _check_image(folder / name, f"{folder}/{name}"), queries) for n, name in enumerate(names, start=1)]
    if not items:
        raise BicmError(f"{folder} holds no images (files ending in .jpg, .png, ...)")
    return items


def read_items(source: Path, queries: Optional[Path] = None) -> list[BatchItem]:
    """The items of a JSON Lines file, or of a folder of images with a ``queries`` file, all
    checked (every image a regular file, every query a non-empty string) before any work.

    Raises
    ------
    BicmError
        One line naming the file and line: e.g. ``"items.jsonl line 3: image b.jpg does not
        exist"`` or ``"items.jsonl line 2: empty query"``.
    """
    source = Path(source)
    if source.is_dir():
        if queries is None:
            raise BicmError(f"--input {source} is a folder of images: give the phrases with --queries FILE (one per line)")
        return _items_from_folder(source, Path(queries))
    if queries is not None:
        raise BicmError("--queries goes with a folder of images; a JSON Lines --input names its queries on each line")
    regular_file(source, "items file", missing=f"items file {source} does not exist")
    return _items_from_jsonl(source)


def items_digest(items: Sequence[BatchItem]) -> str:
    """A hash of the items (names and queries, in order): a resumed run must have the same."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.line, item.image, list(item.queries)]).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


@dataclass
class BatchRun:
    """What a batch run is: written to ``run.json``; a resumed run must match it."""

    input: str
    items: str
    proposals: str
    model: str
    config: dict[str, Any]
    kam: Optional[str] = None
    versions: Optional[dict[str, str]] = None
    kind: str = "ground"

    def same_work(self, other: "BatchRun") -> bool:
        from .config import same_method

        mine, theirs = asdict(self), asdict(other)
        same = all(mine[k] == theirs[k] for k in ("items", "proposals", "model", "kam", "kind"))
        return same and same_method(self.config, other.config)


def _prepare(grounder: "Grounder", max_pixels: Optional[int], item: BatchItem) -> "PreparedImage":
    """An item's image work before its CLIP forwards, done ahead on a GPU (:mod:`bicm.prefetch`)."""
    from .imageio import load_image

    return grounder.prepare(load_image(item.path, max_pixels=max_pixels), image_key=item.image, crops=True)


def ground_item(
    grounder: "Grounder", item: BatchItem, ready: Optional["Ahead[PreparedImage]"] = None, max_pixels: Optional[int] = None
) -> list[dict[str, Any]]:
    """The result records of one item: its image's work once, shared by all its queries.

    An image that cannot be read or grounded gives one record per query with ``error`` (and
    ``box`` None), so that one bad file does not end a long run.
    """
    from .imageio import DEFAULT_MAX_PIXELS, load_image

    try:
        if ready is not None:
            image: Any = ready.get()
        else:
            image = load_image(item.path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        chunks = grounder.iter_extract(image, list(item.queries), image_key=item.image)
        results = [result for inputs in chunks for result in grounder.score(inputs)]
    except BicmError as exc:
        return [
            {"id": key, "item": item.line, "image": item.image, "query": query, "box": None, "score": None, "error": str(exc)}
            for key, query in zip(item.ids(), item.queries)
        ]
    return [{"id": key, "item": item.line, "image": item.image, **r.to_dict()} for key, r in zip(item.ids(), results)]


def run_batch(
    grounder: "Grounder",
    items: Sequence[BatchItem],
    out_dir: Path,
    *,
    input_name: str = "",
    formats: Sequence[str] = ("jsonl",),
    progress: bool = True,
    prefetch: Optional[int] = None,
    max_pixels: Optional[int] = None,
    cluster: Any = None,
    on_item: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """Ground every item into ``out_dir`` (resumable); returns counts and the files written.

    Parameters
    ----------
    formats: ``"jsonl"`` (always written) and ``"coco"`` (:func:`write_coco`, at the end).
    prefetch: images decoded and proposed ahead on a background thread (default: by the
        model's device, :func:`bicm.prefetch.default_depth`; the same results either way).
    cluster: a :class:`bicm.cluster.RayEngine`: the items are grounded by its actors.
    on_item: called with the number of items finished in this call (tests use it).
    """
    from .imageio import DEFAULT_MAX_PIXELS
    from .prefetch import ahead, default_depth

    unknown = sorted(set(formats) - {"jsonl", "coco"})
    if unknown:
        raise BicmError(f"unknown output format {unknown[0]!r}; use jsonl or coco")
    out_dir = Path(out_dir)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    source = grounder.proposals
    run = BatchRun(
        input=input_name,
        items=items_digest(items),
        proposals="none" if source is None else source.id,
        model=f"{grounder.backbone.name}@{grounder.backbone.fingerprint()}",
        config=_config(grounder),
        kam=None if grounder.kam is None else grounder.kam.fingerprint(),
        versions=versions(),
    )
    total = sum(len(item.queries) for item in items)
    results_path = out_dir / RESULTS
    errors = 0
    with folder_lock(out_dir, "bicm ground"):
        check_run_file(out_dir, run, kind="ground")
        with JsonlAppender(results_path, key_field="id") as out:
            # an item is computed with all its queries or not at all (they share batches): a
            # half-written one is computed again and only its missing records are written
            todo = [item for item in items if any(key not in out.done for key in item.ids())]
            kept = total - sum(1 for item in todo for key in item.ids() if key not in out.done)
            if kept:
                print_note(f"resuming: {kept} of {total} results already in {results_path}")
            with ProgressBar(progress, "ground", total, kept) as bar, kept_on_interrupt(out, total, "results"):
                if cluster is None:
                    depth = default_depth(grounder.backbone.device) if prefetch is None else prefetch
                    prepare = functools.partial(_prepare, grounder, max_pixels)
                    computed: Iterator[list[dict[str, Any]]] = (
                        ground_item(grounder, item, ready, max_pixels) for item, ready in ahead(todo, prepare, depth)
                    )
                else:
                    computed = cluster.ground_items(todo, max_pixels)
                for index, records in enumerate(computed):
                    records = [r for r in records if str(r["id"]) not in out.done]
                    errors += sum(1 for r in records if r.get("error"))
                    with deferred():  # Ctrl-C never cuts an item's records in half
                        out.append(records)
                    bar.advance(len(records))
                    if on_item is not None:
                        on_item(index + 1)
    order = {key: n for n, key in enumerate(key for item in items for key in item.ids())}
    records = sorted((r for r in read_jsonl(results_path) if r["id"] in order), key=lambda r: order[r["id"]])
    written = [RESULTS]
    if "coco" in formats:
        write_coco(records, out_dir / COCO_RESULTS)
        written.append(COCO_RESULTS)
    if errors:
        warn(f"{errors} queries could not be grounded (their image failed; see 'error' in {results_path})")
    found = sum(1 for r in records if r.get("box") is not None)
    return {"results": len(records), "boxes": found, "errors": sum(1 for r in records if r.get("error")), "files": written}


def _config(grounder: "Grounder") -> dict[str, Any]:
    from .config import config_dict

    return config_dict(grounder.config)


def write_coco(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """A COCO-style results file of batch records, written atomically.

    ``images``: one per distinct image name (``id`` from 1, ``file_name``, ``width``,
    ``height``); ``categories``: one per distinct query text (the query IS the category, as in
    open-vocabulary detection outputs); ``annotations``: one per query that found a box, with
    ``bbox`` in COCO's ``[x, y, width, height]`` (pixels of the original image), ``area``,
    ``score``, ``query`` and ``iscrowd`` 0. Queries without a box (an unreadable image, nothing
    to choose from) have no annotation.
    """
    images: dict[str, dict[str, Any]] = {}
    categories: dict[str, int] = {}
    annotations = []
    for record in records:
        name = str(record["image"])
        if name not in images:
            size = record.get("image_size") or [None, None]
            images[name] = {"id": len(images) + 1, "file_name": name, "width": size[0], "height": size[1]}
        query = str(record["query"])
        category = categories.setdefault(query, len(categories) + 1)
        box = record.get("box")
        if box is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        annotations.append({
            "id": len(annotations) + 1, "image_id": images[name]["id"], "category_id": category,
            "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
            "score": record.get("score"), "query": query, "iscrowd": 0,
        })
    document = {
        "info": {"description": "bicm ground --input: one annotation per (image, query) that found a box", "versions": versions()},
        "images": list(images.values()),
        "categories": [{"id": i, "name": q} for q, i in categories.items()],
        "annotations": annotations,
    }
    atomic_write_text(path, finite_json(finite(document), indent=1) + "\n")
    return path
