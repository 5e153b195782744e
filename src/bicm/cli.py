"""The ``bicm`` command line.

User mistakes end with one ``bicm: error: ...`` line on stderr and exit code 2; warnings are
one ``bicm: warning: ...`` line each. Results go to stdout (a table, or JSON lines with
``--json``), everything else to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional, TypeVar

import typer

from .errors import BicmError, BicmWarning

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Unpaired referring expression grounding with CLIP (BiCM): find the box a phrase describes.",
)

USER_ERROR = 2


# Choices as Literal types (typer checks them). They mirror the Literal types of bicm.api,
# bicm.qam and bicm.fusion, kept here so that `bicm --help` does not import torch.
SelectionOpt = Literal["argmax", "union-above-mean", "largest-above-mean"]
AttentionOpt = Literal["qa", "va"]
ComModeOpt = Literal["both", "class", "visual"]
TdScaleOpt = Literal["raw", "normalized"]
RegionOpt = Literal["largest", "peak", "all"]
AmpOpt = Literal["none", "bf16", "fp16"]
BoxFormatOpt = Literal["xyxy", "xywh"]


def user_errors(func: F) -> F:
    """Turn :class:`BicmError` into one line on stderr and exit code 2; show warnings as lines."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
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


@app.command()
@user_errors
def ground(
    image: Path = typer.Argument(..., help="Image file (any format Pillow reads)."),
    queries: List[str] = typer.Argument(..., help="One or more phrases, e.g. 'the bird on the left'."),
    proposals: Optional[Path] = typer.Option(
        None, "--proposals", "-p", help="Detections file (JSON/JSONL: image -> boxes, scores, class names)."
    ),
    box_format: Optional[BoxFormatOpt] = typer.Option(None, help="Box format of a detections file that does not declare it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="open_clip architecture [default: ViT-B-32]."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag [default: openai]."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local CLIP weights (.pt, .bin, .safetensors, or a folder)."),
    quick_gelu: Optional[bool] = typer.Option(
        None, "--quick-gelu/--no-quick-gelu", help="Force the activation (OpenAI CLIP uses QuickGELU) [default: from the weights]."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    amp: AmpOpt = typer.Option("none", help="Autocast precision for the encoders (fp16 needs CUDA)."),
    components: str = typer.Option("qam,com,sf", help="Comma-separated components: qam, com, sf."),
    attention: AttentionOpt = typer.Option("qa", help="qa: query-aware map (QAM); va: vanilla visual attention."),
    com_mode: ComModeOpt = typer.Option("both", help="COM scores: both (S_PQ+S_CQ), class (S_CQ) or visual (S_PQ)."),
    td_scale: TdScaleOpt = typer.Option("raw", help="Map scale for S_TD: raw (paper, with lambda_t=1000) or normalized."),
    selection: SelectionOpt = typer.Option("argmax", help="How the output box is chosen from the candidates."),
    thr_a: float = typer.Option(0.7, help="Threshold on the normalised map for QAM's box."),
    lambda_t: float = typer.Option(1000.0, help="Weight of the top-down score S_TD."),
    region_rule: RegionOpt = typer.Option("largest", help="Region of the thresholded map that makes QAM's box."),
    class_prompt: str = typer.Option("{}", help="Template for class names, e.g. 'a photo of a {}.'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query instead of a table."),
    save_vis: Optional[Path] = typer.Option(None, "--save-vis", help="Write a picture: heatmap, candidates and chosen box."),
    max_image_pixels: int = typer.Option(
        0, help="Refuse larger images (decompression-bomb guard) [default: Pillow's limit, ~89M]."
    ),
) -> None:
    """Ground phrases in an image: print the box each phrase describes."""
    from .api import BiCMConfig, Grounder
    from .imageio import DEFAULT_MAX_PIXELS, load_image
    from .proposals import Proposals
    from .proposals.files import read_detections

    config = BiCMConfig(
        components=tuple(components.split(",")),
        thr_a=thr_a,
        lambda_t=lambda_t,
        attention=attention,
        region_rule=region_rule,
        com_mode=com_mode,
        td_scale=td_scale,
        selection=selection,
        class_prompt=class_prompt,
    )
    pil = load_image(image, max_pixels=max_image_pixels or DEFAULT_MAX_PIXELS)
    props = Proposals.empty()
    if proposals is not None:
        props = read_detections(proposals, box_format).lookup(image)
    elif {"com"} <= set(config.components):
        print("bicm: note: no --proposals given: QAM's box is the only candidate", file=sys.stderr)
    grounder = Grounder.from_pretrained(
        model,
        pretrained,
        checkpoint=checkpoint,
        device=device,
        amp=amp,
        quick_gelu=quick_gelu,
        config=config,
    )
    results = grounder.ground_many(pil, queries, props)
    if as_json:
        for result in results:
            record = {"image": str(image), **result.to_dict()}
            typer.echo(json.dumps(record))
    else:
        _print_table(image, results)
    if save_vis is not None:
        from .viz import save_visualization

        save_visualization(pil, results, save_vis)
        print(f"bicm: wrote {save_vis}", file=sys.stderr)


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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bicm")


if __name__ == "__main__":  # pragma: no cover
    main()
