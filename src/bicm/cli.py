"""The ``bicm`` command line.

User mistakes end with one ``bicm: error: ...`` line on stderr and exit code 2; warnings are
one ``bicm: warning: ...`` line each. Results go to stdout (a table, or JSON lines with
``--json``), everything else to stderr.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional, TypeVar

import typer

from .errors import BicmError, BicmWarning
from .cluster import GrounderSpec
from .cluster import engine as cluster_engine
from .interrupt import resumable
from .jsonl import finite_json
from .options import EngineOptions, FileFormat, Group, MethodOptions, ModelOptions, RunOptions, SourceOptions, groups, resolve_lambda_t

F = TypeVar("F", bound=Callable[..., Any])

USER_ERROR = 2

# Numeric options by parameter name, the same in every command: (lowest, highest); None: no
# bound that side. Every int and float option gets one (floats are finite in any case): a
# port of 70000 or an upload limit of inf used to end in an OverflowError traceback.
_BIG = 2**62
OPTION_RANGES: dict[str, tuple[Optional[float], Optional[float]]] = {
    "port": (0, 65535),
    "top_n": (1, 1_000_000),
    "tsv_class_offset": (0, 1_000_000),
    "threads": (None, 4096),  # below 0: --threads' own message
    "max_image_pixels": (0, _BIG),
    "max_pixels": (0, _BIG),
    "max_proposals": (0, _BIG),
    "limit": (0, _BIG),
    "seed": (0, 2**63 - 1),
    "steps": (1, 10**9),
    "batch_size": (1, 1_000_000),
    "scenes": (1, 10**8),
    "singles": (0, 10**8),
    "save_every": (0, 10**9),
    "train_images": (1, 10**7),
    "eval_images": (0, 10**7),
    "epochs": (1, 10**6),
    "hidden": (1, 1 << 16),
    "batch_pairs": (1, 1_000_000),
    "cache_images": (0, 100_000),
    "score_floor": (0.0, 1.0),
    "thr_a": (0.0, 1.0),
    "lambda_k": (0.0, 1e9),
    "lr": (1e-12, 100.0),
    "max_upload_mb": (0.001, 1_000_000.0),
    "timeout": (0.001, 7 * 86400.0),
    "workers": (1, 100_000),
    "cpus_per_worker": (0.0, 4096.0),
    "gpus_per_worker": (0.0, 1024.0),
}


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Unpaired referring expression grounding with CLIP (BiCM): find the box a phrase describes.",
)


_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EFBIG}


def _check_numbers(options: dict[str, Any]) -> None:
    """Every numeric option within its range (:data:`OPTION_RANGES`); every float finite."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = OPTION_RANGES.get(name, (None, None))
        finite = math.isfinite(value)
        if finite and (low is None or value >= low) and (high is None or value <= high):
            continue
        what = "an integer" if isinstance(value, int) else "a finite number"
        show = lambda x: str(int(x)) if float(x).is_integer() and abs(x) < 1e12 else f"{x:g}"  # noqa: E731
        if low is not None and high is not None:
            bounds = f" from {show(low)} to {show(high)}"
        elif low is not None:
            bounds = f" >= {show(low)}"
        elif high is not None:
            bounds = f" <= {show(high)}"
        else:
            bounds = ""
        raise BicmError(f"--{name.replace('_', '-')} must be {what}{bounds}, not {value}")


def user_errors(func: F) -> F:
    """Turn :class:`BicmError` into one line on stderr and exit code 2; show warnings as lines."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_numbers(kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("always", BicmWarning)
                original = warnings.showwarning

                def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
                    if issubclass(category, BicmWarning):
                        print(f"bicm: warning: {message}", file=sys.stderr)
                    else:
                        original(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                return func(*args, **kwargs)
        except BicmError as exc:
            print(f"bicm: error: {exc}", file=sys.stderr)
            raise typer.Exit(USER_ERROR) from None
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            # a write that fails after the work (disk full, read-only, a folder in the way):
            # whatever was already written or printed stays; one line says why the rest is not
            where = f": {exc.filename}" if exc.filename else ""
            print(f"bicm: error: {exc.strerror or exc}{where}", file=sys.stderr)
            raise typer.Exit(USER_ERROR) from None
        except KeyboardInterrupt:
            print("bicm: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"bicm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Unpaired referring expression grounding with CLIP (BiCM)."""



#: What matplotlib can write (--save-vis, demo -o).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".svgz", ".tif", ".tiff", ".webp", ".eps", ".ps")


def _why(exc: BaseException) -> str:
    """An OSError's reason in a few words ("No space left on device"), else its first line."""
    if getattr(exc, "strerror", None):
        return str(exc.strerror)[:160]  # type: ignore[attr-defined]
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _check_output(path: Optional[Path], what: str, *, folder: bool = False, picture: bool = False) -> None:
    """Refuse an output path that cannot be written, before the work starts.

    ``folder``: the path is a run folder (absent or a folder); else a file (absent or a
    regular file). Its nearest existing ancestor must be a writable folder.
    """
    import os

    if path is None:
        return
    if folder:
        if path.exists() and not path.is_dir():
            raise BicmError(f"{what} {path} is a file, not a folder")
    elif path.is_dir():
        raise BicmError(f"{what} {path} is a folder; give a file name")
    elif path.exists():
        from .safeload import regular_file

        regular_file(path, what)
    if picture and path.suffix.lower() not in PICTURE_SUFFIXES:
        raise BicmError(f"{what} {path}: unknown picture type {path.suffix or '(none)'!r}; use one of {', '.join(PICTURE_SUFFIXES)}")
    target = path if folder and path.is_dir() else path.parent
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BicmError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BicmError(f"{what} {path}: cannot write in {ancestor} (read-only or no permission)")



