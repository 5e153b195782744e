"""The command line's option groups, each declared once.

A group is a frozen dataclass whose fields are command-line options (:func:`option` holds
each one's flags and help). A command takes a group as ONE parameter::

    @app.command()
    @user_errors
    @groups(model=ModelOptions, method=MethodOptions)
    def ground(image: Path, ..., model: ModelOptions, method: MethodOptions) -> None:
        grounder = model.grounder(method.config(model))

:func:`groups` spreads the group's fields into the command's signature (so typer shows
``--model``, ``--precision``, ... and validates their choices) and packs them back into the
dataclass before the command runs. Every command that loads a model therefore has the same
model options, with the same defaults and help, and they cannot drift apart. A command may
leave fields out (:meth:`Group.but`); those keep their defaults.

Nothing here imports torch: ``bicm --help`` stays fast. What the groups build (a backbone, a
proposal source, a :class:`~bicm.config.BiCMConfig`) is imported when it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, TypeVar, Union, get_type_hints

import typer

from .config import (
    DEFAULT_LAMBDA_K,
    DEFAULT_LAMBDA_T,
    DEFAULT_MAX_PROPOSALS,
    DEFAULT_NAME_TEMPLATE,
    DEFAULT_THR_A,
    DEFAULT_WORK_PIXELS,
    Amp,
    BiCMConfig,
    ComMode,
    CropBackend,
    MapKind,
    Precision,
    RegionRule,
    SelectionPolicy,
    TdScale,
    paper_selection,
)
from .errors import BicmError

if TYPE_CHECKING:  # pragma: no cover
    from .api import Grounder
    from .backbone import Backbone
    from .proposals.sources import ProposalSource

__all__ = ["option", "Group", "groups", "ModelOptions", "SourceOptions", "MethodOptions", "RunOptions", "EngineOptions"]

F = TypeVar("F", bound=Callable[..., Any])

SsMode = Literal["fast", "quality"]
FileFormat = Literal["auto", "bicm", "reclip", "tsv"]
BoxFormat = Literal["xyxy", "xywh"]
Engine = Literal["local", "ray"]
#: ``paper``: the dataset's own protocol in ``bicm eval`` (:func:`bicm.config.paper_selection`),
#: the argmax where there is no dataset.
SelectionChoice = Literal["paper", SelectionPolicy]


def option(default: Any, *flags: str, help: str, **settings: Any) -> Any:  # noqa: A002
    """A dataclass field that is a command-line option: its default, its flags (default:
    ``--field-name``), its help, and any other :func:`typer.Option` setting (``envvar``)."""
    return field(default=default, metadata={"flags": flags, "help": help, "settings": settings})


@dataclass(frozen=True)
class Group:
    """A group as one command uses it: the dataclass, and that command's differences.

    Attributes
    ----------
    cls: the group's dataclass.
    exclude: fields the command does not offer (they keep their defaults).
    only: if given, the only fields the command offers.
    defaults, helps, flags: per-field replacements for this command.
    """

    cls: type
    exclude: tuple[str, ...] = ()
    only: Optional[tuple[str, ...]] = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    helps: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def but(self, **changes: Any) -> "Group":
        return dataclasses.replace(self, **changes)

    def offered(self) -> list[dataclasses.Field]:
        return [f for f in fields(self.cls) if f.name not in self.exclude and (self.only is None or f.name in self.only)]

    def parameters(self) -> list[inspect.Parameter]:
        hints = get_type_hints(self.cls)
        params = []
        for f in self.offered():
            meta = f.metadata
            default = self.defaults.get(f.name, f.default)
            info = typer.Option(default, *self.flags.get(f.name, meta["flags"]), help=self.helps.get(f.name, meta["help"]), **meta["settings"])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hints[f.name]))
        return params

    def pack(self, values: dict[str, Any]) -> Any:
        """The group's dataclass from the command's flat values (removed from ``values``)."""
        given = {f.name: values.pop(f.name) for f in self.offered()}
        fixed = {k: v for k, v in self.defaults.items() if k not in given}
        return self.cls(**given, **fixed)


def _as_group(spec: Union[type, Group]) -> Group:
    return spec if isinstance(spec, Group) else Group(spec)


def groups(**specs: Union[type, Group]) -> Callable[[F], F]:
    """Give a command option groups: each keyword names the command's parameter that
    receives the packed dataclass."""
    wanted = {name: _as_group(spec) for name, spec in specs.items()}

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        own = [p for name, p in signature.parameters.items() if name not in wanted]
        added = [p for group in wanted.values() for p in group.parameters()]
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:  # a programming error, found at import
            raise TypeError(f"{func.__name__}: options {sorted(clash)} are declared by the command and by a group")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for name, group in wanted.items():
                kwargs[name] = group.pack(kwargs)
            return func(*args, **kwargs)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        )
        hints = {k: v for k, v in getattr(func, "__annotations__", {}).items() if k not in wanted}
        wrapper.__annotations__ = {**hints, **{p.name: p.annotation for p in added}}
        return wrapper  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelOptions:
    """Which CLIP, on which device, in which precision (every command that loads a model)."""

    model: Optional[str] = option(None, "--model", "-m", help="open_clip architecture, or shapes (the shipped offline CLIP) [default: ViT-B-32].")
    pretrained: Optional[str] = option(None, help="open_clip pretrained tag [default: openai].")
    checkpoint: Optional[Path] = option(None, "--checkpoint", "-c", help="Local CLIP weights (.pt, .bin, .safetensors, or a folder).")
    quick_gelu: Optional[bool] = option(
        None, "--quick-gelu/--no-quick-gelu", help="Force the activation (OpenAI CLIP uses QuickGELU) [default: from the weights]."
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    amp: Amp = option("none", help="Autocast precision for the encoders (fp16 needs CUDA).")
    precision: Precision = option(
        "auto",
        envvar="BICM_PRECISION",
        help="Weights of the image encoder for crops and whole images: auto (bf16 where the GPU or CPU does bf16 natively, "
        "else fp32), fp32, bf16, fp16 (CUDA). QAM's gradient path stays fp32.",
    )
    threads: int = option(0, envvar="BICM_THREADS", help="CPU threads for torch's matrix work [default: 0, torch's choice: one per core].")
    compile: bool = option(
        False,
        "--compile",
        envvar="BICM_COMPILE",
        help="Run the crop/image encoder through torch.compile (compiles on the first image; for long runs on a GPU; "
        "see benchmarks/README.md for when it pays).",
    )

    def prepare(self) -> None:
        """Before any work: the thread count, and the checkpoint is a readable regular file
        (a FIFO would block)."""
        if self.threads < 0:
            raise BicmError(f"--threads must be 0 (torch's default) or more, not {self.threads}")
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.checkpoint is not None and not self.checkpoint.is_dir():
            from .safeload import regular_file

            regular_file(self.checkpoint, "checkpoint")

    def load(self) -> "Backbone":
        """The CLIP backbone these options name."""
        from .backbone import load_backbone

        return load_backbone(
            self.model, self.pretrained, self.checkpoint, device=self.device, amp=self.amp, quick_gelu=self.quick_gelu,
            precision=self.precision, compile=self.compile,
        )

    def grounder(
        self,
        config: Optional[BiCMConfig] = None,
        *,
        source: "Optional[SourceOptions]" = None,
        cache: Any = None,
        kam: Optional[Path] = None,
    ) -> "Grounder":
        """A :class:`~bicm.api.Grounder` on this model, with ``source``'s proposals and naming,
        a feature cache and a KAM model."""
        from .api import Grounder

        proposals = None if source is None else source.source(self.device)  # before the model: a wrong file fails fast
        backbone = self.load()
        naming = None if source is None else source.name_with
        template = DEFAULT_NAME_TEMPLATE if source is None else source.name_template
        return Grounder(backbone, config, proposals=proposals, name_with=naming, name_template=template, cache=cache, kam=kam)


@dataclass(frozen=True)
class SourceOptions:
    """Where proposals come from, and how unnamed ones get class names."""

    proposals: Optional[str] = option(
        None,
        "--proposals",
        "-p",
        help="selective-search, faster-rcnn, shapes-detector, a detections file (bicm JSON/JSONL, ReCLIP JSON, bottom-up TSV), "
        "or oracle (eval: the dataset's boxes) / oracle:FILE (ground truth; analysis only).",
    )
    top_n: int = option(100, help="Proposals per image (selective search, detector).")
    ss_mode: SsMode = option("fast", "--ss-mode", help="Selective search preset: fast or quality.")
    score_floor: float = option(0.05, help="Detector: drop detections scoring below this.")
    detector_arch: str = option("fasterrcnn_resnet50_fpn_v2", help="Detector: torchvision Faster R-CNN architecture.")
    detector_checkpoint: Optional[Path] = option(None, help="Detector: local torchvision weights file instead of the download.")
    file_format: FileFormat = option("auto", help="Detections file format: auto, bicm, reclip or tsv.")
    box_format: Optional[BoxFormat] = option(None, help="Box format of a bicm detections file that does not declare it.")
    tsv_class_offset: int = option(0, help="TSV class id of the first vocabulary name (1 for Caffe models with background 0).")
    name_with: Optional[str] = option(None, help="Name unnamed proposals by CLIP zero-shot over vg1600, coco80, shapes or a text file.")
    name_template: str = option(DEFAULT_NAME_TEMPLATE, help="Prompt for each vocabulary name when naming.")

    @property
    def is_oracle(self) -> bool:
        return self.proposals is not None and (self.proposals == "oracle" or self.proposals.startswith("oracle:"))

    def source(self, device: str = "auto") -> "Optional[ProposalSource]":
        """The proposal source (``None`` without ``--proposals``)."""
        if self.proposals is None:
            return None
        from .proposals.sources import make_source

        return make_source(
            self.proposals, top_n=self.top_n, mode=self.ss_mode, score_floor=self.score_floor, arch=self.detector_arch,
            checkpoint=self.detector_checkpoint, file_format=self.file_format, box_format=self.box_format,
            class_offset=self.tsv_class_offset, device=device,
        )


@dataclass(frozen=True)
class MethodOptions:
    """The method's knobs (defaults: the paper's; see :class:`~bicm.config.BiCMConfig`)."""

    components: str = option("qam,com,sf", help="Comma-separated components: qam, com, sf (kam is added by --kam).")
    kam: Optional[Path] = option(None, "--kam", help="A KAM model from 'bicm train-kam': adds lambda_k * S_KAM (Eq. 11).")
    lambda_k: float = option(DEFAULT_LAMBDA_K, help="Weight of the KAM score S_KAM.")
    attention: MapKind = option("qa", help="qa: query-aware map (QAM); va: vanilla visual attention.")
    com_mode: ComMode = option("both", help="COM scores: both (S_PQ+S_CQ), class (S_CQ) or visual (S_PQ).")
    td_scale: TdScale = option("raw", help="Map scale for S_TD: raw (paper, with lambda_t=1000) or normalized.")
    selection: SelectionChoice = option(
        "argmax",
        help="How the output box is chosen from the candidates: argmax, union-above-mean, largest-above-mean, or paper "
        "(eval: the dataset's protocol, the union of above-mean boxes on Flickr30K and the largest elsewhere; else argmax).",
    )
    thr_a: float = option(DEFAULT_THR_A, help="Threshold on the normalised map for QAM's box.")
    lambda_t: str = option(
        f"{DEFAULT_LAMBDA_T:g}",
        "--lambda-t",
        help="Weight of the top-down score S_TD: a number (the paper: 1000, for ViT-B/32's raw map), or auto: the value "
        "calibrated for this model by the paper's rule (recorded in its card; make one with 'bicm pseudo-label --calibrate-lambda-t').",
    )
    region_rule: RegionRule = option("largest", help="Region of the thresholded map that makes QAM's box.")
    class_prompt: str = option("{}", help="Template for class names, e.g. 'a photo of a {}.'.")
    max_pixels: int = option(
        DEFAULT_WORK_PIXELS, help="Downscale larger images to this many pixels before the work (boxes stay in original pixels); 0: never."
    )
    max_proposals: int = option(
        DEFAULT_MAX_PROPOSALS, help="Keep at most this many proposals per image (the highest-scoring, else the first); 0: all."
    )
    crop_backend: CropBackend = option(
        "pil",
        help="Where proposal crops are cut and resized: pil (open_clip's transform on the host, exact), tensor (on the "
        "model's device, Pillow's geometry, values within a level or two) or auto (tensor on CUDA, pil on a CPU).",
    )

    def prepare(self) -> None:
        """Before any work: the KAM model is a readable regular file."""
        if self.kam is not None:
            from .safeload import regular_file

            regular_file(self.kam, "KAM model", missing=f"KAM model {self.kam} does not exist")

    def config(self, model: ModelOptions, dataset: Optional[str] = None) -> BiCMConfig:
        """The :class:`~bicm.config.BiCMConfig` these options describe (``lambda_t auto`` reads
        ``model``'s card; ``selection paper`` follows ``dataset``)."""
        comps = tuple(c.strip() for c in self.components.split(",") if c.strip())
        if self.kam is not None and "kam" not in comps:
            comps = comps + ("kam",)
        selection = self.selection
        if selection == "paper":
            selection = paper_selection(dataset) if dataset else "argmax"
        return BiCMConfig(
            components=comps,
            thr_a=self.thr_a,
            lambda_t=resolve_lambda_t(self.lambda_t, model.model, model.checkpoint),
            lambda_k=self.lambda_k,
            attention=self.attention,
            region_rule=self.region_rule,
            com_mode=self.com_mode,
            td_scale=self.td_scale,
            selection=selection,  # type: ignore[arg-type]
            class_prompt=self.class_prompt,
            max_pixels=self.max_pixels or None,
            max_proposals=self.max_proposals or None,
            crop_backend=self.crop_backend,
        )


@dataclass(frozen=True)
class RunOptions:
    """A long run over many images: its feature cache and progress bars."""

    cache: Optional[Path] = option(None, help="Feature cache file [default: ~/.cache/bicm/features.sqlite].")
    no_cache: bool = option(False, "--no-cache", help="Compute everything, store nothing in the cache.")
    no_progress: bool = option(False, "--no-progress", help="No progress bars.")

    @property
    def cache_path(self) -> Path:
        """``--cache``, or ``features.sqlite`` under ``$XDG_CACHE_HOME/bicm`` (``~/.cache/bicm``)."""
        return self.cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bicm" / "features.sqlite"

    def feature_cache(self) -> Any:
        """The :class:`~bicm.cache.FeatureCache`, or ``None`` with ``--no-cache``."""
        if self.no_cache:
            return None
        from .cache import FeatureCache

        return FeatureCache(self.cache_path)


@dataclass(frozen=True)
class EngineOptions:
    """Where the per-image work runs: this process, or a Ray cluster (:mod:`bicm.cluster`).

    The results are the same either way; with ``ray`` the images are a Ray Dataset whose
    batches (whole images with all their queries) go to ``workers`` actors, each holding one
    model, and this process writes the run folder as the local engine does.
    """

    engine: Engine = option("local", help="local: this process; ray: a Ray cluster (needs the bicm[ray] extra; see README, Cluster).")
    ray_address: Optional[str] = option(
        None, help="Ray cluster to join (host:port of 'ray start --head', ray://host:10001, or auto) [default: start a local Ray runtime]."
    )
    workers: int = option(2, help="Ray actors, each loading the model once.")
    gpus_per_worker: float = option(0.0, help="GPUs each Ray actor reserves (e.g. 1, or 0.5 to put two on a GPU).")
    cpus_per_worker: float = option(1.0, help="CPUs each Ray actor reserves.")

    @property
    def on_cluster(self) -> bool:
        """Whether the work goes to Ray."""
        return self.engine == "ray"


def resolve_lambda_t(value: str, model: Optional[str], checkpoint: Optional[Path]) -> float:
    """``--lambda-t``: a number, or ``auto`` read from the model's card (``<weights>.json``)."""
    if value.strip().lower() != "auto":
        try:
            number = float(value)
        except ValueError:
            raise BicmError(f"--lambda-t must be a number or auto, not {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise BicmError(f"--lambda-t must be a finite number >= 0, not {value!r}")
        return number
    from .checkpoints import recorded_lambda_t

    found = recorded_lambda_t(model, checkpoint)
    if found is not None:
        return found
    raise BicmError(
        "--lambda-t auto: no calibrated lambda_t recorded for this model (a 'lambda_t' entry in the card beside its weights); "
        "compute one with 'bicm pseudo-label --calibrate-lambda-t' on unlabelled images and pass the number"
    )

