"""The public API: :class:`Grounder` (BiCM: QAM + COM + SF, + KAM) and its config and results.

>>> from bicm import Grounder
>>> g = Grounder.from_pretrained("ViT-B-32", "openai")            # or checkpoint="clip.pt"
>>> r = g.ground("photo.jpg", "the bird on the left", proposals=boxes_xyxy)
>>> r.box, r.score

With a trained KAM model (``bicm train-kam``): ``Grounder.from_pretrained(..., kam="kam.safetensors")``
adds ``lambda_k * S_KAM`` to the fused score (Eq. 11).
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from .backbone import Backbone, load_backbone
from .cache import FeatureCache
from .com import ClassNameEncoder, ComMode, bottom_up
from .encoder import Encoder
from .errors import BicmError, warn
from .fusion import SELECTION_POLICIES, SelectionPolicy, box_means, fuse, integral_image, select
from .imageio import ImageSource, image_digest, load_image
from .kam import KamModel
from .preprocess import preprocess
from .proposals import Proposals
from .proposals.naming import ClipNamer
from .proposals.sources import FileSource, OracleSource, ProposalSource
from .qam import AttentionMaps, MapKind, RegionRule, compute_maps, threshold_box

__all__ = ["BiCMConfig", "Candidates", "GroundingResult", "Grounder", "ImageFeatures", "COMPONENTS", "ALL_COMPONENTS"]

COMPONENTS: tuple[str, ...] = ("qam", "com", "sf")
ALL_COMPONENTS: tuple[str, ...] = COMPONENTS + ("kam",)

#: Default working-size limit (pixels) and proposal cap; see :class:`BiCMConfig`.
DEFAULT_WORK_PIXELS = 16_000_000
DEFAULT_MAX_PROPOSALS = 1000

Box = tuple[float, float, float, float]
ProposalsLike = Union[Proposals, torch.Tensor, Sequence[Sequence[float]], None]


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
    crop_batch_size: crops per CLIP forward; ``None`` (default): by device, 64 on a CPU (the
        fastest of 16-128 for bf16 on an AMX Xeon; flat from 16 to 128 in fp32 on an EPYC) and
        256 on a GPU (an image's proposals in one batch).
        A speed setting only: the features are the same.
    query_chunk: queries whose attention maps are computed and scored together (32). The
        per-image work (proposals, crops, class names) is done once; the maps, QAM's backward
        and the S_TD tables exist for one chunk at a time, so a pass over an image with many
        queries (:func:`bicm.evaluate.evaluate`) holds at most this many maps. A memory
        setting only: the results are the same.
    min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
    qam_resize, crop_resize: override the model's resize mode (``"shortest"`` + center
        crop, ``"squash"``, ``"longest"`` + pad) for the whole-image view and for crops.
    max_pixels: images with more pixels are downscaled (with a warning) to this many before
        any work; boxes still come back in ORIGINAL image pixels (maps are at the working
        size). 16 MP keeps 12-MP phone photos and every benchmark image as they are and
        bounds the per-query maps (raw + normalised float32, float64 integral image) to
        about 0.25 GB. ``None``: no limit.
    max_proposals: more proposals than this are cut (with a warning) to the highest-scoring
        ones (the first ones when they have no scores), in their original order. ``None``:
        no limit.
    """

    components: tuple[str, ...] = COMPONENTS
    thr_a: float = 0.7
    lambda_t: float = 1000.0
    lambda_k: float = 1.0
    attention: MapKind = "qa"
    region_rule: RegionRule = "largest"
    com_mode: ComMode = "both"
    td_scale: str = "raw"
    selection: SelectionPolicy = "argmax"
    class_prompt: str = "{}"
    crop_batch_size: Optional[int] = None
    query_chunk: int = 32
    min_box_size: float = 1.0
    qam_resize: Optional[str] = None
    crop_resize: Optional[str] = None
    max_pixels: Optional[int] = DEFAULT_WORK_PIXELS
    max_proposals: Optional[int] = DEFAULT_MAX_PROPOSALS

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
            "attention": (self.attention, ("qa", "va")),
            "region rule": (self.region_rule, ("largest", "peak", "all")),
            "COM mode": (self.com_mode, ("both", "class", "visual")),
            "top-down scale": (self.td_scale, ("raw", "normalized")),
            "selection policy": (self.selection, SELECTION_POLICIES),
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
        return replace(self, **changes)


