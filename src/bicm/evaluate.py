"""Evaluation: Acc@0.5 of the paper's ablation rows from one pass over a dataset.

A run works image by image: the per-image features (proposals, crop and class-name
embeddings, query-aware and vanilla maps, QAM boxes) are extracted ONCE
(:meth:`bicm.api.Grounder.extract`) and every ablation row only re-scores them
(:meth:`bicm.api.Grounder.score`). Predictions are appended to ``predictions.jsonl`` one
image at a time (fsynced), so a killed run resumes where it stopped when the same command
runs again; the summary is computed from that file, so an interrupted and resumed run gives
the same numbers as an uninterrupted one.

Rows (named as in the paper):

* ``table4``: QAM, COM, QAM+COM, QAM+COM+SF;
* ``table5``: COM, QAM (VA) + COM, QAM (QA) + COM, QAM (VA) + COM + SF, QAM (QA) + COM + SF;
* ``table6``: object class name, visual object, visual object + class name (COM only).

A prediction is correct when its IoU with the ground-truth box is above 0.5 (Sec. 4.1).
Accuracies come with a 95% Wilson score interval.
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torchvision.ops import box_iou

from .api import Grounder, PreparedImage, ScoringInputs
from .config import BiCMConfig, Needs, config_dict, paper_selection, same_method
from .atomic import atomic_write_text, folder_lock
from .data import GroundingSample
from .errors import BicmError, warn
from .safeload import json_loads
from .imageio import load_image
from .interrupt import deferred
from .jsonl import JsonlAppender, read_jsonl
from .paper import paper_numbers
from .prefetch import Ahead, ahead, default_depth
from .provenance import versions
from .proposals import Proposals
from .proposals.sources import ORACLE_ID, ProposalSource
from .runs import ProgressBar, check_run_file, kept_on_interrupt, print_note

__all__ = [
    "ABLATIONS",
    "MAIN_ROW",
    "KAM_ROW",
    "ablation_rows",
    "mcnemar",
    "PAIRED_STEPS",
    "paper_selection",
    "wilson_interval",
    "EvalRun",
    "run_eval",
    "summarize",
    "markdown_table",
    "merge_runs",
]

MAIN_ROW = "QAM+COM+SF"
KAM_ROW = "QAM+COM+SF+KAM"

#: Scoring protocols: the paper's merged box, and Flickr30K's any-box (MDETR, GLIP) beside it.
PROTOCOLS = ("merged-box", "any-box")

#: The seed of torch's generator during a run (recorded in run.json and summary.json).
EVAL_SEED = 0

_QA = dict(attention="qa")
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "table4": [
        ("QAM", dict(components=("qam",), **_QA)),
        ("COM", dict(components=("com",))),
        ("QAM+COM", dict(components=("qam", "com"), **_QA)),
        (MAIN_ROW, dict(components=("qam", "com", "sf"), **_QA)),
    ],
    "table5": [
        ("COM", dict(components=("com",))),
        ("QAM (VA) + COM", dict(components=("qam", "com"), attention="va")),
        ("QAM (QA) + COM", dict(components=("qam", "com"), **_QA)),
        ("QAM (VA) + COM + SF", dict(components=("qam", "com", "sf"), attention="va")),
        ("QAM (QA) + COM + SF", dict(components=("qam", "com", "sf"), **_QA)),
    ],
    "table6": [
        ("object class name", dict(components=("com",), com_mode="class")),
        ("visual object", dict(components=("com",), com_mode="visual")),
        ("visual object + class name", dict(components=("com",), com_mode="both")),
    ],
}


#: Consecutive rows compared on the same queries (exact McNemar): the paper's order in
#: Table 4 (QAM < COM < QAM+COM <= QAM+COM+SF < +KAM), QA against VA (Table 5), and each
#: kind of information against both (Table 6).
PAIRED_STEPS: tuple[tuple[str, str], ...] = (
    ("QAM", "COM"),
    ("COM", "QAM+COM"),
    ("QAM+COM", MAIN_ROW),
    (MAIN_ROW, KAM_ROW),
    ("QAM (VA) + COM", "QAM (QA) + COM"),
    ("QAM (VA) + COM + SF", "QAM (QA) + COM + SF"),
    ("object class name", "visual object + class name"),
    ("visual object", "visual object + class name"),
)


def ablation_rows(ablation: str, base: BiCMConfig, kam: bool = False) -> list[tuple[str, BiCMConfig]]:
    """The named configs of an ablation (``table4``, ``table5``, ``table6``, ``all`` or
    ``none``); :data:`MAIN_ROW` (the full training-free method) is always among them, and
    with ``kam`` :data:`KAM_ROW` (Table 4's last row) follows it."""
    if ablation == "all":
        names = ["table4", "table5", "table6"]
    elif ablation == "none":
        names = []
    elif ablation in ABLATIONS:
        names = [ablation]
    else:
        raise BicmError(f"unknown ablation {ablation!r}; use table4, table5, table6, all or none")
    rows: "OrderedDict[str, BiCMConfig]" = OrderedDict()
    rows[MAIN_ROW] = base.replace(**ABLATIONS["table4"][-1][1])
    if kam:
        rows[KAM_ROW] = base.replace(components=("qam", "com", "sf", "kam"), attention="qa")
        rows["COM+KAM"] = base.replace(components=("com", "kam"))  # KAM without the top-down terms (not in the paper)
    for name in names:
        for row, changes in ABLATIONS[name]:
            rows.setdefault(row, base.replace(**changes))
    return list(rows.items())


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exact ends where rounding would miss them
    high = 1.0 if hits == n else min(1.0, centre + half)
    return (low, high)


@dataclass
class EvalRun:
    """What a run is: written to ``run.json``; a resumed run must match it."""

    dataset: str
    split: str
    proposals: str
    model: str
    rows: list[str]
    config: dict[str, Any]
    part: Optional[str] = None
    limit: Optional[int] = None
    kam: Optional[str] = None
    seed: int = 0
    versions: Optional[dict[str, str]] = None  # bicm, torch, open_clip, python, ... (bicm.provenance)
    protocol: str = "merged-box"  # or "any-box": also right if the box matches any one of the query's boxes

    def same_work(self, other: "EvalRun") -> bool:
        mine, theirs = asdict(self), asdict(other)
        same = all(mine[k] == theirs[k] for k in ("dataset", "split", "proposals", "model", "rows", "kam", "protocol"))
        return same and same_method(self.config, other.config)


def _group_by_image(samples: Sequence[GroundingSample]) -> "OrderedDict[str, list[GroundingSample]]":
    groups: "OrderedDict[str, list[GroundingSample]]" = OrderedDict()
    for sample in samples:
        groups.setdefault(sample.image_file, []).append(sample)
    return groups


def select_part(samples: Sequence[GroundingSample], part: Optional[str], limit: Optional[int]) -> list[GroundingSample]:
    """The samples of shard ``part`` (``"K/N"``, by image) and at most ``limit`` queries."""
    groups = list(_group_by_image(samples).values())
    if part:
        try:
            k, n = (int(v) for v in part.split("/"))
        except ValueError:
            raise BicmError(f"--part must look like K/N (e.g. 2/4), got {part!r}") from None
        if not 1 <= k <= n:
            raise BicmError(f"--part {part}: K must be between 1 and N")
        groups = groups[(k - 1) * len(groups) // n : k * len(groups) // n]
    chosen = [s for group in groups for s in group]
    if limit is not None:
        if limit < 1:
            raise BicmError("--limit must be at least 1")
        chosen = chosen[:limit]
    return chosen


def _oracle(group: Sequence[GroundingSample]) -> Proposals:
    boxes = sorted({b for s in group for b in s.boxes})
    return Proposals(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), source=ORACLE_ID)


def run_eval(
    grounder: Grounder,
    samples: Sequence[GroundingSample],
    image_root: Union[str, Path],
    out_dir: Union[str, Path],
    rows: Sequence[tuple[str, BiCMConfig]],
    *,
    dataset: str,
    split: str,
    source: Union[ProposalSource, str, None],
    part: Optional[str] = None,
    limit: Optional[int] = None,
    progress: bool = True,
    on_image: Optional[Callable[[int], None]] = None,
    prefetch: Optional[int] = None,
    cluster: Any = None,
    protocol: str = "merged-box",
) -> dict[str, Any]:
    """Evaluate ``rows`` on ``samples`` and write predictions, summary and table.

    Parameters
    ----------
    source: a proposal source, ``"oracle"`` (the dataset's own ground-truth boxes, labelled
        as the oracle everywhere), or ``None`` (no proposals: QAM's box alone).
    on_image: called with the number of finished images (tests use it).
    prefetch: images decoded, given proposals and cut into crops ahead of the model, on one
        background thread (:mod:`bicm.prefetch`; 0: none; default: by the model's device,
        :func:`bicm.prefetch.default_depth`). The same predictions either way.
    cluster: a :class:`bicm.cluster.RayEngine` that computes the images' records on a Ray
        cluster (the same records); ``None``: this process.
    protocol: ``"merged-box"`` (the paper's: IoU with the union of a query's boxes above 0.5)
        or ``"any-box"`` (MDETR's and GLIP's Flickr30K protocol, reported beside it: also the
        IoU with any ONE of its boxes above 0.5; ``hit_any`` in the records).

    Returns
    -------
    The summary (also written to ``out_dir/summary.json``).
    """
    if protocol not in PROTOCOLS:
        raise BicmError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    any_box = protocol == "any-box"
    out_dir = Path(out_dir)
    image_root = Path(image_root)
    chosen = select_part(samples, part, limit)
    if not chosen:
        raise BicmError("no samples to evaluate")
    source_id = ORACLE_ID if source == "oracle" else ("none" if source is None else source.id)  # type: ignore[union-attr]
    run = EvalRun(
        dataset=dataset,
        split=split,
        proposals=source_id,
        model=f"{grounder.backbone.name}@{grounder.backbone.fingerprint()}",
        rows=[name for name, _ in rows],
        config=config_dict(rows[0][1]),
        part=part,
        limit=limit,
        kam=None if grounder.kam is None else grounder.kam.fingerprint(),
        seed=EVAL_SEED,
        versions=versions(),
        protocol=protocol,
    )
    torch.manual_seed(EVAL_SEED)  # nothing in an eval draws random numbers; should a source do so, it is seeded
    with folder_lock(out_dir, "bicm eval"):
        check_run_file(out_dir, run)
        needs = Needs.of((c for _, c in rows), grounder.kam is None or grounder.kam.use_names)
        groups = _group_by_image(chosen)
        predictions = out_dir / "predictions.jsonl"
        errors = 0
        with JsonlAppender(predictions, key_field="id") as out:
            # An image is computed with all its queries or not at all: its queries share batches,
            # so recomputing only the missing ones of a half-written image (a full disk cut the
            # append) would differ in the last digits from an uninterrupted run.
            todo = [(image, group) for image, group in groups.items() if any(s.sample_id not in out.done for s in group)]
            done_queries = len(chosen) - sum(1 for _, g in todo for s in g if s.sample_id not in out.done)
            if done_queries:
                print_note(f"resuming: {done_queries} of {len(chosen)} queries already in {predictions}")
            hits = {"n": 0, "k": 0}
            with ProgressBar(progress, "eval", len(chosen), done_queries) as bar, kept_on_interrupt(out, len(chosen), "queries"):
                prepare = functools.partial(_prepare_image, grounder, image_root, needs, source)
                computed = (  # locally: the next images prepared ahead (bicm.prefetch)
                    (_evaluate_image(grounder, image_root, image_file, group, rows, needs, source, ready, any_box=any_box)
                     for (image_file, group), ready in ahead(todo, prepare, default_depth(grounder.backbone.device) if prefetch is None else prefetch))
                    if cluster is None else cluster.eval_images(todo, image_root, rows, needs, oracle=source == "oracle", any_box=any_box)
                )
                for index, records in enumerate(computed):
                    records = [r for r in records if str(r["id"]) not in out.done]  # the same values, written once
                    errors += sum(1 for r in records if r.get("error"))
                    with deferred():  # Ctrl-C never cuts an image's records in half
                        out.append(records)
                    for r in records:
                        hits["n"] += 1
                        hits["k"] += int(r["rows"].get(MAIN_ROW, {}).get("hit", False))
                    bar.advance(len(records), f"{MAIN_ROW} {100 * hits['k'] / max(1, hits['n']):.1f}%")
                    if on_image is not None:
                        on_image(index + 1)
    records = {r["id"]: r for r in read_jsonl(predictions)}
    wanted = [records[s.sample_id] for s in chosen if s.sample_id in records]
    summary = summarize(wanted, run)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out_dir / "table.md", markdown_table(summary))
    if errors:
        warn(f"{errors} queries could not be evaluated (their image failed; see 'error' in the predictions); they count as misses")
    skipped = {row["name"]: row["not_applicable"] for row in summary["rows"] if row.get("not_applicable")}
    for name, count in skipped.items():
        warn(f"row {name!r} did not apply to {count} queries (e.g. class names needed but the proposals have none)")
    return summary