def _sources_note(source: "SourceOptions", config: Any) -> None:
    if source.is_oracle:
        print("bicm: warning: ORACLE proposals (ground-truth boxes): for analysis, not a real result", file=sys.stderr)
    elif source.proposals is None and config.uses_com:
        print("bicm: note: no --proposals given: QAM's box is the only candidate", file=sys.stderr)


BatchFormat = Literal["jsonl", "coco"]


@app.command()
@user_errors
@groups(
    model=ModelOptions,
    source=SourceOptions,
    method=MethodOptions,
    run=Group(RunOptions, helps={"cache": "Feature cache file for --input runs [default: ~/.cache/bicm/features.sqlite]."}),
    engine=Group(EngineOptions, helps={"engine": "With --input: local (this process) or ray (a Ray cluster; needs the bicm[ray] extra)."}),
)
def ground(
    image: Optional[Path] = typer.Argument(None, help="Image file (any format Pillow reads); or use --input for many."),
    queries: Optional[List[str]] = typer.Argument(None, help="One or more phrases, e.g. 'the bird on the left'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query instead of a table."),
    save_vis: Optional[Path] = typer.Option(None, "--save-vis", help="Write a picture: heatmap, candidates and chosen box."),
    max_image_pixels: int = typer.Option(
        0, help="Refuse larger images outright (decompression-bomb guard) [default: twice Pillow's limit, ~179M]."
    ),
    items: Optional[Path] = typer.Option(
        None, "--input", "-i",
        help='Many images: a JSON Lines file ({"image": PATH, "queries": [...]} or {"image": PATH, "query": "..."} per line, '
        "paths relative to it), or a folder of images with --queries.",
    ),
    queries_file: Optional[Path] = typer.Option(None, "--queries", help="With a folder --input: a text file of phrases, one per line, each grounded in every image."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder of --input (results.jsonl, run.json; resumable) [default: runs/ground-NAME]."),
    output_format: BatchFormat = typer.Option("jsonl", "--format", help="With --input: jsonl, or coco (results.coco.json beside results.jsonl)."),
    *,
    model: ModelOptions,
    source: SourceOptions,
    method: MethodOptions,
    run: RunOptions,
    engine: EngineOptions,
) -> None:
    """Ground phrases in an image (print the box each phrase describes), or in many images with --input."""
    if items is not None:
        if image is not None or queries:
            raise BicmError("give either IMAGE QUERY... or --input ITEMS, not both")
        if as_json or save_vis is not None:
            raise BicmError(f"{'--json' if as_json else '--save-vis'} is for one image; --input writes results.jsonl in --out")
        return resumable(_ground_batch)(items, queries_file, out, output_format, max_image_pixels, model, source, method, run, engine)
    if image is None or not queries:
        raise BicmError("give an IMAGE and one or more QUERY phrases, or --input ITEMS (see bicm ground --help)")
    for flag, given in (("--queries", queries_file), ("--out", out), ("--format", output_format != "jsonl" or None),
                        ("--engine ray", engine.on_cluster or None)):
        if given is not None:
            raise BicmError(f"{flag} goes with --input ITEMS (many images)")
    _check_output(save_vis, "--save-vis", picture=True)
    model.prepare()
    method.prepare()
    from .imageio import DEFAULT_MAX_PIXELS, load_image

    config = method.config(model)
    pil = load_image(image, max_pixels=max_image_pixels or DEFAULT_MAX_PIXELS)
    grounder = model.grounder(config, source=source, kam=method.kam)
    _sources_note(source, config)
    results = grounder.ground_many(pil, queries, image_key=str(image))
    if as_json:
        for result in results:
            record = {"image": str(image), **result.to_dict()}
            typer.echo(finite_json(record))
    else:
        _print_table(image, results)
    if save_vis is not None:
        from .viz import save_visualization

        try:
            save_visualization(pil, results, save_vis)
        except (OSError, ValueError) as exc:
            raise BicmError(f"the results above are complete, but the picture {save_vis} could not be written ({_why(exc)})") from None
        print(f"bicm: wrote {save_vis}", file=sys.stderr)


def _ground_batch(
    items_path: Path, queries_file: Optional[Path], out: Optional[Path], output_format: str, max_image_pixels: int,
    model: ModelOptions, source: SourceOptions, method: MethodOptions, run: RunOptions, engine: EngineOptions,
) -> None:
    """``bicm ground --input``: every item checked, then grounded into a resumable run folder."""
    from .batch import RESULTS, read_items, run_batch

    if out is None:
        out = Path("runs") / f"ground-{items_path.stem or 'items'}"
    _check_output(out, "--out", folder=True)
    if source.proposals == "oracle":
        raise BicmError("--proposals oracle takes a dataset's boxes (bicm eval); --input items have none: use oracle:FILE")
    batch = read_items(items_path, queries_file)  # every line and image checked before any work
    model.prepare()
    method.prepare()
    config = method.config(model)
    feature_cache = None if engine.on_cluster else run.feature_cache()
    spec = GrounderSpec(model, config, source, method.kam, run)
    with cluster_engine(engine, spec) as cluster:
        grounder = model.grounder(config, source=source, cache=feature_cache, kam=method.kam)
        _sources_note(source, config)
        done = run_batch(
            grounder, batch, out, input_name=str(items_path), formats=("jsonl", output_format), progress=not run.no_progress,
            max_pixels=max_image_pixels or None, cluster=cluster,
        )
    if feature_cache is not None:
        stats = feature_cache.stats
        print(f"bicm: feature cache {feature_cache.path}: {stats.hits} hits, {stats.misses} misses", file=sys.stderr)
    print(
        f"bicm: {done['boxes']} of {done['results']} queries found a box in {len(batch)} images; wrote "
        + ", ".join(f"{out}/{name}" for name in done["files"]),
        file=sys.stderr,
    )


@app.command("eval")
@user_errors
@resumable
@groups(
    model=ModelOptions,
    source=SourceOptions,
    method=Group(MethodOptions, exclude=("components", "attention", "com_mode"), defaults={"selection": "paper"}),
    run=RunOptions,
    engine=EngineOptions,
)
def evaluate_command(
    dataset: str = typer.Option(..., help="flickr, referit, unc, unc+, gref, gref_umd (TransVG files), refcoco, refcoco+, refcocog, refclef (refer API), flickr30k_entities (raw), jsonl, shapes-ref, shapes-phrase (the offline shapes world)."),
    split: str = typer.Option(..., help="test, val, testA, testB, ..."),
    annotations: Optional[Path] = typer.Option(None, help="Annotation folder or file of the dataset (see bicm.data) [shapes: generated]."),
    images: Optional[Path] = typer.Option(None, help="Image folder; every image is checked before work starts [shapes: generated]."),
    out: Optional[Path] = typer.Option(None, help="Run folder (predictions.jsonl, summary.json, table.md) [default: runs/DATASET-SPLIT]."),
    ablation: str = typer.Option("all", help="table4, table5, table6, all or none (the full method only); --kam adds the +KAM rows."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the summary JSON here."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N queries."),
    part: Optional[str] = typer.Option(None, help="Shard K/N of the images (merge shards with 'bicm eval-merge')."),
    protocol: Literal["merged-box", "any-box"] = typer.Option(
        "merged-box", help="merged-box: IoU with the union of a query's boxes > 0.5 (the paper's); any-box: also shown, right if "
        "the box matches any ONE of its boxes (Flickr30K Entities, as MDETR and GLIP report)."),
    split_by: Optional[str] = typer.Option(None, help="refer API datasets: the partition (unc, umd, google, berkeley) [default: the dataset's usual one]."),
    query_field: Optional[str] = typer.Option(None, help="refer API datasets: sent (tokenised, default) or raw (the annotators' text, as ReCLIP)."),
    *,
    model: ModelOptions,
    source: SourceOptions,
    method: MethodOptions,
    run: RunOptions,
    engine: EngineOptions,
) -> None:
    """Acc@0.5 of the paper's ablation rows on a dataset, from one pass of feature extraction."""
    _check_output(out, "--out", folder=True)
    _check_output(summary_json, "--summary-json")
    model.prepare()
    method.prepare()
    from .data import load_dataset
    from .evaluate import ablation_rows, run_eval

    if dataset.startswith("shapes"):
        from .shapes.dataset import protocol_of, shapes_folder

        annotations = shapes_folder(annotations, protocol_of(dataset), split)
        images = images or annotations
    if annotations is None or images is None:
        raise BicmError(f"dataset {dataset} needs --annotations and --images")
    samples = load_dataset(dataset, split, annotations, image_root=images, split_by=split_by, query_field=query_field or "sent")
    rows = ablation_rows(ablation, method.config(model, dataset).replace(components=("qam", "com", "sf")), kam=method.kam is not None)
    feature_cache = None if engine.on_cluster else run.feature_cache()  # on a cluster: each node's own (bicm.cluster)
    oracle = source.proposals == "oracle"  # the dataset's own boxes, handed to each image by run_eval
    own = replace(source, proposals=None) if oracle else source  # the naming stays the Grounder's
    spec = GrounderSpec(model, rows[0][1], own, method.kam, run)
    with cluster_engine(engine, spec) as cluster:
        grounder = model.grounder(rows[0][1], source=own, cache=feature_cache, kam=method.kam)
        _sources_note(source, rows[0][1])
        if out is None:
            out = Path("runs") / (f"{dataset}-{split}" + ("" if part is None else f"-part{part.replace('/', 'of')}"))
        summary = run_eval(
            grounder, samples, images, out, rows, dataset=dataset, split=split, source="oracle" if oracle else grounder.proposals,
            part=part, limit=limit, progress=not run.no_progress, cluster=cluster, protocol=protocol,
        )
    _report(summary, out, summary_json, feature_cache)


@app.command("eval-merge")
@user_errors
def eval_merge(
    shards: List[Path] = typer.Argument(..., help="Run folders of the --part shards."),
    out: Path = typer.Option(..., help="Folder for the merged run."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the summary JSON here."),
) -> None:
    """Merge the run folders of 'bicm eval --part K/N' shards and summarise them."""
    _check_output(out, "--out", folder=True)
    _check_output(summary_json, "--summary-json")
    from .evaluate import merge_runs

    _report(merge_runs(shards, out), out, summary_json, None)


def _report(summary: dict, run_dir: Path, summary_json: Optional[Path], feature_cache: Any) -> None:
    from .atomic import atomic_write_text
    from .evaluate import markdown_table

    if summary_json is not None:
        try:
            atomic_write_text(summary_json, json.dumps(summary, indent=1) + "\n")
        except OSError as exc:
            typer.echo(finite_json(summary))
            raise BicmError(
                f"the run is complete in {run_dir} (summary printed above), but {summary_json} could not be written ({_why(exc)})"
            ) from None
    typer.echo(markdown_table(summary))
    if feature_cache is not None:
        stats = feature_cache.stats
        print(f"bicm: feature cache {feature_cache.path}: {stats.hits} hits, {stats.misses} misses", file=sys.stderr)
    print(f"bicm: wrote {run_dir}/predictions.jsonl, summary.json, table.md", file=sys.stderr)


@app.command("train-clip")
@user_errors
@resumable
def train_clip_command(
    out: Path = typer.Option(Path("shapes-clip.safetensors"), "--out", "-o", help="Weights file to write (safetensors); card, curves and history beside it."),
    seed: int = typer.Option(0, help="Seed of the data and the initialisation."),
    steps: int = typer.Option(2600, help="Optimisation steps (batch 256; times measured in benchmarks/README.md)."),
    batch_size: int = typer.Option(256, help="Pairs per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    scenes: int = typer.Option(14000, help="Scenes in the image pool."),
    singles: int = typer.Option(7000, help="Single-object images in the pool."),
    threads: int = typer.Option(2, help="CPU threads (and pool-generation processes)."),
    save_every: int = typer.Option(100, help="Save the resumable training state every N steps (0: only on Ctrl-C)."),
) -> None:
    """Train the small shapes-world CLIP (InfoNCE, learnable temperature); writes weights, card and curves."""
    _check_output(out, "--out")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .shapes.train import TrainConfig, state_path, train_clip

    if steps < 1 or batch_size < 2 or scenes < 1 or singles < 0:
        raise BicmError("steps >= 1, batch size >= 2, scenes >= 1 and singles >= 0 please")
    cfg = TrainConfig(seed=seed, steps=steps, batch_size=batch_size, lr=lr, scenes=scenes, singles=singles, threads=threads)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns) as progress:
        pool_task = progress.add_task("images", total=scenes + singles, info="")
        step_task = progress.add_task("steps", total=steps, info="")

        def on_pool(done: int, total: int) -> None:
            progress.update(pool_task, completed=done)

        def on_step(step: int, record: dict) -> None:
            info = f"loss {record['loss']:.3f}"
            if "i2t" in record:
                info += f"  retrieval i->t {100 * record['i2t']:.0f}% t->i {100 * record['t2i']:.0f}%"
            progress.update(step_task, completed=step, info=info)

        def on_resume(step: int) -> None:
            progress.update(step_task, completed=step)
            print(f"bicm: resuming from step {step} ({state_path(out)})", file=sys.stderr)

        card = train_clip(cfg, out, on_step=on_step, on_pool=on_pool, save_every=save_every, on_resume=on_resume)
    retrieval = card["retrieval"]
    print(
        f"bicm: wrote {out} ({card['training_seconds'] / 60:.1f} min; held-out retrieval top-1 "
        f"i->t {100 * retrieval['image_to_text_top1']:.1f}%, t->i {100 * retrieval['text_to_image_top1']:.1f}%)",
        file=sys.stderr,
    )


@app.command("train-detector")
@user_errors
@resumable
def train_detector_command(
    out: Path = typer.Option(Path("shapes-detector.safetensors"), "--out", "-o", help="Weights file to write (safetensors); JSON and markdown cards and the loss history beside it."),
    seed: int = typer.Option(0, help="Seed of the initialisation, the data order and the flips."),
    steps: int = typer.Option(4000, help="Optimisation steps (batch 4; times measured in benchmarks/README.md)."),
    batch_size: int = typer.Option(4, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    train_images: int = typer.Option(3000, help="Train images used from each protocol (the world has 3,000 each)."),
    eval_images: int = typer.Option(200, help="Test scenes of each protocol for the card's recall and AP (0: none)."),
    root: Optional[Path] = typer.Option(None, help="Folder of the shapes world (written when missing) [default: ~/.cache/bicm/shapes-v2]."),
    threads: int = typer.Option(2, help="CPU threads (use 1 while other jobs share the CPU; see benchmarks/README.md)."),
    save_every: int = typer.Option(200, help="Save the resumable training state every N steps (0: only on Ctrl-C)."),
) -> None:
    """Train the shapes-world detector (Faster R-CNN from scratch on boxes and shape names) for '--proposals shapes-detector'."""
    _check_output(out, "--out")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .shapes.detector import DetectorConfig, state_path, train_detector

    if steps < 1 or batch_size < 1 or train_images < 1 or eval_images < 0 or threads < 1 or save_every < 0:
        raise BicmError("steps, batch size, train images and threads >= 1, eval images and save-every >= 0 please")
    if lr <= 0:
        raise BicmError(f"--lr must be positive, not {lr}")
    cfg = DetectorConfig(seed=seed, steps=steps, batch_size=batch_size, lr=lr, train_images=train_images, threads=threads)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns) as progress:
        data_task = progress.add_task("world", total=None, info="", visible=False)
        step_task = progress.add_task("steps", total=steps, info="")

        def on_data(what: str, done: int, total: int) -> None:
            progress.update(data_task, description=f"world {what}", completed=done, total=total, visible=True)

        def on_step(step: int, record: dict) -> None:
            progress.update(step_task, completed=step, info=f"loss {record['loss']:.3f}")

        def on_resume(step: int) -> None:
            progress.update(step_task, completed=step)
            print(f"bicm: resuming from step {step} ({state_path(out)})", file=sys.stderr)

        def on_eval(protocol: str) -> None:
            progress.update(step_task, info=f"evaluating on {eval_images} shapes-{protocol} test scenes")

        card = train_detector(
            cfg, out, root=root, on_step=on_step, on_data=on_data, on_resume=on_resume, on_eval=on_eval,
            save_every=save_every, eval_images=eval_images,
        )
    scores = [
        f"{p}: recall@0.5 {100 * m['recall@0.5']:.1f}% (right class {100 * m['recall@0.5_with_class']:.1f}%), mAP@0.5 {100 * (m['map@0.5'] or 0):.1f}%"
        for p, m in card["metrics"].items() if isinstance(m, dict) and "recall@0.5" in m
    ]
    print(f"bicm: wrote {out} ({card['training_seconds'] / 60:.1f} min" + (f"; {'; '.join(scores)})" if scores else ")"), file=sys.stderr)


@app.command("pseudo-label")
@user_errors
@resumable
@groups(
    model=ModelOptions,
    source=Group(SourceOptions, defaults={"proposals": "selective-search"}),
    method=Group(MethodOptions, exclude=("kam", "lambda_k")),
    run=RunOptions,
    engine=EngineOptions,
)
def pseudo_label_command(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (matches, pairs, labels, KAM features, summary); rerun to resume."),
    dataset: Optional[str] = typer.Option(None, help="Take a dataset's split apart (images and queries unpaired): shapes-ref / shapes-phrase (their unpaired train split), or a 'bicm eval' dataset."),
    split: str = typer.Option("train", help="Split of --dataset."),
    annotations: Optional[Path] = typer.Option(None, help="Annotation folder or file of --dataset [shapes: generated]."),
    images: Optional[Path] = typer.Option(None, help="Image folder of --dataset, or (without --dataset) a folder or list of images (.txt, .jsonl with 'image')."),
    queries: Optional[Path] = typer.Option(None, help="Without --dataset: the queries (.txt one per line, .jsonl with 'query')."),
    reveal_truth: bool = typer.Option(False, "--reveal-truth", help="Analysis only: read the dataset's ground truth and write the Table 7 report (label precision per Thr_k)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    thr_k: float = typer.Option(0.9, help="Keep a pair as a pseudo label when its fused score S_r is above this (Thr_k)."),
    features_above: Optional[float] = typer.Option(None, help="Store KAM inputs for pairs scoring at least this, to train at lower Thr_k later [default: Thr_k]."),
    calibrate: bool = typer.Option(
        False, "--calibrate-lambda-t",
        help="Instead of labelling: compute lambda_t by the paper's rule (10^round(log10(median S_BU / median S_TD)) over the "
        "candidates of the same unlabelled pairs) and write OUT/lambda_t.json.",
    ),
    *,
    model: ModelOptions,
    source: SourceOptions,
    method: MethodOptions,
    run: RunOptions,
    engine: EngineOptions,
) -> None:
    """KAM step 1: pair unpaired images with their most similar query, ground them, keep the sure boxes."""
    _check_output(out, "--out", folder=True)
    model.prepare()
    from .pseudo import dataset_unpaired, read_image_list, read_query_list, run_pseudo_label, shapes_unpaired

    if limit is not None and limit < 1:
        raise BicmError("--limit must be at least 1")
    if dataset is not None and dataset.startswith("shapes"):
        if split != "train":
            raise BicmError("the shapes world's unpaired data is its train split (--split train)")
        data = shapes_unpaired(annotations, dataset, reveal_truth, limit)
    elif dataset is not None:
        from .data import load_dataset

        if annotations is None or images is None:
            raise BicmError(f"dataset {dataset} needs --annotations and --images")
        data = dataset_unpaired(load_dataset(dataset, split, annotations, image_root=images), images, f"{dataset} {split}", reveal_truth)
        data.images = data.images[:limit] if limit else data.images
    else:
        if images is None or queries is None:
            raise BicmError("give --dataset, or --images and --queries")
        if reveal_truth:
            raise BicmError("--reveal-truth needs a --dataset with ground truth")
        data = dataset_unpaired([], Path("."), "", False)
        data.images, data.queries = read_image_list(images)[:limit], read_query_list(queries)
        data.images_desc, data.queries_desc = str(images), str(queries)
    if calibrate and engine.on_cluster:
        raise BicmError("--calibrate-lambda-t runs here: leave out --engine ray")
    spec = GrounderSpec(model, method.config(model, dataset), source, None, run)
    with cluster_engine(engine, spec) as cluster:
        grounder = model.grounder(spec.config, source=source, cache=None if cluster else run.feature_cache())
        if not calibrate:
            summary = run_pseudo_label(
                grounder, data.images, data.queries, out, source=grounder.proposals, thr_k=thr_k, features_above=features_above,
                truth=data.truth, images_desc=data.images_desc, queries_desc=data.queries_desc, progress=not run.no_progress,
                cluster=cluster,
            )
    if calibrate:
        from .pseudo import calibrate_lambda

        found = calibrate_lambda(grounder, data.images, data.queries, out, source=grounder.proposals, progress=not run.no_progress)
        typer.echo(json.dumps(found, indent=1))
        print(
            f"bicm: lambda_t = {found['lambda_t']:g} (median |S_BU| {found['median_abs_s_bu']:.3g}, median |S_TD| "
            f"{found['median_abs_s_td']:.3g}, {found['candidates']} candidates of {found['pairs']} unlabelled pairs); wrote {out}/lambda_t.json",
            file=sys.stderr,
        )
        return
    if "table7" in summary:
        typer.echo((out / "table7.md").read_text())
    print(
        f"bicm: {summary['labels']} pseudo labels (S_r > {thr_k:g}) from {summary['pairs']} image-query pairs; "
        f"wrote {out}/labels.jsonl (train with: bicm train-kam {out})",
        file=sys.stderr,
    )


@app.command("train-kam")
@user_errors
@resumable
@groups(model=Group(ModelOptions, only=("threads",)))
def train_kam_command(
    run: Path = typer.Argument(..., help="A 'bicm pseudo-label' run folder."),
    out: Path = typer.Option(Path("kam.safetensors"), "--out", "-o", help="Model file (safetensors); the loss curve PNG and history JSON go beside it."),
    thr_k: Optional[float] = typer.Option(None, help="Train on the pairs scoring above this [default: the run's Thr_k]."),
    epochs: int = typer.Option(50, help="Epochs (the paper: 50)."),
    lr: float = typer.Option(1e-4, help="Adam learning rate (the paper: 1e-4)."),
    hidden: int = typer.Option(512, help="Width of the MLP's hidden layers."),
    batch_pairs: int = typer.Option(32, help="Image-query pairs per step."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the shuffling."),
    no_names: bool = typer.Option(False, "--no-names", help="Train without the class-name input fc_r (zeros)."),
    *,
    model: ModelOptions,
) -> None:
    """KAM step 2: train the MLP of Fig. 3 on stored pseudo labels (no CLIP needed).

    Resumable: the training state is saved after every epoch to <out stem>.state.pt; after
    Ctrl-C the same command continues to the same weights.
    """
    _check_output(out, "--out")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .interrupt import state_path
    from .kam import KamConfig, KamModel, save_curve, train_kam
    from .pseudo import read_kam_pairs

    model.prepare()
    config = KamConfig(hidden=hidden, epochs=epochs, lr=lr, batch_pairs=batch_pairs, seed=seed)
    pairs, info = read_kam_pairs(run, thr_k)
    use_names = not no_names and all(p.fc is not None for p in pairs)
    if not no_names and not use_names:
        print("bicm: note: some labels have no class names: training without the class-name input", file=sys.stderr)
    columns = [TextColumn("train-kam"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns) as progress:
        task = progress.add_task("epochs", total=epochs, info="")

        def on_epoch(epoch: int, record: dict) -> None:
            progress.update(task, completed=epoch, info=f"loss {record['loss']:.3f}  top-1 = label {100 * record['agree']:.0f}%")

        def on_resume(epoch: int) -> None:
            progress.update(task, completed=epoch)
            print(f"bicm: resuming from epoch {epoch} ({state_path(out)})", file=sys.stderr)

        mlp, history = train_kam(pairs, config, use_names=use_names, on_epoch=on_epoch, state=state_path(out), on_resume=on_resume)
    backbone_name, _, backbone_id = info["model"].partition("@")
    used_thr = info["thr_k"] if thr_k is None else thr_k
    model = KamModel(mlp, config, backbone_id, backbone_name, use_names,
                     info={"pseudo_labels": str(run), "labels": len(pairs), "thr_k": used_thr, "final_loss": history[-1]["loss"]})
    model.save(out)
    from .atomic import atomic_write_text

    stem = out.with_suffix("")
    atomic_write_text(stem.with_name(stem.name + ".history.json"), json.dumps(history, indent=1) + "\n")
    save_curve(history, stem.with_name(stem.name + ".curve.png"), f"KAM on {len(pairs)} pseudo labels (Thr_k {used_thr:g})")
    print(f"bicm: wrote {out} ({len(pairs)} labels, final loss {history[-1]['loss']:.3f}) and its curve {stem.name}.curve.png", file=sys.stderr)


@app.command()
@user_errors
def demo(
    queries: Optional[List[str]] = typer.Argument(None, help="Phrases [default: three of the example's own expressions]."),
    out: Path = typer.Option(Path("bicm-demo.png"), "--out", "-o", help="Picture to write."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query instead of a table."),
) -> None:
    """Offline demo: the bundled example scene, the shipped shapes CLIP and shapes detector, BiCM (QAM+COM+SF).

    The example's own phrases have known true boxes: the picture draws them (dashed green) and
    every output gives the chosen box's IoU with its truth, so the demo shows how well the
    method grounds, right or wrong.
    """
    _check_output(out, "--out", picture=True)
    import torch
    from torchvision.ops import box_iou

    from .api import Grounder
    from .imageio import load_image
    from .shapes.examples import EXAMPLE_SELECTION, example_image, example_queries, example_truths
    from .viz import save_visualization

    path = example_image()
    queries = list(queries or example_queries())
    # the shipped shapes CLIP and detector, the phrase protocol's selection and the lambda_t calibrated for the model
    grounder = Grounder.from_pretrained(
        "shapes", device="cpu", proposals="shapes-detector", selection=EXAMPLE_SELECTION, lambda_t=resolve_lambda_t("auto", "shapes", None)
    )
    results = grounder.ground_many(path, queries)
    known = example_truths()
    truths = [known.get(" ".join(q.split())) for q in queries]
    overlaps = [
        None if t is None else (0.0 if r.box is None else round(float(box_iou(torch.tensor([r.box]), torch.tensor([t]))[0, 0]), 4))
        for r, t in zip(results, truths)
    ]
    if as_json:
        for result, truth, overlap in zip(results, truths, overlaps):
            extra = {} if truth is None else {"truth": [round(v, 2) for v in truth], "iou": overlap}
            typer.echo(finite_json({"image": path.name, **result.to_dict(candidates=False), **extra}))
    else:
        _print_table(Path(path.name), results)
        for query, overlap in zip(queries, overlaps):
            if overlap is not None:
                print(f"bicm: {query!r}: IoU {overlap:.2f} with the true box ({'right' if overlap > 0.5 else 'wrong'} at 0.5)", file=sys.stderr)
    try:
        save_visualization(load_image(path), results, out, truths=truths)
    except (OSError, ValueError) as exc:
        raise BicmError(f"the results above are complete, but the picture {out} could not be written ({_why(exc)})") from None
    print(f"bicm: wrote {out}", file=sys.stderr)


proposals_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Make, read and convert object proposals (detections files)."
)
app.add_typer(proposals_app, name="proposals")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@proposals_app.command("extract")
@user_errors
@resumable
@groups(
    # fp32 by default: naming here was always exact (eval and ground default to auto)
    model=Group(ModelOptions, defaults={"precision": "fp32"}),
    source=Group(
        SourceOptions,
        defaults={"proposals": "selective-search"},
        flags={"proposals": ("--source", "-s", "--proposals", "-p")},
        helps={"proposals": "selective-search, faster-rcnn, shapes-detector or a detections file."},
    ),
    engine=EngineOptions,
)
def proposals_extract(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    output: Path = typer.Option(..., "--output", "-o", help="bicm JSONL file to write (appended to: runs resume)."),
    *,
    model: ModelOptions,
    source: SourceOptions,
    engine: EngineOptions,
) -> None:
    """Run a proposal source over images into a JSONL file (resumable, with progress)."""
    _check_output(output, "--output")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .devices import resolve_device
    from .prefetch import ahead, default_depth
    from .proposals.files import DetectionsAppender

    todo = _collect_images(images)
    failed: list[str] = []
    with cluster_engine(engine) as cluster, DetectionsAppender(output) as out:
        maker, namer = proposal_makers(model, source) if cluster is None else (None, None)  # on a cluster: in each worker
        pending = [(key, path) for key, path in todo if key not in out.done]
        if len(pending) < len(todo):
            print(f"bicm: resuming: {len(todo) - len(pending)} of {len(todo)} images already in {output}", file=sys.stderr)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as progress:
            title = source.proposals if maker is None else maker.id.split("(")[0]
            task = progress.add_task(f"proposals ({title})", total=len(pending))
            found_all = (  # locally: the next images decoded and proposed ahead (bicm.prefetch), named here
                (
                    (key, name_proposals(namer, find_proposals(maker, key, path) if ready is None else ready.get()))
                    for (key, path), ready in ahead(pending, lambda item: find_proposals(maker, *item), default_depth(resolve_device(model.device)))
                )
                if cluster is None else cluster.propose(model, source, pending)
            )
            for key, found in found_all:
                if isinstance(found, str):  # one bad image must not stop a dataset
                    failed.append(f"{key}: {found}")
                else:
                    out.add(key, found)
                progress.advance(task)
    for line in failed[:10]:
        print(f"bicm: warning: skipped {line}", file=sys.stderr)
    if failed:
        print(f"bicm: warning: {len(failed)} image(s) skipped; rerun the same command to retry them", file=sys.stderr)
    print(f"bicm: {len(todo) - len(failed)} of {len(todo)} images in {output}", file=sys.stderr)



def proposal_makers(model: ModelOptions, source: SourceOptions) -> tuple[Any, Any]:
    """``proposals extract``'s proposal source and CLIP namer (``None`` without ``--name-with``)."""
    maker = source.source(model.device)
    assert maker is not None
    namer = None
    if source.name_with is not None:
        from .proposals.naming import ClipNamer

        model.prepare()
        namer = ClipNamer(model.load(), source.name_with, source.name_template)
    return maker, namer


def find_proposals(maker: Any, key: str, path: Path) -> Any:
    """One image decoded and its proposals found: ``(image, proposals)``, or the text of the
    :class:`BicmError` that stopped them (one bad image must not stop a dataset)."""
    from .imageio import load_image

    try:
        pil = load_image(path, exif_transpose=False)
        return pil, maker(pil, key)
    except BicmError as exc:
        return str(exc)


def name_proposals(namer: Any, found: Any) -> Any:
    """:func:`find_proposals`'s result sanitized, named (with a namer), with its image size and
    versions; or the error text."""
    from .provenance import versions

    if isinstance(found, str):
        return found
    pil, proposals = found
    try:
        proposals = proposals.sanitize(pil.width, pil.height).proposals
        if namer is not None and len(proposals) and not proposals.fully_named:
            proposals = namer.name(proposals, pil)
    except BicmError as exc:
        return str(exc)
    proposals.meta["image_size"] = [pil.width, pil.height]
    proposals.meta["versions"] = versions()
    return proposals


def propose_image(maker: Any, namer: Any, key: str, path: Path) -> Any:
    """One image's proposals, sanitized, named, with their image size and versions; or the
    text of the :class:`BicmError` that stopped them (a Ray worker's unit of work)."""
    return name_proposals(namer, find_proposals(maker, key, path))


def _collect_images(paths: List[Path]) -> list[tuple[str, Path]]:

    found: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
                found.append((file.relative_to(path).as_posix(), file))
        elif path.exists():
            from .safeload import regular_file

            found.append((path.name, regular_file(path, "image")))
        else:
            raise BicmError(f"no such image or folder: {path}")
    keys = [k for k, _ in found]
    if len(set(keys)) != len(keys):
        raise BicmError("two images would get the same name in the output; pass one folder instead of loose files")
    if not found:
        raise BicmError("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return found


@proposals_app.command("convert")
@user_errors
@groups(formats=Group(SourceOptions, only=("file_format", "box_format", "tsv_class_offset")))
def proposals_convert(
    source: Path = typer.Argument(..., help="Detections file to read."),
    output: Path = typer.Argument(..., help="File to write."),
    to: Optional[FileFormat] = typer.Option(None, help="Output format: bicm (JSONL), reclip or tsv [default: by extension, .tsv -> tsv, else bicm]."),
    vocabulary: str = typer.Option("vg1600", help="Vocabulary of TSV class ids (vg1600, coco80 or a text file)."),
    *,
    formats: SourceOptions,
) -> None:
    """Convert between bicm JSONL, ReCLIP JSON and bottom-up-attention TSV."""
    _check_output(output, "output")
    from .proposals.files import read_proposals_file, write_detections
    from .proposals.formats import write_bottom_up_tsv, write_reclip

    read = read_proposals_file(source, formats.file_format, formats.box_format, vocabulary=vocabulary, class_offset=formats.tsv_class_offset)
    target = to or ("tsv" if output.suffix.lower() == ".tsv" else "bicm")
    if target == "tsv":
        write_bottom_up_tsv(output, read.entries, vocabulary=vocabulary, class_offset=formats.tsv_class_offset)
    elif target == "reclip":
        write_reclip(output, read.entries)
    elif target == "bicm":
        write_detections(output, read.entries)
    else:
        raise BicmError(f"cannot write format {target!r}; use bicm, reclip or tsv")
    print(f"bicm: wrote {len(read.entries)} images to {output} ({target})", file=sys.stderr)


def _print_table(image: Path, results: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(image), title_justify="left")
    table.add_column("query")
    table.add_column("box (x1, y1, x2, y2)")
    table.add_column("score", justify="right")
    table.add_column("chosen")
    for r in results:
        box = "-" if r.box is None else ", ".join(f"{v:.1f}" for v in r.box)
        score = "-" if r.score is None else f"{r.score:.4f}"
        chosen = []
        for idx in r.selected:
            source = "QAM box" if idx == r.candidates.qam_index else f"proposal {idx}"
            name = r.candidates.class_names[idx]
            chosen.append(f"{source} ({name})" if name else source)
        table.add_row(r.query, box, score, "; ".join(chosen) or "-")
    Console().print(table)
    notes = sorted({n for r in results for n in r.notes})
    for note in notes:
        print(f"bicm: note: {note}", file=sys.stderr)


@app.command()
@user_errors
@groups(
    model=Group(ModelOptions, helps={"model": "open_clip architecture, or shapes [default: shapes, the shipped offline CLIP]."}),
    source=Group(
        SourceOptions,
        only=("top_n", "ss_mode", "name_with", "name_template"),
        helps={"name_with": "Name proposals by CLIP over vg1600, coco80, shapes or a text file [default: shapes with the shapes model]."},
    ),
    method=Group(MethodOptions, only=("kam",), helps={"kam": "A KAM model from 'bicm train-kam': the page offers KAM (on by default)."}),
)
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes the demo to the network)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload (MB)."),
    max_image_pixels: int = typer.Option(25_000_000, help="Largest accepted image (width x height), checked before decoding."),
    timeout: float = typer.Option(120.0, help="Seconds before a request is answered with a timeout (queueing included)."),
    cache_images: int = typer.Option(8, help="Images whose proposals and crop features stay in memory."),
    *,
    model: ModelOptions,
    source: SourceOptions,
    method: MethodOptions,
) -> None:
    """Web demo: a local page to ground phrases in an uploaded image or a bundled example."""
    from .serve import serve_command
    from .service import ServeLimits

    model.prepare()
    method.prepare()
    limits = ServeLimits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_image_pixels,
        timeout_s=timeout,
        cache_images=cache_images,
    )
    serve_command(host, port, model=model, source=source, kam=method.kam, limits=limits)



def main() -> None:
    """Console-script entry point."""
    app(prog_name="bicm")


if __name__ == "__main__":  # pragma: no cover
    main()