@dataclass
class Candidates:
    """The boxes one query chose from, with every component score.

    Attributes
    ----------
    boxes: ``(K, 4)`` xyxy pixels. The QAM box ``P_t`` (if any) is last.
    class_names: one per box (``None`` where unknown).
    qam_index: index of ``P_t`` in ``boxes``, or ``None``.
    s_pq, s_cq, s_td, s_kam: ``(K,)`` component scores, ``None`` where that component did not run.
    fused: ``(K,)`` the score the selection used.
    """

    boxes: torch.Tensor
    class_names: list[Optional[str]]
    qam_index: Optional[int]
    s_pq: Optional[torch.Tensor]
    s_cq: Optional[torch.Tensor]
    s_td: Optional[torch.Tensor]
    fused: torch.Tensor
    s_kam: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_list(self) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {
                "box": [round(float(v), 2) for v in self.boxes[i].tolist()],
                "class_name": self.class_names[i],
                "source": "qam" if i == self.qam_index else "proposal",
            }
            for name in ("s_pq", "s_cq", "s_td", "s_kam"):
                value = getattr(self, name)
                row[name] = None if value is None else float(value[i])
            row["score"] = float(self.fused[i])
            rows.append(row)
        return rows


@dataclass
class GroundingResult:
    """What :meth:`Grounder.ground` found for one query.

    Attributes
    ----------
    query: the phrase.
    box: chosen ``(x1, y1, x2, y2)`` in original-image pixels, or ``None`` when there was
        nothing to choose from (no proposals and a flat QAM map).
    score: fused score of the chosen candidate (the highest among a union).
    selected: indices into ``candidates`` that make ``box``.
    candidates: every candidate with its component scores.
    attention_raw: ``(H, W)`` map on its own scale, or ``None`` without QAM. ``(H, W)`` is the
        image's size, or its working size when it was downscaled (``BiCMConfig.max_pixels``).
    attention: ``(H, W)`` min-max normalised map, or ``None``.
    qam_box: ``P_t`` or ``None``.
    s_iq: whole-image / query cosine similarity (QAM's Eq. 2), or ``None``.
    view_box: the part of the image CLIP's whole-image view covers (its center crop), or
        ``None`` without QAM; the map is 0 outside it.
    components: the components that ran.
    image_size: ``(width, height)``.
    selection: the selection policy.
    proposal_source: id of the proposals' source (``oracle:ground-truth`` for ground truth).
    notes: things worth knowing about this result (e.g. COM without class names).
    """

    query: str
    box: Optional[Box]
    score: Optional[float]
    selected: list[int]
    candidates: Candidates
    attention_raw: Optional[torch.Tensor]
    attention: Optional[torch.Tensor]
    qam_box: Optional[Box]
    s_iq: Optional[float]
    view_box: Optional[Box]
    components: tuple[str, ...]
    image_size: tuple[int, int]
    selection: str = "argmax"
    proposal_source: str = "user"
    notes: list[str] = field(default_factory=list)

    def to_dict(self, candidates: bool = True) -> dict[str, Any]:
        """JSON-ready dict (no maps)."""
        out: dict[str, Any] = {
            "query": self.query,
            "box": None if self.box is None else [round(v, 2) for v in self.box],
            "score": self.score,
            "selected": self.selected,
            "components": list(self.components),
            "selection": self.selection,
            "proposal_source": self.proposal_source,
            "qam_box": None if self.qam_box is None else [round(v, 2) for v in self.qam_box],
            "s_iq": self.s_iq,
            "view_box": None if self.view_box is None else [round(v, 2) for v in self.view_box],
            "image_size": list(self.image_size),
            "notes": self.notes,
        }
        if candidates:
            out["candidates"] = self.candidates.to_list()
        return out