def _evaluate_image(
    grounder: Grounder,
    image_root: Path,
    image_file: str,
    group: Sequence[GroundingSample],
    rows: Sequence[tuple[str, BiCMConfig]],
    needs: Needs,
    source: Union[ProposalSource, str, None],
    ready: Optional[Ahead[PreparedImage]] = None,
    *,
    any_box: bool = False,
) -> list[dict[str, Any]]:
    queries = [s.query for s in group]
    records: list[dict[str, Any]] = []
    try:
        image: Any = ready.get() if ready is not None else _prepare_image(grounder, image_root, needs, source, (image_file, group), crops=False)
        # the per-image work once, then the queries chunk by chunk (config.query_chunk): only
        # one chunk's attention maps exist at a time, however many queries the image has
        for features in grounder.iter_extract(image, queries, image_key=image_file, needs=needs):
            part = group[len(records) : len(records) + len(features.queries)]
            records.extend(_score_chunk(grounder, image_file, part, features, rows, any_box=any_box))
    except BicmError as exc:  # one bad image must not end a dataset run
        return records + [
            {"id": s.sample_id, "image": image_file, "query": s.query, "gt": list(s.box), "rows": {}, "error": str(exc)}
            for s in group[len(records) :]
        ]
    return records


def _prepare_image(
    grounder: Grounder,
    image_root: Path,
    needs: Needs,
    source: Union[ProposalSource, str, None],
    item: tuple[str, Sequence[GroundingSample]],
    crops: bool = True,
) -> PreparedImage:
    """An image's work before its CLIP forwards (:meth:`Grounder.prepare`). Run ahead by
    :func:`bicm.prefetch.ahead`, it cuts the crops too; inline (``crops=False``) the encoder
    cuts them, the next batch while one encodes."""
    image_file, group = item
    pil = load_image(image_root / image_file, exif_transpose=False)  # annotations use the stored pixels
    props: Any = _oracle(group) if source == "oracle" else source
    return grounder.prepare(pil, props, image_key=image_file, needs=needs, crops=crops)


