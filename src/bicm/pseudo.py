"""KAM's pseudo labels (Sec. 3.5): pair unpaired images with queries, ground, keep the sure ones.

1. **Match.** Every image and every query are embedded by CLIP; each image takes the query
   of highest cosine similarity. Queries are streamed in chunks against the image
   embeddings, so memory is ``O(images x E + chunk x images)``, never images x queries.
2. **Ground.** BiCM (QAM+COM+SF by default) grounds each image's query; a pair whose fused
   score ``S_r`` is above ``Thr_k`` (0.9) becomes a pseudo label.
3. **Store.** Every pair goes to ``pairs.jsonl`` (appended image by image, fsynced: a killed
   run resumes where it stopped); the labels to ``labels.jsonl``; the MLP inputs of every
   pair scoring at least ``features_above`` (default ``Thr_k``) to ``kam_features.sqlite``,
   so ``bicm train-kam`` never runs CLIP.

Where ground truth exists (an analysis flag reveals it) the Table 7 report gives, per
threshold, the number of labels and their precision: IoU > 0.5 with a true box of that query
in that image.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torchvision.ops import box_iou

from .api import Grounder, PreparedImage
from .config import BiCMConfig, Needs, config_dict, same_method
from .atomic import atomic_write_text, folder_lock
from .cache import CacheKey, FeatureCache
from .errors import BicmError, warn
from .safeload import json_loads, regular_file
from .evaluate import wilson_interval
from .imageio import load_image
from .jsonl import JsonlAppender, read_jsonl, read_records
from .prefetch import Ahead, ahead, default_depth
from .proposals.sources import ProposalSource
from .runs import ProgressBar, check_run_file, print_note

__all__ = [
    "PseudoRun",
    "TABLE7_THRESHOLDS",
    "best_queries",
    "run_pseudo_label",
    "calibrate_lambda",
    "read_kam_pairs",
    "pair_key",
    "precision_table",
    "table7_markdown",
    "normalize_query",
]

TABLE7_THRESHOLDS = (0.6, 0.7, 0.8, 0.9)
#: Queries encoded (and matched) at once.
QUERY_CHUNK = 4096
#: Images matched against a query chunk in one matrix product. Fixed, so that an image's
#: similarities are computed in the same product (same shape, same rows) by the local engine
#: and by a Ray worker given the same block: a matrix product's rows depend, in their last
#: bits, on the shape of the product they are computed in.
MATCH_BLOCK = 64
Truth = dict[tuple[str, str], list[tuple[float, float, float, float]]]


def normalize_query(query: str) -> str:
    """The form queries are compared in (whitespace collapsed, lower case)."""
    return " ".join(query.split()).lower()


@dataclass
class PseudoRun:
    """What a pseudo-labelling run is: written to ``run.json``; a resumed run must match it."""

    images: str
    queries: str
    n_images: int
    n_queries: int
    proposals: str
    model: str
    config: dict[str, Any]
    thr_k: float
    features_above: float

    def same_work(self, other: "PseudoRun") -> bool:
        mine, theirs = asdict(self), asdict(other)
        # Thr_k only filters, and a --limit run is a prefix of the full one: both may change on resume
        same = all(mine[k] == theirs[k] for k in mine if k not in ("thr_k", "n_images", "config"))
        return same and same_method(self.config, other.config)


def best_queries(
    image_feats: torch.Tensor,
    queries: Sequence[str],
    encode_text: Callable[[Sequence[str]], torch.Tensor],
    chunk: int = QUERY_CHUNK,
    max_block: int = 1 << 24,
    progress: Optional[Callable[[int], None]] = None,
    rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best query of every image by cosine similarity, streaming the queries.

    Parameters
    ----------
    image_feats: ``(N, E)`` L2-normalised image embeddings.
    queries: Q texts; ``encode_text`` maps a list of texts to ``(n, E)`` L2-normalised rows.
    chunk: queries encoded at once; max_block: most similarity entries held at once.
    rows: images per matrix product instead (fixed: the same images give the same bits).

    Returns
    -------
    index: ``(N,)`` long, the best query of each image (the first on ties).
    similarity: ``(N,)`` its cosine similarity.
    """
    n = image_feats.shape[0]
    best = torch.full((n,), float("-inf"))
    index = torch.zeros(n, dtype=torch.long)
    feats = image_feats.float().cpu()
    for start in range(0, len(queries), chunk):
        q = encode_text(list(queries[start : start + chunk])).float().cpu().contiguous()  # (c, E)
        step = rows or max(1, max_block // max(1, q.shape[0]))
        for r in range(0, n, step):
            sims = feats[r : r + step] @ q.T  # (step, c)
            value, where = sims.max(dim=1)
            better = value > best[r : r + step]
            best[r : r + step] = torch.where(better, value, best[r : r + step])
            index[r : r + step] = torch.where(better, where + start, index[r : r + step])
        if progress is not None:
            progress(min(len(queries), start + chunk))
    return index, best


def run_pseudo_label(
    grounder: Grounder,
    images: Sequence[tuple[str, Path]],
    queries: Sequence[str],
    out_dir: Union[str, Path],
    *,
    source: Optional[ProposalSource],
    thr_k: float = 0.9,
    features_above: Optional[float] = None,
    truth: Optional[Truth] = None,
    images_desc: str = "",
    queries_desc: str = "",
    progress: bool = True,
    on_pair: Optional[Callable[[int], None]] = None,
    cluster: Any = None,
) -> dict[str, Any]:
    """Pseudo-label unpaired ``images`` (``(key, path)``) with ``queries``.

    ``grounder.config`` grounds each pair (QAM+COM+SF by default; KAM is never used to make
    its own labels). Writes ``run.json``, ``matches.jsonl``, ``pairs.jsonl``,
    ``labels.jsonl``, ``kam_features.sqlite``, ``summary.json`` and, with ``truth``,
    ``table7.md``. Returns the summary. ``cluster``: a :class:`bicm.cluster.RayEngine` that
    embeds, matches and grounds on a Ray cluster (the same files); ``None``: this process.
    """
    out_dir = Path(out_dir)
    if not images:
        raise BicmError("no images to pseudo-label")
    queries = list(dict.fromkeys(" ".join(q.split()) for q in queries if q.strip()))
    if not queries:
        raise BicmError("no queries to pair the images with")
    features_above = thr_k if features_above is None else features_above
    if features_above > thr_k:
        raise BicmError("--features-above must not exceed --thr-k (the labels need their features)")
    cfg = grounder.config
    if "kam" in cfg.components:
        cfg = cfg.replace(components=tuple(c for c in cfg.components if c != "kam"))
    if "com" not in cfg.components:
        raise BicmError("pseudo labels are chosen among COM's candidates: the components must include com")
    run = PseudoRun(
        images=images_desc,
        queries=queries_desc,
        n_images=len(images),
        n_queries=len(queries),
        proposals="none" if source is None else source.id,
        model=f"{grounder.backbone.name}@{grounder.backbone.fingerprint()}",
        config=config_dict(cfg),
        thr_k=thr_k,
        features_above=features_above,
    )
    with folder_lock(out_dir, "bicm pseudo-label"):  # a second pseudo-label into the same --out is refused
        check_run_file(out_dir, run, kind="pseudo-label")
        matches = _match(grounder, images, queries, out_dir, progress, cluster)

        store = _kam_store(out_dir / "kam_features.sqlite")
        pairs_path = out_dir / "pairs.jsonl"
        try:
            with JsonlAppender(pairs_path, key_field="id") as out:
                todo = [m for m in matches if m["id"] not in out.done]
                if len(todo) < len(matches):
                    print_note(f"resuming: {len(matches) - len(todo)} of {len(matches)} pairs already in {pairs_path}")
                labels = 0
                with ProgressBar(progress, "pseudo-label", len(matches), len(matches) - len(todo)) as bar:
                    prepare = functools.partial(_prepare_pair, grounder, source)
                    grounded = (  # locally: the next pairs' images prepared ahead (bicm.prefetch)
                        (ground_pair(grounder, cfg, match, source, features_above, ready) for match, ready in ahead(todo, prepare, default_depth(grounder.backbone.device)))
                        if cluster is None else cluster.ground_pairs(todo, cfg, features_above)
                    )
                    for count, (record, stored) in enumerate(grounded, start=1):
                        if stored:
                            store.put_many(stored)
                        out.append([record])
                        labels += record.get("score") is not None and record["score"] > thr_k
                        bar.advance(1, f"{labels} labels")
                        if on_pair is not None:
                            on_pair(count)
        finally:
            store.close()
        records = {r["id"]: r for r in read_jsonl(pairs_path)}
        pairs = [records[m["id"]] for m in matches if m["id"] in records]
        labels = [r for r in pairs if r.get("score") is not None and r["score"] > thr_k]
        atomic_write_text(out_dir / "labels.jsonl", "".join(json.dumps(_label(r)) + "\n" for r in labels))
        summary: dict[str, Any] = {
            "images": len(images),
            "queries": len(queries),
            "pairs": len(pairs),
            "errors": sum(1 for r in pairs if r.get("error")),
            "thr_k": thr_k,
            "labels": len(labels),
            "features_above": features_above,
            "model": run.model,
            "proposals": run.proposals,
            "components": list(cfg.components),
        }
        if truth is not None:
            summary["table7"] = precision_table(pairs, truth, sorted(set(TABLE7_THRESHOLDS) | {thr_k}))
            atomic_write_text(out_dir / "table7.md", table7_markdown(summary["table7"], run.model))
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        if summary["errors"]:
            warn(f"{summary['errors']} images could not be read (see 'error' in {pairs_path}); they give no label")
        return summary


def _match(
    grounder: Grounder, images: Sequence[tuple[str, Path]], queries: list[str], out_dir: Path, progress: bool, cluster: Any = None
) -> list[dict]:
    """Stage 1 (cached in ``matches.jsonl``): the best query of every image, here or on ``cluster``
    (image blocks of :data:`MATCH_BLOCK` matched on the workers against query embeddings
    computed once here)."""
    path = out_dir / "matches.jsonl"
    if path.is_file():
        found = list(read_jsonl(path))
        if [m["id"] for m in found] == [key for key, _ in images]:
            return found
    if cluster is None:
        with ProgressBar(progress, "embed images", len(images)) as bar:
            feats, errors = _embed_images(grounder, images, bar.advance)
        if feats is None:
            raise BicmError("none of the images could be read")
        with ProgressBar(progress, "match queries", len(queries)) as bar:
            index, sims = best_queries(feats, queries, grounder.encoder.text, progress=bar.advance_to, rows=MATCH_BLOCK)
        best = list(zip(index.tolist(), sims.tolist()))
    else:
        text = query_embeddings(grounder, queries)
        blocks = [images[i : i + MATCH_BLOCK] for i in range(0, len(images), MATCH_BLOCK)]
        best, errors = [], {}
        with ProgressBar(progress, "embed and match images", len(images)) as bar:
            for found_best, found_errors in cluster.match(blocks, text):
                best += found_best
                errors.update(found_errors)
                bar.advance(len(found_best))
        if len(errors) == len(images):
            raise BicmError("none of the images could be read")
    out = []
    for (key, file), (qi, sim) in zip(images, best):
        if key in errors:
            out.append({"id": key, "image": str(file), "query": None, "similarity": None, "error": errors[key]})
        else:
            out.append({"id": key, "image": str(file), "query": queries[qi], "similarity": round(sim, 6)})
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in out))
    return out