class Grounder:
    """BiCM without training: QAM + COM + SF over a CLIP backbone.

    Parameters
    ----------
    backbone: a loaded :class:`~bicm.backbone.Backbone`.
    config: :class:`BiCMConfig` (paper defaults).
    namer: names proposals that come without class names (CLIP zero-shot over a
        vocabulary, see :class:`~bicm.proposals.naming.ClipNamer`), so COM can use S_CQ.
    cache: a :class:`~bicm.cache.FeatureCache` for text, crop and proposal computations.
    kam: a trained :class:`~bicm.kam.KamModel` (or its file) for the ``"kam"`` component; it
        must have been trained on this backbone. Giving one adds ``"kam"`` to the components
        of the default config.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: Optional[BiCMConfig] = None,
        *,
        class_names: Optional[ClassNameEncoder] = None,
        namer: Optional[ClipNamer] = None,
        cache: Optional[FeatureCache] = None,
        kam: Union["KamModel", str, Path, None] = None,
    ) -> None:
        self.backbone = backbone
        if kam is not None and not isinstance(kam, KamModel):
            kam = KamModel.load(kam)
        if kam is not None:
            kam.check_backbone(backbone.fingerprint(), backbone.name)
            kam.to(backbone.device)
            if config is None:
                config = BiCMConfig(components=COMPONENTS + ("kam",))
        self.kam: Optional[KamModel] = kam
        self.config = config or BiCMConfig()
        if "kam" in self.config.components and self.kam is None:
            raise BicmError("the kam component needs a trained KAM model (kam=PATH; see 'bicm train-kam')")
        self.namer = namer
        self.encoder = Encoder(backbone, cache)
        if class_names is None or class_names.template != self.config.class_prompt:
            class_names = ClassNameEncoder(backbone, self.config.class_prompt, self.encoder.text)
        self.class_names = class_names
        if "qam" in self.config.components:
            problem = backbone.qam_unsupported_reason()
            if problem:
                raise BicmError(problem)

    @classmethod
    def from_pretrained(
        cls,
        model: Optional[str] = None,
        pretrained: Optional[str] = None,
        *,
        checkpoint: Union[str, Path, None] = None,
        device: str = "auto",
        amp: Optional[str] = None,
        quick_gelu: Optional[bool] = None,
        config: Optional[BiCMConfig] = None,
        name_with: Optional[str] = None,
        kam: Union[str, Path, None] = None,
        precision: str = "fp32",
        compile: bool = False,
        **overrides: Any,
    ) -> "Grounder":
        """Load a backbone (see :func:`bicm.backbone.load_backbone`) and build a Grounder.

        ``precision`` is the weight dtype of the image encoder for proposal crops and whole
        images: ``"fp32"`` (default: exact), ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"`` (bf16
        where the GPU or CPU multiplies it natively: several times faster there; the command
        line's default). QAM's gradient path stays fp32. ``compile=True`` runs that encoder
        through ``torch.compile`` (compiles on the first image; for long runs).

        ``name_with`` (``"vg1600"``, ``"coco80"`` or a vocabulary file) names unnamed
        proposals by CLIP zero-shot classification. ``kam`` is a KAM model file
        (``bicm train-kam``): the default components become QAM+COM+SF+KAM. Keyword
        ``overrides`` replace fields of ``config``, e.g. ``components=("com",)``.
        """
        if config is None and kam is not None:
            config = BiCMConfig(components=COMPONENTS + ("kam",))
        config = (config or BiCMConfig()).replace(**overrides) if overrides else (config or BiCMConfig())
        backbone = load_backbone(
            model, pretrained, checkpoint, device=device, amp=amp, quick_gelu=quick_gelu, precision=precision, compile=compile
        )
        grounder = cls(backbone, config, kam=kam)
        if name_with is not None:
            grounder.namer = ClipNamer(backbone, name_with, encode_text=grounder.encoder.text)
        return grounder

    def with_config(self, **changes: Any) -> "Grounder":
        """A Grounder on the same backbone (and class-name cache) with some settings changed."""
        return Grounder(
            self.backbone,
            self.config.replace(**changes),
            class_names=self.class_names,
            namer=self.namer,
            cache=self.encoder.cache,
            kam=self.kam,
        )

    # ------------------------------------------------------------------------------------
    def ground(self, image: Union[ImageSource, Image.Image], query: str, proposals: ProposalsLike = None) -> GroundingResult:
        """Ground one phrase. See :meth:`ground_many`."""
        return self.ground_many(image, [query], proposals)[0]

    def ground_many(
        self, image: Union[ImageSource, Image.Image], queries: Sequence[str], proposals: ProposalsLike = None
    ) -> list[GroundingResult]:
        """Ground several phrases in one image, sharing all per-image work.

        Parameters
        ----------
        image: path or PIL image (converted to RGB; EXIF orientation applied to files).
        queries: phrases, e.g. ``["the bird on the left", "a red ball"]``.
        proposals: :class:`~bicm.proposals.Proposals`, an ``(N, 4)`` xyxy tensor / list, a
            :class:`~bicm.proposals.sources.ProposalSource` (called on the image), or
            ``None`` (QAM's box alone). Boxes outside the image are clipped, degenerate ones
            dropped (with a warning). Unnamed proposals are named by the Grounder's
            ``namer`` when it has one.

        Returns
        -------
        One :class:`GroundingResult` per query, in order. Queries are processed
        ``config.query_chunk`` at a time after the per-image work (see :meth:`iter_extract`).
        """
        chunks = self.iter_extract(image, queries, proposals, chunk=self.config.query_chunk)
        return [result for features in chunks for result in self.score(features)]

    def extract(
        self,
        image: Union[ImageSource, Image.Image],
        queries: Sequence[str],
        proposals: ProposalsLike = None,
        *,
        kinds: Optional[Sequence[str]] = None,
        visual: Optional[bool] = None,
        names: Optional[bool] = None,
        image_key: Optional[str] = None,
        kam: Optional[bool] = None,
    ) -> "ImageFeatures":
        """Everything per image the scoring needs, computed once (see :meth:`score`).

        By default only what this Grounder's config uses; an evaluation of several ablation
        rows asks for more at once: ``kinds=("qa", "va")`` (both attention maps),
        ``visual=True`` (crop embeddings), ``names=True`` (class-name embeddings),
        ``kam=True`` (the whole-image embedding and everything KAM's MLP reads).
        ``image_key`` names the image for file-based proposal sources (default: its path).
        All queries in one piece; :meth:`iter_extract` streams them.
        """
        needs = dict(kinds=kinds, visual=visual, names=names, image_key=image_key, kam=kam)
        queries = [queries] if isinstance(queries, str) else list(queries)
        return next(iter(self.iter_extract(image, queries, proposals, chunk=len(queries), **needs)))

    def iter_extract(
        self,
        image: Union[ImageSource, Image.Image],
        queries: Sequence[str],
        proposals: ProposalsLike = None,
        *,
        chunk: Optional[int] = None,
        kinds: Optional[Sequence[str]] = None,
        visual: Optional[bool] = None,
        names: Optional[bool] = None,
        image_key: Optional[str] = None,
        kam: Optional[bool] = None,
    ) -> Iterator["ImageFeatures"]:
        """:meth:`extract` streamed over the queries: the per-image work (image, proposals,
        crop, class-name and whole-image embeddings) is done once, then one
        :class:`ImageFeatures` is yielded per ``chunk`` queries (default
        ``config.query_chunk``), in order, sharing those tensors. Only the current chunk's
        text, attention maps and QAM boxes are made, so memory is bounded by the chunk, not
        by the number of queries. The work is done as the iterator is consumed.
        """
        cfg = self.config
        comps = cfg.components
        if kinds is None:
            kinds = (cfg.attention,) if "qam" in comps else ()
        if kam is None:
            kam = "kam" in comps
        if visual is None:
            visual = "com" in comps and cfg.com_mode in ("both", "visual")
        if names is None:
            names = "com" in comps and cfg.com_mode in ("both", "class")
        visual = visual or kam  # KAM reads the crops, and the class names where it learned them
        names = names or (kam and (self.kam is None or self.kam.use_names))
        for kind in kinds:
            if kind not in ("qa", "va"):
                raise BicmError(f"unknown attention map {kind!r}; use qa or va")
        if kinds and self.backbone.qam_unsupported_reason():
            raise BicmError(self.backbone.qam_unsupported_reason() or "")
        queries = _check_queries(queries)
        chunk = chunk or cfg.query_chunk
        if chunk < 1:
            raise BicmError("query chunk must be at least 1")
        original = load_image(image)
        width, height = original.size
        # Work on at most cfg.max_pixels pixels; boxes in and out stay in ORIGINAL pixels.
        pil, scale = _working_image(original, cfg.max_pixels)
        digest = image_digest(pil)  # the image's identity for the proposal and feature caches (~1 ms)
        if isinstance(proposals, ProposalSource):
            key = image_key or (None if isinstance(image, Image.Image) else str(image))
            if scale != (1.0, 1.0) and not isinstance(proposals, (FileSource, OracleSource)):
                found = self.encoder.proposals(proposals, pil, key, digest)  # computed on the working image
                proposals = _scaled(found, scale)
            else:  # files hold boxes in original pixels
                proposals = self.encoder.proposals(proposals, pil, key, digest)
        props = _as_proposals(proposals)
        cleaned = props.sanitize(width, height, cfg.min_box_size)
        if cleaned.n_clipped:
            warn(f"{cleaned.n_clipped} proposal box(es) reach outside the {width}x{height} image; clipped")
        if cleaned.n_dropped:
            warn(f"{cleaned.n_dropped} degenerate proposal box(es) dropped (empty, inverted or under {cfg.min_box_size:g} px)")
        props = _capped(cleaned.proposals, cfg.max_proposals)
        work_props = _scaled(props, (1.0 / scale[0], 1.0 / scale[1]))  # the same boxes on the working image
        notes: list[str] = []
        if props.is_oracle:
            notes.append("ORACLE: the proposals are ground-truth boxes (analysis only, not a real result)")

        device = self.backbone.device
        crop_spec = self.backbone.spec.with_resize_mode(cfg.crop_resize)
        crop_batch = cfg.crop_batch_size or default_crop_batch(self.backbone.device)
        crop_feats: Optional[torch.Tensor] = None  # (N, E), computed at most once
        if self.namer is not None and (visual or names) and len(props) and not props.fully_named:
            crop_feats = self.encoder.crops(pil, work_props.boxes, crop_spec, crop_batch, digest)
            named = self.namer.name(work_props, pil, crop_feats)
            props = props.with_names(named.class_names or [None] * len(props), named.name_scores)
            notes.append(f"proposals named by CLIP over {self.namer.vocabulary.name}")
        if visual and crop_feats is None:
            crop_feats = self.encoder.crops(pil, work_props.boxes, crop_spec, crop_batch, digest)
        name_feats = None
        if names and props.fully_named and len(props):
            name_feats = self.class_names([c or "" for c in props.class_names or []])

        image_feat = self.encoder.image(pil, self.backbone.spec, digest) if kam else None  # (E,)
        view_box: Optional[Box] = None
        if kinds:
            pixels, geometry = preprocess(pil, self.backbone.spec.with_resize_mode(cfg.qam_resize))
            view_box = geometry.visible_box()
        for start in range(0, len(queries), chunk):
            part = queries[start : start + chunk]
            text = self.encoder.text(part)  # (Q, E)
            maps: dict[str, AttentionMaps] = {}
            qam_boxes: dict[str, list[Optional[Box]]] = {}
            for kind in kinds:
                maps[kind] = compute_maps(self.backbone, pixels, geometry, text, kind)  # type: ignore[arg-type]
                qam_boxes[kind] = _qam_boxes(maps[kind], cfg)
            qam_crops: dict[Box, torch.Tensor] = {}
            unique = sorted({b for boxes in qam_boxes.values() for b in boxes if b is not None})
            if visual and unique:
                feats = self.encoder.crops(pil, torch.tensor(unique), crop_spec, crop_batch, digest)
                qam_crops = dict(zip(unique, feats))
            yield ImageFeatures(
                queries=part,
                image_size=(width, height),
                proposals=props,
                text=text.to(device),
                crop_feats=crop_feats,
                name_feats=name_feats,
                maps=maps,
                qam_boxes=qam_boxes,
                qam_crop_feats=qam_crops,
                view_box=view_box,
                notes=list(notes),
                image_feat=image_feat,
                scale=scale,
            )
            del maps, qam_boxes, qam_crops, text  # this chunk's maps go before the next chunk's are made

    def score(self, features: "ImageFeatures", config: Optional[BiCMConfig] = None) -> list[GroundingResult]:
        """Fuse and select for every query of ``features`` under ``config`` (default: own).

        Cheap: no CLIP forward. Different configs (the ablation rows) can score the same
        features, as long as :meth:`extract` computed what they use.
        """
        cfg = config or self.config
        f = features
        comps = cfg.components
        use_qam, use_com, use_sf, use_kam = "qam" in comps, "com" in comps, "sf" in comps, "kam" in comps
        if use_kam and self.kam is None:
            raise BicmError("the kam component needs a trained KAM model (kam=PATH; see 'bicm train-kam')")
        if use_kam and f.image_feat is None:
            raise ValueError("the features hold no image embedding; extract(kam=True) must compute it")
        props = f.proposals
        notes = list(f.notes)
        use_props = (use_com or use_sf) and len(props) > 0
        if (use_com or use_sf) and len(props) == 0:
            if not use_qam:
                raise BicmError("no proposals and QAM is off: nothing to choose from (pass proposals or add qam)")
            notes.append("no proposals: QAM's box is the only candidate")
        if use_com and cfg.com_mode == "class" and use_props and not props.fully_named:
            raise BicmError("COM in class-name mode needs proposals that all have class names")
        maps = f.maps.get(cfg.attention) if use_qam else None
        if use_qam and maps is None:
            raise ValueError(f"the features hold no {cfg.attention!r} map; extract(kinds=...) must include it")
        qam_boxes = f.qam_boxes.get(cfg.attention, [None] * len(f.queries)) if use_qam else [None] * len(f.queries)
        if use_qam and not any(qam_boxes):
            notes.append("the attention map is flat: QAM proposes no box")

        use_visual = use_com and cfg.com_mode in ("both", "visual")
        use_names = use_com and cfg.com_mode in ("both", "class") and use_props and props.fully_named
        if use_com and cfg.com_mode == "both" and use_props and not use_names:
            notes.append("proposals carry no class names for every box: COM used S_PQ alone")
        if use_visual and use_props and f.crop_feats is None:
            raise ValueError("the features hold no crop embeddings; extract(visual=True) must compute them")
        if use_names and f.name_feats is None:
            raise ValueError("the features hold no class-name embeddings; extract(names=True) must compute them")

        text = f.text
        q = len(f.queries)
        base = props.boxes.to(text.device) if use_props else torch.zeros(0, 4, device=text.device)  # original pixels
        n = base.shape[0]
        to_original = torch.tensor([f.scale[0], f.scale[1]] * 2, device=text.device)  # working -> original pixels
        work_base = base / to_original  # the maps live on the working image
        s_pq = text @ f.crop_feats.T if use_visual and use_props else None  # (Q, N)
        s_cq = text @ f.name_feats.T if use_names else None  # (Q, N)

        # QAM box per query: S_PQ from its crop, class name of the max-S_CQ proposal
        qam_pq = torch.full((q,), float("nan"), device=text.device)
        qam_cq = torch.full((q,), float("nan"), device=text.device)
        qam_names: list[Optional[str]] = [None] * q
        if use_visual:
            for i, b in enumerate(qam_boxes):
                if b is not None:
                    qam_pq[i] = text[i] @ f.qam_crop_feats[b]
        best_name: Optional[torch.Tensor] = None  # (Q,) proposal whose class name P_t takes
        if s_cq is not None and n > 0:
            best_name = s_cq.argmax(dim=1)
            qam_cq = s_cq.gather(1, best_name[:, None]).squeeze(1)
            qam_names = [props.class_names[int(j)] for j in best_name.tolist()]  # type: ignore[index]

        td_table = None
        if maps is not None:
            td_table = integral_image(maps.raw if cfg.td_scale == "raw" else maps.normalized)
        s_td_props = box_means(td_table, work_base) if td_table is not None else None  # (Q, N)

        results = []
        for i, query in enumerate(f.queries):
            boxes = base
            cand_names: list[Optional[str]] = list(props.class_names or [None] * n) if use_props else []
            pq = s_pq[i] if s_pq is not None else None
            cq = s_cq[i] if s_cq is not None else None
            td = s_td_props[i] if s_td_props is not None else None
            qam_index = None
            if qam_boxes[i] is not None:
                qam_index = boxes.shape[0]
                qb = torch.tensor([qam_boxes[i]], dtype=torch.float32, device=boxes.device)
                boxes = torch.cat([boxes, qb * to_original])
                cand_names.append(qam_names[i])
                pq = None if pq is None else torch.cat([pq, qam_pq[i : i + 1]])
                cq = None if cq is None else torch.cat([cq, qam_cq[i : i + 1]])
                if td_table is not None:
                    td = torch.cat([td, box_means(td_table[i : i + 1], qb)[0]])
            if boxes.shape[0] == 0:
                view = _scale_box(f.view_box, f.scale)
                results.append(_empty_result(query, maps, i, view, comps, f.image_size, cfg, notes, props.source))
                continue
            s_bu = bottom_up(pq, cq) if use_com else None
            kam = None
            if use_kam:
                assert self.kam is not None and f.image_feat is not None
                fp, fc = _candidate_feats(f, i, use_props, qam_boxes[i], best_name, self.kam.use_names)
                kam = self.kam.scores(f.image_feat, text[i], fp, fc)
            if s_bu is None and not use_sf:
                fused = td * cfg.lambda_t  # QAM alone: its one box, scored top-down
            else:
                fused = fuse(s_bu, td if use_sf else None, cfg.lambda_t, kam, cfg.lambda_k)
            box, chosen = select(boxes, fused, cfg.selection)
            cands = Candidates(
                boxes=boxes.cpu(),
                class_names=cand_names,
                qam_index=qam_index,
                s_pq=None if pq is None else pq.cpu(),
                s_cq=None if cq is None else cq.cpu(),
                s_td=None if td is None else td.cpu(),
                fused=fused.cpu(),
                s_kam=None if kam is None else kam.cpu(),
            )
            results.append(
                GroundingResult(
                    query=query,
                    box=box,
                    score=float(fused[chosen].max()),
                    selected=chosen,
                    candidates=cands,
                    attention_raw=None if maps is None else maps.raw[i].cpu(),
                    attention=None if maps is None else maps.normalized[i].cpu(),
                    qam_box=_scale_box(qam_boxes[i], f.scale),
                    s_iq=None if maps is None else float(maps.s_iq[i]),
                    view_box=_scale_box(f.view_box, f.scale) if use_qam else None,
                    components=comps,
                    image_size=f.image_size,
                    selection=cfg.selection,
                    proposal_source=props.source,
                    notes=notes,
                )
            )
        return results

    def candidate_features(
        self, features: "ImageFeatures", index: int, config: Optional[BiCMConfig] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-candidate inputs of KAM's MLP for query ``index``, in :meth:`score`'s order.

        Returns ``fp`` ``(K, E)`` crop embeddings and ``fc`` ``(K, E)`` class-name embeddings
        (``None`` without names) of the proposals followed by QAM's box ``P_t`` (which takes
        the class name of the proposal with the highest S_CQ).
        """
        cfg = config or self.config
        f = features
        if f.crop_feats is None and len(f.proposals):
            raise ValueError("the features hold no crop embeddings; extract(visual=True) must compute them")
        qam_box = f.qam_boxes.get(cfg.attention, [None] * len(f.queries))[index] if "qam" in cfg.components else None
        best = None
        if f.name_feats is not None and len(f.proposals):
            best = (f.text @ f.name_feats.T).argmax(dim=1)
        return _candidate_feats(f, index, len(f.proposals) > 0, qam_box, best, True)


def _candidate_feats(
    f: "ImageFeatures", i: int, use_props: bool, qam_box: Optional[Box], best_name: Optional[torch.Tensor], names: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    e = f.text.shape[1]
    device = f.text.device
    fp = f.crop_feats if use_props and f.crop_feats is not None else torch.zeros(0, e, device=device)
    fc = f.name_feats if (names and use_props and f.name_feats is not None) else None
    if qam_box is not None:
        fp = torch.cat([fp, f.qam_crop_feats[qam_box].reshape(1, e).to(fp)])
        if fc is not None and best_name is not None:
            fc = torch.cat([fc, fc[int(best_name[i])].reshape(1, e)])
    if fc is not None and fc.shape[0] != fp.shape[0]:
        fc = None
    return fp, fc


@dataclass
class ImageFeatures:
    """The per-image work of BiCM, independent of how the scores are fused.

    Attributes
    ----------
    queries: the (cleaned) phrases, Q of them.
    image_size: ``(width, height)``.
    proposals: the proposals after clipping, dropping and naming (N boxes).
    text: ``(Q, E)`` query embeddings.
    crop_feats: ``(N, E)`` proposal crop embeddings, or ``None``.
    name_feats: ``(N, E)`` class-name embeddings, or ``None``.
    maps: attention maps by kind (``"qa"``, ``"va"``), each ``(Q, H, W)``.
    qam_boxes: QAM's box ``P_t`` per query, by kind (working-image pixels).
    qam_crop_feats: crop embedding of every distinct QAM box.
    view_box: the part of the image CLIP's whole-image view covers (working-image pixels).
    notes: things worth knowing (naming, oracle proposals).
    image_feat: ``(E,)`` whole-image embedding (KAM's ``fi``), or ``None``.
    scale: ``(sx, sy)``, original pixels per working-image pixel (``(1, 1)`` unless the image
        was larger than ``max_pixels``). ``proposals`` are in original pixels; maps, QAM boxes
        and ``view_box`` in working-image pixels; :meth:`Grounder.score` returns original pixels.
    """

    queries: list[str]
    image_size: tuple[int, int]
    proposals: Proposals
    text: torch.Tensor
    crop_feats: Optional[torch.Tensor]
    name_feats: Optional[torch.Tensor]
    maps: dict[str, AttentionMaps]
    qam_boxes: dict[str, list[Optional[Box]]]
    qam_crop_feats: dict[Box, torch.Tensor]
    view_box: Optional[Box]
    notes: list[str]
    image_feat: Optional[torch.Tensor] = None
    scale: tuple[float, float] = (1.0, 1.0)


def default_crop_batch(device: torch.device) -> int:
    """Crops per forward when the config leaves it open: 64 on a CPU, 256 on a GPU."""
    return 256 if device.type == "cuda" else 64


def _working_image(image: Image.Image, max_pixels: Optional[int]) -> tuple[Image.Image, tuple[float, float]]:
    """``image`` downscaled to at most ``max_pixels`` pixels (aspect kept), and ``(sx, sy)``:
    original pixels per working pixel."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image, (1.0, 1.0)
    factor = (max_pixels / (width * height)) ** 0.5
    new_w, new_h = max(1, int(width * factor)), max(1, int(height * factor))
    warn(
        f"image of {width}x{height} = {width * height:,} pixels downscaled to {new_w}x{new_h} to work on at most "
        f"{max_pixels:,} pixels (max_pixels / --max-pixels); boxes are in the original pixels"
    )
    work = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    return work, (width / new_w, height / new_h)


def _scaled(proposals: Proposals, scale: tuple[float, float]) -> Proposals:
    """The same proposals with x multiplied by ``scale[0]`` and y by ``scale[1]``."""
    if scale == (1.0, 1.0):
        return proposals
    factor = torch.tensor([scale[0], scale[1]] * 2, dtype=torch.float32)
    p = proposals
    return Proposals(p.boxes * factor, p.scores, p.class_names, p.source, dict(p.meta), p.name_scores)


def _capped(proposals: Proposals, limit: Optional[int]) -> Proposals:
    """At most ``limit`` proposals: the highest-scoring (or the first) ones, in their order."""
    n = len(proposals)
    if limit is None or n <= limit:
        return proposals
    if proposals.scores is not None:
        order = torch.argsort(proposals.scores, descending=True, stable=True)[:limit]
        keep, which = order.sort().values, "highest-scoring"
    else:
        keep, which = torch.arange(limit), "first"
    warn(f"{n} proposals are more than max_proposals / --max-proposals = {limit}; kept the {limit} {which}")
    return proposals.subset(keep)


def _scale_box(box: Optional[Box], scale: tuple[float, float]) -> Optional[Box]:
    if box is None or scale == (1.0, 1.0):
        return box
    sx, sy = scale
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _qam_boxes(maps: AttentionMaps, cfg: BiCMConfig) -> list[Optional[Box]]:
    if maps.kind == "va":  # one map for all queries
        box = threshold_box(maps.normalized[0], cfg.thr_a, cfg.region_rule)
        return [box] * maps.normalized.shape[0]
    return [threshold_box(m, cfg.thr_a, cfg.region_rule) for m in maps.normalized]


def _empty_result(query, maps, i, view_box, comps, size, cfg, notes, source) -> GroundingResult:
    empty = torch.zeros(0)
    return GroundingResult(
        query=query,
        box=None,
        score=None,
        selected=[],
        candidates=Candidates(torch.zeros(0, 4), [], None, None, None, None, empty),
        attention_raw=None if maps is None else maps.raw[i].cpu(),
        attention=None if maps is None else maps.normalized[i].cpu(),
        qam_box=None,
        s_iq=None if maps is None else float(maps.s_iq[i]),
        view_box=view_box,
        components=comps,
        image_size=size,
        selection=cfg.selection,
        proposal_source=source,
        notes=list(notes) + ["nothing to choose from: no box"],
    )


def _check_queries(queries: Iterable[str]) -> list[str]:
    """Clean the phrases: control characters count as spaces, runs of whitespace become one
    space, lone surrogates (undecodable bytes of a command line) become U+FFFD. A phrase with
    nothing visible left is an error."""
    if isinstance(queries, str):
        queries = [queries]
    out = []
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BicmError(f"query {i + 1} is not text: {_short_repr(query)}")
        cleaned = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in query).split())
        if any(unicodedata.category(c) == "Cs" for c in cleaned):
            cleaned = "".join("\ufffd" if unicodedata.category(c) == "Cs" else c for c in cleaned)
            warn(f"query {i + 1} held bytes that are not valid text; replaced by U+FFFD")
        if not any(unicodedata.category(c)[0] not in "CZ" for c in cleaned):
            raise BicmError(f"query {i + 1} is empty")
        out.append(cleaned)
    if not out:
        raise BicmError("no query given")
    return out


def _as_proposals(proposals: ProposalsLike) -> Proposals:
    if proposals is None:
        return Proposals.empty()
    if isinstance(proposals, Proposals):
        return proposals
    try:
        boxes = torch.as_tensor(proposals, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise BicmError(f"proposals must be (N, 4) numbers (xyxy pixels), got {_short_repr(proposals)}") from None
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BicmError(f"proposal boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    return Proposals(boxes)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_dict(config: BiCMConfig) -> dict[str, Any]:
    """The config as plain JSON-ready data."""
    out = asdict(config)
    out["components"] = list(config.components)
    return out


def same_method(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`config_dict` results give the same results (speed settings aside)."""
    speed = ("crop_batch_size", "query_chunk")
    return {k: v for k, v in a.items() if k not in speed} == {k: v for k, v in b.items() if k not in speed}