def _score_chunk(
    grounder: Grounder,
    image_file: str,
    group: Sequence[GroundingSample],
    features: ScoringInputs,
    rows: Sequence[tuple[str, BiCMConfig]],
    *,
    any_box: bool = False,
) -> list[dict[str, Any]]:
    """The prediction records of ``group``, the queries of ``features``, under every row;
    with ``any_box`` each row also says whether its box matches any one of the query's boxes."""
    scored: dict[str, Any] = {}
    for name, cfg in rows:
        try:
            scored[name] = grounder.score(features, cfg)
        except BicmError as exc:  # e.g. a class-name row on unnamed proposals: not applicable here
            scored[name] = str(exc)
    records = []
    for i, sample in enumerate(group):
        gt = torch.tensor([sample.box], dtype=torch.float32)
        each = torch.tensor(list(sample.boxes) or [sample.box], dtype=torch.float32).reshape(-1, 4)
        row_out: dict[str, Any] = {}
        for name, results in scored.items():
            if isinstance(results, str):
                row_out[name] = {"skipped": results}
                continue
            r = results[i]
            iou = 0.0 if r.box is None else float(box_iou(torch.tensor([r.box]), gt)[0, 0])
            row_out[name] = {
                "box": None if r.box is None else [round(v, 2) for v in r.box],
                "score": r.score,
                "iou": round(iou, 4),
                "hit": iou > 0.5,
            }
            if any_box:
                best = 0.0 if r.box is None else float(box_iou(torch.tensor([r.box]), each).max())
                row_out[name].update(iou_any=round(best, 4), hit_any=best > 0.5)
        main = scored[MAIN_ROW][i] if not isinstance(scored[MAIN_ROW], str) else None
        chosen = main.selected[0] if main is not None and main.selected else None
        components = {}
        if main is not None and chosen is not None:
            c = main.candidates
            for key in ("s_pq", "s_cq", "s_td"):
                value = getattr(c, key)
                components[key] = None if value is None else float(value[chosen])
            components["from_qam"] = chosen == c.qam_index
        records.append(
            {
                "id": sample.sample_id,
                "kind": sample.kind,
                "image": image_file,
                "query": sample.query,
                "gt": [round(v, 2) for v in sample.box],
                "rows": row_out,
                "components": components,
                "proposals": len(features.proposals),
            }
        )
    return records


