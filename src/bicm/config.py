"""The method's settings, declared once: :class:`BiCMConfig`, every choice and every default.

This module imports no torch, so the command line (``bicm --help``) and configuration code
can use it for free. :class:`bicm.Grounder` and the command line both read their choices and
defaults from here; :meth:`BiCMConfig.needs` says what a configuration needs computed per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Literal, Optional, get_args

from .errors import BicmError

__all__ = [
    "BiCMConfig",
    "Needs",
    "Component",
    "MapKind",
    "RegionRule",
    "ComMode",
    "TdScale",
    "SelectionPolicy",
    "Precision",
    "Amp",
    "CropBackend",
    "COMPONENTS",
    "ALL_COMPONENTS",
    "MAP_KINDS",
    "REGION_RULES",
    "COM_MODES",
    "TD_SCALES",
    "SELECTION_POLICIES",
    "PRECISIONS",
    "AMPS",
    "CROP_BACKENDS",
    "DEFAULT_THR_A",
    "DEFAULT_LAMBDA_T",
    "DEFAULT_LAMBDA_K",
    "DEFAULT_WORK_PIXELS",
    "DEFAULT_MAX_PROPOSALS",
    "DEFAULT_NAME_TEMPLATE",
    "config_dict",
    "paper_selection",
    "same_method",
]

Component = Literal["qam", "com", "sf", "kam"]
#: ``"qa"``: the query-aware map (QAM, Eqs. 1-5); ``"va"``: vanilla visual attention (Table 5).
MapKind = Literal["qa", "va"]
#: How ``P_t`` is cut from the thresholded map: the largest connected region, the region of
#: the peak, or all pixels above the threshold.
RegionRule = Literal["largest", "peak", "all"]
#: COM's terms (Table 6): ``S_PQ + S_CQ``, ``S_CQ`` alone, ``S_PQ`` alone.
ComMode = Literal["both", "class", "visual"]
#: The map ``S_TD`` averages: on its own scale (the paper) or min-max normalised.
TdScale = Literal["raw", "normalized"]
SelectionPolicy = Literal["argmax", "union-above-mean", "largest-above-mean"]
#: Weight dtype of the image encoder for crops and whole images (QAM's gradient path is fp32).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: Autocast for the encoders.
Amp = Literal["none", "bf16", "fp16"]
#: Where proposal crops are cut and resized: Pillow on the host (open_clip's transform,
#: exactly), tensor operations on the model's device (Pillow's taps; a level or two apart),
#: or ``auto``: tensor on CUDA, pil on a CPU (:func:`bicm.crops.resolve_crop_backend`).
CropBackend = Literal["pil", "tensor", "auto"]

COMPONENTS: tuple[str, ...] = ("qam", "com", "sf")
ALL_COMPONENTS: tuple[str, ...] = get_args(Component)
MAP_KINDS: tuple[str, ...] = get_args(MapKind)
REGION_RULES: tuple[str, ...] = get_args(RegionRule)
COM_MODES: tuple[str, ...] = get_args(ComMode)
TD_SCALES: tuple[str, ...] = get_args(TdScale)
SELECTION_POLICIES: tuple[str, ...] = get_args(SelectionPolicy)
PRECISIONS: tuple[str, ...] = get_args(Precision)
AMPS: tuple[str, ...] = get_args(Amp)
CROP_BACKENDS: tuple[str, ...] = get_args(CropBackend)

#: Threshold on the normalised map that cuts QAM's box ``P_t`` (Sec. 4.1).
DEFAULT_THR_A = 0.7
#: Weight of ``S_TD`` (Sec. 4.1), on the raw map scale of ViT-B/32 (see :mod:`bicm.fusion`).
DEFAULT_LAMBDA_T = 1000.0
#: Weight of ``S_KAM`` (Eq. 11).
DEFAULT_LAMBDA_K = 1.0
#: Images with more pixels are downscaled to this many before any work.
DEFAULT_WORK_PIXELS = 16_000_000
#: More proposals than this are cut to the highest-scoring ones.
DEFAULT_MAX_PROPOSALS = 1000
#: Prompt of each vocabulary name when CLIP names unnamed proposals.
DEFAULT_NAME_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Needs:
    """What one or several configurations need computed per image.

    Attributes
    ----------
    kinds: the attention maps (``"qa"``, ``"va"``).
    visual: proposal crop embeddings (``S_PQ``, and KAM's ``fp``).
    names: class-name embeddings (``S_CQ``, and KAM's ``fc``).
    kam: the whole-image embedding and everything KAM's MLP reads.
    """

    kinds: tuple[str, ...] = ()
    visual: bool = False
    names: bool = False
    kam: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(
            tuple(sorted(set(self.kinds) | set(other.kinds))),
            self.visual or other.visual,
            self.names or other.names,
            self.kam or other.kam,
        )

    @staticmethod
    def of(configs: Iterable["BiCMConfig"], kam_reads_names: bool = True) -> "Needs":
        """What all of ``configs`` need together (an evaluation of several ablation rows)."""
        total = Needs()
        for config in configs:
            total = total | config.needs(kam_reads_names)
        return total


@dataclass(frozen=True)
class BiCMConfig:
    """Settings of the method; defaults are the paper's (Sec. 4.1).

    Attributes
    ----------
    components: which of ``"qam"``, ``"com"``, ``"sf"``, ``"kam"`` run (Table 4). SF needs QAM;
        KAM needs COM (it re-scores COM's candidates) and a trained model on the Grounder.
    thr_a: threshold on the normalised map for the QAM box ``P_t`` (0.7).
    lambda_t: weight of the top-down score ``S_TD`` (1000, on the raw map scale).
    lambda_k: weight of the KAM score (1).
    attention: ``"qa"`` query-aware map (QAM) or ``"va"`` vanilla visual attention (Table 5).
    region_rule: how ``P_t`` is cut from the thresholded map (``"largest"`` connected region,
        ``"peak"`` region, or ``"all"`` pixels).
    com_mode: ``"both"`` (S_PQ + S_CQ), ``"class"`` (S_CQ) or ``"visual"`` (S_PQ) (Table 6).
    td_scale: ``"raw"`` map (paper) or ``"normalized"`` for ``S_TD``.
    selection: ``"argmax"``, ``"union-above-mean"`` (Flickr30K) or ``"largest-above-mean"``.
    class_prompt: template for class names, ``"{}"`` = the bare name.
    crop_batch_size: crops per CLIP forward; ``None`` (default): by device, 64 on a CPU and
        256 on a GPU (an image's proposals in one batch; measurements in
        ``benchmarks/README.md``). A speed setting only: the features are the same.
    query_chunk: queries whose attention maps are computed and scored together (32). The
        per-image work (proposals, crops, class names) is done once; the maps, QAM's backward
        and the S_TD tables exist for one chunk at a time, so a pass over an image with many
        queries holds at most this many maps. A memory setting only: the results are the same.
    min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
    qam_resize, crop_resize: override the model's resize mode (``"shortest"`` + center
        crop, ``"squash"``, ``"longest"`` + pad) for the whole-image view and for crops.
    max_pixels: images with more pixels are downscaled (with a warning) to this many before
        any work; boxes still come back in ORIGINAL image pixels (maps are at the working
        size). 16 MP keeps 12-MP phone photos as they are and bounds the per-query maps (raw +
        normalised float32, float64 integral image) to about 0.25 GB. ``None``: no limit.
    max_proposals: more proposals than this are cut (with a warning) to the highest-scoring
        ones (the first ones when they have no scores), in their original order. ``None``:
        no limit.
    crop_backend: where proposal crops are cut and resized: ``"pil"`` (default: open_clip's
        transform through Pillow, on the host), ``"tensor"`` (on the model's device, Pillow's
        geometry, values within a level or two) or ``"auto"`` (tensor on CUDA, pil on a CPU).
        Not a speed setting only: the crop features differ slightly (the guard in
        ``benchmarks/README.md`` measures how often the chosen box changes).
    """

    components: tuple[str, ...] = COMPONENTS
    thr_a: float = DEFAULT_THR_A
    lambda_t: float = DEFAULT_LAMBDA_T
    lambda_k: float = DEFAULT_LAMBDA_K
    attention: MapKind = "qa"
    region_rule: RegionRule = "largest"
    com_mode: ComMode = "both"
    td_scale: TdScale = "raw"
    selection: SelectionPolicy = "argmax"
    class_prompt: str = "{}"
    crop_batch_size: Optional[int] = None
    query_chunk: int = 32
    min_box_size: float = 1.0
    qam_resize: Optional[str] = None
    crop_resize: Optional[str] = None
    max_pixels: Optional[int] = DEFAULT_WORK_PIXELS
    max_proposals: Optional[int] = DEFAULT_MAX_PROPOSALS
    crop_backend: CropBackend = "pil"

    def __post_init__(self) -> None:
        comps = tuple(dict.fromkeys(str(c).strip().lower() for c in self.components if str(c).strip()))
        object.__setattr__(self, "components", comps)
        unknown = [c for c in comps if c not in ALL_COMPONENTS]
        if unknown or not comps:
            raise BicmError(f"unknown components {unknown or comps}; choose from qam, com, sf, kam")
        if "sf" in comps and "qam" not in comps:
            raise BicmError("SF fuses the QAM map into the scores: add qam to the components")
        if "kam" in comps and "com" not in comps:
            raise BicmError("KAM re-scores COM's candidate boxes: add com to the components")
        checks = {
            "attention": (self.attention, MAP_KINDS),
            "region rule": (self.region_rule, REGION_RULES),
            "COM mode": (self.com_mode, COM_MODES),
            "top-down scale": (self.td_scale, TD_SCALES),
            "selection policy": (self.selection, SELECTION_POLICIES),
            "crop backend": (self.crop_backend, CROP_BACKENDS),
        }
        for what, (value, allowed) in checks.items():
            if value not in allowed:
                raise BicmError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        if not 0.0 <= self.thr_a <= 1.0:
            raise BicmError(f"thr_a must be within [0, 1], got {self.thr_a}")
        if self.crop_batch_size is not None and self.crop_batch_size < 1:
            raise BicmError("crop batch size must be at least 1")
        if self.query_chunk < 1:
            raise BicmError("query chunk must be at least 1")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise BicmError(f"max_pixels must be at least 1 (or None for no limit), got {self.max_pixels}")
        if self.max_proposals is not None and self.max_proposals < 1:
            raise BicmError(f"max_proposals must be at least 1 (or None for no limit), got {self.max_proposals}")
        if self.class_prompt.count("{}") != 1:
            raise BicmError(f"class prompt must contain exactly one {{}}, got {self.class_prompt!r}")

    def replace(self, **changes: Any) -> "BiCMConfig":
        """The same config with some fields changed (validated again)."""
        return replace(self, **changes)

    # What runs ------------------------------------------------------------------------
    @property
    def uses_qam(self) -> bool:
        return "qam" in self.components

    @property
    def uses_com(self) -> bool:
        return "com" in self.components

    @property
    def uses_sf(self) -> bool:
        return "sf" in self.components

    @property
    def uses_kam(self) -> bool:
        return "kam" in self.components

    @property
    def uses_visual(self) -> bool:
        """COM scores proposal crops (``S_PQ``, Eq. 6)."""
        return self.uses_com and self.com_mode in ("both", "visual")

    @property
    def uses_names(self) -> bool:
        """COM scores class names (``S_CQ``, Eq. 7), where the proposals have them."""
        return self.uses_com and self.com_mode in ("both", "class")

    def needs(self, kam_reads_names: bool = True) -> Needs:
        """What this config needs computed per image. KAM reads the crops, and the class
        names when its model learned them (``kam_reads_names``)."""
        kam = self.uses_kam
        return Needs(
            kinds=(self.attention,) if self.uses_qam else (),
            visual=self.uses_visual or kam,
            names=self.uses_names or (kam and kam_reads_names),
            kam=kam,
        )


def paper_selection(dataset: str) -> str:
    """The paper's selection protocol (Sec. 4.1): the union of the above-mean boxes on
    Flickr30K (phrases may cover several boxes), the largest above-mean box on ReferItGame and
    the RefCOCO family. The shapes world's two protocols follow the datasets they stand for
    (``shapes-phrase``: Flickr30K, ``shapes-ref``: RefCOCO); ``jsonl`` takes the argmax, the
    method as described."""
    if dataset in ("flickr", "flickr30k_entities", "shapes-phrase"):
        return "union-above-mean"
    if dataset in ("referit", "refclef", "unc", "unc+", "gref", "gref_umd", "refcoco", "refcoco+", "refcocog", "shapes-ref"):
        return "largest-above-mean"
    return "argmax"


def config_dict(config: BiCMConfig) -> dict[str, Any]:
    """The config as plain JSON-ready data."""
    out = asdict(config)
    out["components"] = list(config.components)
    return out


#: Fields that change speed or memory, never results.
SPEED_FIELDS = ("crop_batch_size", "query_chunk")


#: Fields added after runs were recorded without them, with the value those runs used.
_ADDED_FIELDS = {"crop_backend": "pil"}


def same_method(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`config_dict` results give the same results (speed settings aside;
    a field a run file predates counts as its old behaviour)."""

    def method(d: dict[str, Any]) -> dict[str, Any]:
        return {**_ADDED_FIELDS, **{k: v for k, v in d.items() if k not in SPEED_FIELDS}}

    return method(a) == method(b)