def _embed_images(
    grounder: Grounder, images: Sequence[tuple[str, Path]], tick: Optional[Callable[[], None]] = None
) -> tuple[Optional[torch.Tensor], dict[str, str]]:
    """``(N, E)`` whole-image embeddings (a row of zeros for an unreadable image: rows stay
    where their images are) and the errors by key; ``None`` when no image could be read."""
    spec = grounder.backbone.spec
    rows: list[Optional[torch.Tensor]] = []
    errors: dict[str, str] = {}
    for key, file in images:
        try:
            pil = load_image(file, exif_transpose=False)
            rows.append(grounder.encoder.image(pil, spec).float().cpu())
        except BicmError as exc:  # one bad image must not end the run
            errors[key] = str(exc)
            rows.append(None)
        if tick is not None:
            tick()
    read = [r for r in rows if r is not None]
    if not read:
        return None, errors
    return torch.stack([torch.zeros_like(read[0]) if r is None else r for r in rows]), errors


def query_embeddings(grounder: Grounder, queries: Sequence[str], chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """``(Q, E)`` float32 embeddings of the queries, encoded in the chunks :func:`best_queries`
    encodes them in (so they are the same bits)."""
    return torch.cat([grounder.encoder.text(list(queries[s : s + chunk])).float().cpu() for s in range(0, len(queries), chunk)])


def embed_and_match(
    grounder: Grounder, block: Sequence[tuple[str, Path]], text: torch.Tensor
) -> tuple[list[tuple[int, float]], dict[str, str]]:
    """A Ray worker's part of stage 1: the best query (index, similarity) of each image of
    ``block`` (at most :data:`MATCH_BLOCK` images, one matrix product per query chunk, as the
    local engine computes it) against the query embeddings ``text``, and the errors by key."""
    feats, errors = _embed_images(grounder, block)
    if feats is None:
        return [(0, 0.0)] * len(block), errors
    index, sims = best_queries(feats, range(len(text)), lambda ids: text[ids[0] : ids[-1] + 1].clone(), rows=len(block))
    return list(zip(index.tolist(), sims.tolist())), errors


def calibrate_lambda(
    grounder: Grounder,
    images: Sequence[tuple[str, Path]],
    queries: Sequence[str],
    out_dir: Union[str, Path],
    *,
    source: Optional[ProposalSource],
    progress: bool = True,
) -> dict[str, Any]:
    """``lambda_t`` by the paper's rule, from unlabelled images and queries (no truth).

    Each image is paired with its most similar query (as KAM pairs them, cached in
    ``out_dir/matches.jsonl``) and grounded with QAM+COM+SF; the candidates' ``S_BU`` and raw
    ``S_TD`` give ``lambda_t = 10 ** round(log10(median |S_BU| / median |S_TD|))``
    (:func:`bicm.fusion.calibrate_lambda_t`). Writes ``out_dir/lambda_t.json`` and returns it.
    """
    from .fusion import calibrate_lambda_t

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = list(dict.fromkeys(" ".join(q.split()) for q in queries if q.strip()))
    if not images or not queries:
        raise BicmError("calibrating lambda_t needs images and queries")
    cfg = grounder.config.replace(components=("qam", "com", "sf"), td_scale="raw", selection="argmax")
    matches = _match(grounder, images, queries, out_dir, progress)
    bu, td = [], []
    with ProgressBar(progress, "calibrate", len(matches)) as bar:
        for match in matches:
            bar.advance()
            if match.get("error"):
                continue
            pil = load_image(match["image"], exif_transpose=False)
            result = grounder.score(grounder.extract(pil, [match["query"]], source, image_key=match["id"]), cfg)[0]
            c = result.candidates
            if result.box is None or c.s_td is None or c.s_pq is None:
                continue
            bu.append(c.s_pq + (c.s_cq if c.s_cq is not None else 0))
            td.append(c.s_td)
    if not bu:
        raise BicmError("no image gave candidates to calibrate on")
    s_bu, s_td = torch.cat(bu), torch.cat(td)
    summary = {
        "lambda_t": calibrate_lambda_t(s_bu, s_td),
        "rule": "10 ** round(log10(median |S_BU| / median |S_TD|)) over the candidates of unlabelled image-query pairs",
        "median_abs_s_bu": float(s_bu.abs().median()),
        "median_abs_s_td": float(s_td.abs().median()),
        "pairs": len(bu),
        "candidates": int(s_bu.numel()),
        "model": f"{grounder.backbone.name}@{grounder.backbone.fingerprint()}",
        "proposals": "none" if source is None else source.id,
    }
    atomic_write_text(out_dir / "lambda_t.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _prepare_pair(grounder: Grounder, source: Optional[ProposalSource], match: dict, crops: bool = True) -> Optional[PreparedImage]:
    """A pair's image work before its CLIP forwards. Run ahead by :func:`bicm.prefetch.ahead`,
    it cuts the crops too; inline (``crops=False``) the encoder cuts them, pipelined."""
    if match.get("error"):
        return None
    pil = load_image(match["image"], exif_transpose=False)
    return grounder.prepare(pil, source, image_key=match["id"], needs=grounder.config.needs() | Needs(kam=True), crops=crops)


def ground_pair(
    grounder: Grounder,
    cfg: BiCMConfig,
    match: dict,
    source: Optional[ProposalSource],
    features_above: float,
    ready: Optional[Ahead[Optional[PreparedImage]]] = None,
) -> tuple[dict[str, Any], Optional[dict[CacheKey, Any]]]:
    """Stage 2 for one pair: its ``pairs.jsonl`` record, and the KAM inputs to store (for a
    score of at least ``features_above``; else ``None``). ``ready``: its image prepared ahead."""
    record: dict[str, Any] = {"id": match["id"], "image": match["image"], "query": match["query"], "similarity": match["similarity"]}
    if match.get("error"):
        return {**record, "box": None, "score": None, "error": match["error"]}, None
    try:
        image: Any = ready.get() if ready is not None else _prepare_pair(grounder, source, match, crops=False)
        features = grounder.extract(image, [match["query"]], image_key=match["id"], needs=grounder.config.needs() | Needs(kam=True))
    except BicmError as exc:
        return {**record, "box": None, "score": None, "error": str(exc)}, None
    result = grounder.score(features, cfg)[0]
    if result.box is None:
        return {**record, "box": None, "score": None, "candidates": 0}, None
    c = result.candidates
    chosen = result.selected[0]
    components = {k: None if getattr(c, k) is None else round(float(getattr(c, k)[chosen]), 6) for k in ("s_pq", "s_cq", "s_td")}
    record.update(
        box=[round(v, 2) for v in result.box],
        score=round(float(result.score), 6),
        selected=result.selected,
        from_qam=chosen == c.qam_index,
        components=components,
        candidates=len(c),
    )
    if result.score is not None and result.score >= features_above:
        fp, fc = grounder.candidate_features(features, 0, cfg)
        assert features.image_feat is not None
        tensors = {"fi": features.image_feat.cpu(), "fq": features.text[0].cpu(), "fp": fp.half().cpu(), "boxes": c.boxes}
        if fc is not None:
            tensors["fc"] = fc.half().cpu()
        record["features"] = True
        return record, {pair_key(match["id"]): (tensors, {"target": result.selected, "score": float(result.score)})}
    return record, None


def pair_key(pair_id: str) -> CacheKey:
    """The key of a pair's MLP inputs in ``kam_features.sqlite``."""
    return CacheKey("pair", "", None, str(pair_id))


def _kam_store(path: Path) -> FeatureCache:
    """A run's ``kam_features.sqlite``; one written by an older bicm is refused (its features
    cannot be recomputed without running CLIP again), not emptied."""
    try:
        return FeatureCache(path, rebuild_old=False)
    except BicmError as exc:
        raise BicmError(f"{exc}; run 'bicm pseudo-label' again with another --out") from None


def _label(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "image", "query", "box", "score", "similarity", "components", "from_qam")
    return {k: record.get(k) for k in keys}


def read_kam_pairs(run_dir: Union[str, Path], thr_k: Optional[float] = None) -> tuple[list, dict[str, Any]]:
    """The stored MLP inputs of a pseudo-label run's labels (score > ``thr_k``, default the run's).

    Returns ``(pairs, run)``: :class:`~bicm.kam.KamPair` list and the run's ``run.json``.
    """
    from .kam import KamPair

    run_dir = Path(run_dir)
    run_file, pairs_file, store_file = run_dir / "run.json", run_dir / "pairs.jsonl", run_dir / "kam_features.sqlite"
    if not (run_file.is_file() and pairs_file.is_file() and store_file.is_file()):
        raise BicmError(f"{run_dir} is not a finished 'bicm pseudo-label' folder (run.json, pairs.jsonl, kam_features.sqlite)")
    run = json_loads(run_file.read_text(), run_file)
    thr_k = run["thr_k"] if thr_k is None else thr_k
    if thr_k < run["features_above"]:
        raise BicmError(
            f"features were stored for scores >= {run['features_above']}; --thr-k {thr_k} needs a pseudo-label run "
            f"with --features-above {thr_k} or lower"
        )
    wanted = [r for r in read_jsonl(pairs_file) if r.get("score") is not None and r["score"] > thr_k]
    store = _kam_store(store_file)
    try:
        found = store.get_many([pair_key(r["id"]) for r in wanted])
    finally:
        store.close()
    pairs, missing = [], 0
    for r in wanted:
        entry = found.get(pair_key(r["id"]))
        if entry is None:
            missing += 1
            continue
        t, meta = entry
        pairs.append(KamPair(t["fi"], t["fq"], t["fp"], t.get("fc"), list(meta["target"])))
    if missing:
        warn(f"{missing} labels have no stored features (a damaged store?); trained without them")
    return pairs, run


def precision_table(pairs: Sequence[dict[str, Any]], truth: Truth, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Table 7: per threshold, the labels (score > t) and their precision against ``truth``."""
    correct = {r["id"]: _correct(r, truth) for r in pairs if r.get("score") is not None}
    rows = []
    for t in [float("-inf"), *thresholds]:
        chosen = [r["id"] for r in pairs if r.get("score") is not None and r["score"] > t]
        k = sum(correct[i] for i in chosen)
        lo, hi = wilson_interval(k, len(chosen))
        rows.append({"thr_k": None if t == float("-inf") else t, "labels": len(chosen), "correct": k,
                     "precision": k / len(chosen) if chosen else None, "ci_low": lo, "ci_high": hi})
    return rows


def _correct(record: dict[str, Any], truth: Truth) -> bool:
    boxes = truth.get((record["id"], normalize_query(record["query"])), [])
    if not boxes or record.get("box") is None:
        return False
    return bool((box_iou(torch.tensor([record["box"]]), torch.tensor(boxes, dtype=torch.float32)) > 0.5).any())


def table7_markdown(rows: Sequence[dict[str, Any]], model: str) -> str:
    lines = [
        f"Pseudo labels by threshold (Table 7; model `{model}`): precision = IoU > 0.5 with a true box of the query",
        "",
        "| Thr_k | labels | correct | precision (%) | 95% CI |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        name = "all pairs" if row["thr_k"] is None else f"{row['thr_k']:g}"
        p = "" if row["precision"] is None else f"{100 * row['precision']:.1f}"
        lines.append(f"| {name} | {row['labels']} | {row['correct']} | {p} | {100 * row['ci_low']:.1f}-{100 * row['ci_high']:.1f} |")
    return "\n".join(lines) + "\n"


def iter_image_files(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (sorted, recursive)."""
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
    return iter(sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()))


# --------------------------------------------------------------------------------------
# Inputs: files, folders, or a dataset's training split taken apart
# --------------------------------------------------------------------------------------
@dataclass
class UnpairedData:
    """Images and queries without correspondences (and, for analysis only, the truth)."""

    images: list[tuple[str, Path]]
    queries: list[str]
    truth: Optional[Truth]
    images_desc: str
    queries_desc: str


def read_image_list(path: Path) -> list[tuple[str, Path]]:
    """Images from a folder, a text file (one path per line) or JSON Lines (``"image"``).

    Relative paths in a list are relative to the list's folder. Keys are the paths as
    written (or relative to the folder).
    """
    if path.is_dir():
        return [(str(p.relative_to(path)), p) for p in iter_image_files(path)]
    regular_file(path, "image list", missing=f"image list {path} does not exist")
    out = []
    for number, entry in enumerate(_list_entries(path, "image"), start=1):
        file = Path(entry)
        out.append((entry, file if file.is_absolute() else path.parent / file))
    if not out:
        raise BicmError(f"{path} lists no images")
    return out


def read_query_list(path: Path) -> list[str]:
    """Queries from a text file (one per line) or JSON Lines (``"query"``)."""
    regular_file(path, "query list", missing=f"query list {path} does not exist")
    queries = list(_list_entries(path, "query"))
    if not queries:
        raise BicmError(f"{path} lists no queries")
    return queries


def _list_entries(path: Path, field_name: str) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        # a list the user wrote: a last line without its newline is a query too
        for number, record in read_jsonl(path, drop_cut_tail=False, numbered=True):
            value = record.get(field_name)
            if not isinstance(value, str) or not value.strip():
                raise BicmError(f"{path} line {number} has no {field_name!r} text")
            yield value
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BicmError(f"{path} is not UTF-8 text") from None
    for line in text.splitlines():
        if line.strip():
            yield line.strip()


def truth_from_records(records: Sequence[dict[str, Any]]) -> Truth:
    """``(image key, normalised query) -> true boxes`` from records with image, query, box."""
    truth: Truth = {}
    for r in records:
        truth.setdefault((r["image"], normalize_query(r["query"])), []).append(tuple(r["box"]))  # type: ignore[arg-type]
    return truth


def shapes_unpaired(root: Union[str, Path, None], dataset: str, reveal_truth: bool, limit: Optional[int] = None) -> UnpairedData:
    """A shapes protocol's unpaired train split, as the paper's: the images of the train
    scenes and the queries of the SAME scenes, with the pairing dropped (the truth is read only
    for ``reveal_truth``, Table 7)."""
    from .shapes.dataset import protocol_of, shapes_folder

    from .shapes.dataset import TRAIN_FIELDS

    folder = shapes_folder(root, protocol_of(dataset), "train")

    def records(name: str) -> list[dict[str, Any]]:
        return [r for _, r in read_records(folder / name, TRAIN_FIELDS[name])]

    images = [(r["image"], folder / r["image"]) for r in records("train_images.jsonl")]
    queries = list(dict.fromkeys(r["query"] for r in records("train_queries.jsonl")))
    if limit is not None:
        images = images[:limit]
    truth = truth_from_records(records("train_truth.jsonl")) if reveal_truth else None
    return UnpairedData(images, queries, truth, f"{dataset} train images ({folder})", f"{dataset} train queries ({folder})")


def dataset_unpaired(samples: Sequence[Any], image_root: Path, name: str, reveal_truth: bool) -> UnpairedData:
    """A paired dataset split taken apart: its images, and its queries with the pairing dropped."""
    images = list(dict.fromkeys(s.image_file for s in samples))
    queries = list(dict.fromkeys(s.query for s in samples))
    truth = None
    if reveal_truth:
        truth = {}
        for s in samples:
            truth.setdefault((s.image_file, normalize_query(s.query)), []).append(tuple(s.box))
    return UnpairedData([(i, image_root / i) for i in images], queries, truth, f"{name} images", f"{name} queries")