def summarize(records: Sequence[dict[str, Any]], run: EvalRun) -> dict[str, Any]:
    """Accuracy, 95% CI and n of every row over ``records``."""
    rows = []
    for name in run.rows:
        # queries where the row does not apply (e.g. class names on unnamed proposals) are not counted;
        # queries of unreadable images count as misses
        row = {"name": name, **_accuracy(records, name)}
        if run.protocol == "any-box":
            row["any_box"] = _accuracy(records, name, "hit_any")
        if row["n"] < len(records):
            row["not_applicable"] = len(records) - row["n"]
        rows.append(row)
    summary: dict[str, Any] = {
        "dataset": run.dataset,
        "split": run.split,
        "proposals": run.proposals,
        "oracle": run.proposals == ORACLE_ID,
        "model": run.model,
        "selection": run.config.get("selection"),
        "errors": sum(1 for r in records if r.get("error")),
        "rows": rows,
        "seed": run.seed,
        "versions": run.versions,
    }
    if MAIN_ROW in run.rows and KAM_ROW in run.rows:
        summary["paired"] = mcnemar(records, MAIN_ROW, KAM_ROW)
    steps = [mcnemar(records, a, b) for a, b in PAIRED_STEPS if a in run.rows and b in run.rows]
    if steps:
        summary["steps"] = steps
    kinds = sorted({r["kind"] for r in records if r.get("kind")})
    if kinds:
        summary["by_kind"] = {
            kind: [
                {"name": row["name"], **_accuracy([r for r in records if r.get("kind") == kind], row["name"])}
                for row in rows
            ]
            for kind in kinds
        }
    return summary


def mcnemar(records: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Paired comparison of rows ``a`` and ``b`` on the same queries: exact McNemar test.

    ``a_only``/``b_only`` count the queries only that row gets right; the two-sided p-value
    is the binomial test of ``b_only`` among the discordant queries at 1/2.
    """
    from scipy.stats import binomtest

    both = [r for r in records if "skipped" not in r["rows"].get(a, {}) and "skipped" not in r["rows"].get(b, {})]
    hit_a = [bool(r["rows"].get(a, {}).get("hit")) for r in both]
    hit_b = [bool(r["rows"].get(b, {}).get("hit")) for r in both]
    a_only = sum(1 for x, y in zip(hit_a, hit_b) if x and not y)
    b_only = sum(1 for x, y in zip(hit_a, hit_b) if y and not x)
    p = binomtest(b_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    n = len(both)
    return {"a": a, "b": b, "n": n, "a_only": a_only, "b_only": b_only, "difference": (b_only - a_only) / n if n else 0.0, "p_value": float(p)}


def _accuracy(records: Sequence[dict[str, Any]], name: str, hit: str = "hit") -> dict[str, Any]:
    counted = [r for r in records if "skipped" not in r["rows"].get(name, {})]
    k = sum(1 for r in counted if r["rows"].get(name, {}).get(hit))
    lo, hi = wilson_interval(k, len(counted))
    return {"accuracy": k / len(counted) if counted else 0.0, "ci_low": lo, "ci_high": hi, "n": len(counted)}


def markdown_table(summary: dict[str, Any]) -> str:
    """Our rows beside the paper's published numbers for the same dataset and split."""
    paper = paper_numbers(summary["dataset"], summary["split"]) or {}
    title = f"{summary['dataset']} {summary['split']}"
    lines = []
    if summary.get("oracle"):
        lines.append("**ORACLE run: ground-truth boxes as proposals (analysis only, not a real result).**\n")
    any_box = any("any_box" in row for row in summary["rows"])
    lines += [
        f"Acc@0.5 on {title} (proposals: `{summary['proposals']}`, selection: `{summary['selection']}`, "
        f"model: `{summary['model']}`)",
        "",
        "| row | ours (%) | 95% CI | n | paper (%) |" + (" any-box (%) | any-box 95% CI |" if any_box else ""),
        "|---|---:|---|---:|---:|" + ("---:|---|" if any_box else ""),
    ]
    for row in summary["rows"]:
        published = paper.get(row["name"])
        extra = ""
        if any_box:
            other = row["any_box"]
            extra = f" {100 * other['accuracy']:.2f} | {100 * other['ci_low']:.2f}-{100 * other['ci_high']:.2f} |"
        lines.append(
            f"| {row['name']} | {100 * row['accuracy']:.2f} | {100 * row['ci_low']:.2f}-{100 * row['ci_high']:.2f} "
            f"| {row['n']} | {'' if published is None else f'{published:.2f}'} |" + extra
        )
    if any_box:
        lines += ["", "ours and paper: merged-box protocol (IoU with the union of a phrase's boxes > 0.5, as in the paper); "
                  "any-box: right when the box matches any one of the phrase's boxes (MDETR, GLIP)."]
    for name, value in paper.items():
        if name not in {row["name"] for row in summary["rows"]}:
            lines.append(f"| {name} (paper only) | | | | {value:.2f} |")
    paired = summary.get("paired")
    if paired:
        lines += [
            "",
            f"Paired on the same {paired['n']} queries: {paired['b']} minus {paired['a']} = "
            f"{100 * paired['difference']:+.2f} points ({paired['b_only']} queries only it gets right, "
            f"{paired['a_only']} only {paired['a']}); exact McNemar p = {paired['p_value']:.3g}.",
        ]
    steps = summary.get("steps")
    if steps:
        lines += ["", "Consecutive rows on the same queries (exact McNemar)", "",
                  "| from | to | change (points) | only `to` right | only `from` right | p |", "|---|---|---:|---:|---:|---:|"]
        for step in steps:
            lines.append(f"| {step['a']} | {step['b']} | {100 * step['difference']:+.2f} | {step['b_only']} | {step['a_only']} | {step['p_value']:.2g} |")
    by_kind = summary.get("by_kind")
    if by_kind:
        kinds = list(by_kind)
        counts = {kind: by_kind[kind][0]["n"] for kind in kinds}
        lines += ["", "Acc@0.5 (%) per query type", "", "| row | " + " | ".join(f"{k} (n={counts[k]})" for k in kinds) + " |"]
        lines.append("|---|" + "---:|" * len(kinds))
        for i, row in enumerate(summary["rows"]):
            cells = [f"{100 * by_kind[k][i]['accuracy']:.1f}" for k in kinds]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if summary.get("versions"):
        made_with = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
        lines += ["", f"Made with {made_with}; seed {summary.get('seed')}."]
    return "\n".join(lines) + "\n"


def merge_runs(shards: Sequence[Union[str, Path]], out_dir: Union[str, Path]) -> dict[str, Any]:
    """Merge the predictions of ``--part`` shards into one run and summarise it."""
    out_dir = Path(out_dir)
    runs, records = [], {}
    for shard in shards:
        shard = Path(shard)
        run_file, predictions = shard / "run.json", shard / "predictions.jsonl"
        if not run_file.is_file() or not predictions.is_file():
            raise BicmError(f"{shard} is not an eval run folder (run.json and predictions.jsonl)")
        runs.append(EvalRun(**json_loads(run_file.read_text(), run_file)))
        for record in read_jsonl(predictions):
            previous = records.get(record["id"])
            if previous is not None and previous["rows"] != record["rows"]:
                raise BicmError(f"query {record['id']} differs between shards")
            records[record["id"]] = record
    if any(not runs[0].same_work(r) for r in runs[1:]):
        raise BicmError("the shards were made with different settings (dataset, model, proposals or rows)")
    merged = EvalRun(**{**asdict(runs[0]), "part": None, "limit": None})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "run.json", json.dumps(asdict(merged), indent=1) + "\n")
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
    summary = summarize(list(records.values()), merged)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out_dir / "table.md", markdown_table(summary))
    return summary
