"""The public API: :class:`Grounder`, BiCM over a CLIP backbone (QAM + COM + SF, + KAM).

>>> from bicm import Grounder
>>> g = Grounder.from_pretrained("ViT-B-32", "openai", proposals="selective-search", name_with="vg1600")
>>> r = g.ground("photo.jpg", "the bird on the left")
>>> r.box, r.score

A Grounder works in two steps per image: :meth:`Grounder.extract` does the per-image work
(proposals, crops, class names, attention maps; CLIP forwards) and :meth:`Grounder.score`
composes the paper's equations on it (no CLIP forward), so the ablation rows of an
evaluation score one extraction:

* QAM (:mod:`bicm.qam`, Eqs. 1-5): the attention map of each query and its box ``P_t``;
* COM (:mod:`bicm.com`, Eqs. 6-8): ``S_BU = S_PQ + S_CQ`` of every candidate;
* SF (:mod:`bicm.fusion`, Eqs. 9-10): ``S = S_BU + lambda_t * S_TD``, then the selection;
* KAM (:mod:`bicm.kam`, Eq. 11): ``+ lambda_k * S_KAM`` from a model trained on pseudo labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from . import com
from .backbone import Backbone, load_backbone
from .cache import FeatureCache, MemoryFeatureCache
from .config import COMPONENTS, DEFAULT_NAME_TEMPLATE, BiCMConfig, Needs
from .crops import crop_uint8, resolve_crop_backend
from .encoder import Encoder
from .errors import BicmError, warn
from .fusion import box_means, fuse, integral_image, select
from .imageio import ImageSource, image_digest, load_image
from .inputs import ProposalsLike, as_proposals, capped, check_queries, scaled, working_image
from .kam import KamModel
from .preprocess import preprocess
from .proposals import Proposals
from .proposals.naming import ClipNamer, Vocabulary
from .proposals.sources import FileSource, OracleSource, ProposalSource, make_source
from .qam import AttentionMaps, compute_maps, qam_boxes
from .results import Box, Candidates, GroundingResult

__all__ = ["Grounder", "PreparedImage", "ScoringInputs", "default_crop_batch"]

#: What a Grounder's proposals may be given as: a source, its name or a detections file.
SourceLike = Union[ProposalSource, str, None]
#: How unnamed proposals get class names: a vocabulary (``"vg1600"``, ``"coco80"``,
#: ``"shapes"``, a text file), or a ready :class:`~bicm.proposals.naming.ClipNamer`.
NamingLike = Union[str, Path, Vocabulary, ClipNamer, None]


class Grounder:
    """BiCM over a CLIP backbone.

    Parameters
    ----------
    backbone: a loaded :class:`~bicm.backbone.Backbone`.
    config: :class:`~bicm.config.BiCMConfig` (the paper's defaults).
    proposals: the Grounder's proposal source, used when :meth:`ground` gets no proposals:
        a :class:`~bicm.proposals.sources.ProposalSource`, or its name for
        :func:`~bicm.proposals.sources.make_source` (``"selective-search"``,
        ``"faster-rcnn"``, ``"shapes-detector"``, a detections file, ``"oracle:FILE"``).
    name_with: names proposals that come without class names by CLIP zero-shot over a
        vocabulary (``"vg1600"``, ``"coco80"``, ``"shapes"``, a text file, a
        :class:`~bicm.proposals.naming.Vocabulary`), so COM can use ``S_CQ``; or a ready
        :class:`~bicm.proposals.naming.ClipNamer`.
    name_template: the prompt of each vocabulary name when naming.
    cache: a :class:`~bicm.cache.FeatureCache` (SQLite) or :class:`~bicm.cache.MemoryFeatureCache`
        for text, crop and proposal computations.
    kam: a trained :class:`~bicm.kam.KamModel` (or its file) for the ``"kam"`` component; it
        must have been trained on this backbone. Giving one adds ``"kam"`` to the components
        of the default config.
    class_names: a :class:`~bicm.com.ClassNameEncoder` to share (its cache) with another
        Grounder on the same backbone.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: Optional[BiCMConfig] = None,
        *,
        proposals: SourceLike = None,
        name_with: NamingLike = None,
        name_template: str = DEFAULT_NAME_TEMPLATE,
        cache: Union[FeatureCache, MemoryFeatureCache, None] = None,
        kam: Union[KamModel, str, Path, None] = None,
        class_names: Optional[com.ClassNameEncoder] = None,
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
        if self.config.uses_kam and self.kam is None:
            raise BicmError("the kam component needs a trained KAM model (kam=PATH; see 'bicm train-kam')")
        self.encoder = Encoder(backbone, cache)
        if isinstance(proposals, str):
            proposals = make_source(proposals, device=str(backbone.device))
        self.proposals: Optional[ProposalSource] = proposals
        if name_with is not None and not isinstance(name_with, ClipNamer):
            name_with = ClipNamer(backbone, name_with, name_template, encode_text=self.encoder.text)
        self.namer: Optional[ClipNamer] = name_with
        if class_names is None or class_names.template != self.config.class_prompt:
            class_names = com.ClassNameEncoder(backbone, self.config.class_prompt, self.encoder.text)
        self.class_names = class_names
        if self.config.uses_qam:
            reason = backbone.qam_unsupported_reason()
            if reason:
                raise BicmError(reason)

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
        precision: str = "fp32",
        compile: bool = False,
        config: Optional[BiCMConfig] = None,
        proposals: SourceLike = None,
        name_with: NamingLike = None,
        name_template: str = DEFAULT_NAME_TEMPLATE,
        cache: Union[FeatureCache, MemoryFeatureCache, None] = None,
        kam: Union[str, Path, None] = None,
        **overrides: Any,
    ) -> "Grounder":
        """Load a backbone (:func:`bicm.backbone.load_backbone`) and build a Grounder on it.

        ``model``/``pretrained`` name open_clip weights (``"ViT-B-32"``, ``"openai"``), or
        ``model="shapes"`` the shipped offline CLIP; ``checkpoint`` is a local weights file.
        ``precision`` is the weight dtype of the image encoder for proposal crops and whole
        images: ``"fp32"`` (default: exact), ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"`` (bf16
        where the GPU or CPU multiplies it natively; the command line's default). QAM's
        gradient path stays fp32. ``compile=True`` runs that encoder through
        ``torch.compile``. ``proposals``, ``name_with``, ``name_template``, ``cache`` and
        ``kam`` are the Grounder's (see :class:`Grounder`); with ``kam`` the default
        components become QAM+COM+SF+KAM. Keyword ``overrides`` replace fields of
        ``config``, e.g. ``components=("com",)``.

        >>> Grounder.from_pretrained("shapes", proposals="shapes-detector", selection="union-above-mean")
        """
        if config is None and kam is not None:
            config = BiCMConfig(components=COMPONENTS + ("kam",))
        config = (config or BiCMConfig()).replace(**overrides) if overrides else config
        backbone = load_backbone(
            model, pretrained, checkpoint, device=device, amp=amp, quick_gelu=quick_gelu, precision=precision, compile=compile
        )
        return cls(backbone, config, proposals=proposals, name_with=name_with, name_template=name_template, cache=cache, kam=kam)

    def with_config(self, **changes: Any) -> "Grounder":
        """A Grounder on the same backbone, proposals, naming, cache and KAM model, with some
        settings changed."""
        return Grounder(
            self.backbone,
            self.config.replace(**changes),
            proposals=self.proposals,
            name_with=self.namer,
            cache=self.encoder.cache,
            kam=self.kam,
            class_names=self.class_names,
        )

    # ------------------------------------------------------------------------------------
    def ground(
        self,
        image: Union[ImageSource, Image.Image],
        query: str,
        proposals: Union[ProposalsLike, ProposalSource] = None,
        *,
        image_key: Optional[str] = None,
    ) -> GroundingResult:
        """Ground one phrase. See :meth:`ground_many`."""
        return self.ground_many(image, [query], proposals, image_key=image_key)[0]

    def ground_many(
        self,
        image: Union[ImageSource, Image.Image],
        queries: Sequence[str],
        proposals: Union[ProposalsLike, ProposalSource] = None,
        *,
        image_key: Optional[str] = None,
    ) -> list[GroundingResult]:
        """Ground several phrases in one image, sharing all per-image work.

        Parameters
        ----------
        image: path or PIL image (converted to RGB; EXIF orientation applied to files).
        queries: phrases, e.g. ``["the bird on the left", "a red ball"]``.
        proposals: :class:`~bicm.proposals.Proposals`, an ``(N, 4)`` xyxy tensor / list, a
            :class:`~bicm.proposals.sources.ProposalSource` (called on the image), or
            ``None``: the Grounder's own source, and without one QAM's box alone. Boxes
            outside the image are clipped, degenerate ones dropped (with a warning). Unnamed
            proposals are named when the Grounder has ``name_with``.
        image_key: the image's name for file-based proposal sources (default: its path).

        Returns
        -------
        One :class:`~bicm.results.GroundingResult` per query, in order. Queries are
        processed ``config.query_chunk`` at a time after the per-image work.
        """
        chunks = self.iter_extract(image, queries, proposals, chunk=self.config.query_chunk, image_key=image_key)
        return [result for inputs in chunks for result in self.score(inputs)]

    def extract(
        self,
        image: Union[ImageSource, Image.Image],
        queries: Sequence[str],
        proposals: Union[ProposalsLike, ProposalSource] = None,
        *,
        needs: Optional[Needs] = None,
        image_key: Optional[str] = None,
    ) -> "ScoringInputs":
        """Everything per image the scoring needs, computed once (see :meth:`score`), for all
        queries in one piece; :meth:`iter_extract` streams them.

        ``needs`` (default: this Grounder's config's, :meth:`BiCMConfig.needs`) says what to
        compute; an evaluation of several ablation rows asks for all of theirs at once
        (:meth:`Needs.of`). ``image_key`` names the image for file-based proposal sources
        (default: its path).
        """
        queries = [queries] if isinstance(queries, str) else list(queries)
        return next(iter(self.iter_extract(image, queries, proposals, chunk=len(queries), needs=needs, image_key=image_key)))

    def iter_extract(
        self,
        image: Union[ImageSource, Image.Image, "PreparedImage"],
        queries: Sequence[str],
        proposals: Union[ProposalsLike, ProposalSource] = None,
        *,
        chunk: Optional[int] = None,
        needs: Optional[Needs] = None,
        image_key: Optional[str] = None,
    ) -> Iterator["ScoringInputs"]:
        """:meth:`extract` streamed over the queries: the per-image work (image, proposals,
        crop, class-name and whole-image embeddings) is done once, then one
        :class:`ScoringInputs` is yielded per ``chunk`` queries (default
        ``config.query_chunk``), in order, sharing those tensors. Only the current chunk's
        text, attention maps and QAM boxes exist, so memory is bounded by the chunk, not by
        the number of queries. The work is done as the iterator is consumed. ``image`` may be a
        :class:`PreparedImage` (:meth:`prepare`, e.g. done ahead); ``proposals`` and
        ``image_key`` are then the ones it was prepared with.
        """
        cfg = self.config
        needs = self._needs(needs)
        queries = check_queries(queries)
        chunk = chunk or cfg.query_chunk
        if chunk < 1:
            raise BicmError("query chunk must be at least 1")
        ready = image if isinstance(image, PreparedImage) else self.prepare(image, proposals, image_key=image_key, needs=needs)
        width, height, pil, scale, digest = ready.width, ready.height, ready.pil, ready.scale, ready.digest
        props, work_props = ready.props, ready.work_props
        notes: list[str] = []
        if props.is_oracle:
            notes.append("ORACLE: the proposals are ground-truth boxes (analysis only, not a real result)")

        device = self.backbone.device
        crop_spec = self.backbone.spec.with_resize_mode(cfg.crop_resize)
        crop_batch = cfg.crop_batch_size or default_crop_batch(device)
        crop_feats: Optional[torch.Tensor] = None  # (N, E), computed at most once

        def encode_proposal_crops() -> torch.Tensor:
            return self.encoder.crops(pil, work_props.boxes, crop_spec, crop_batch, digest, cfg.crop_backend, ready.crop_pixels)

        if self.namer is not None and (needs.visual or needs.names) and len(props) and not props.fully_named:
            crop_feats = encode_proposal_crops()
            named = self.namer.name(work_props, pil, crop_feats)
            props = props.with_names(named.class_names or [None] * len(props), named.name_scores)
            notes.append(f"proposals named by CLIP over {self.namer.vocabulary.name}")
        # Without naming, the proposal crops wait for the first chunk's QAM boxes and go through
        # the encoder with them: 100 proposals + 15 QAM boxes as batches of 64 + 51 rather than
        # 64 + 36 + 15 (a small batch runs at a lower rate); crops prepared ahead are joined by the
        # QAM boxes' crops, cut then, so the batches and the numbers are the same either way.
        joined = needs.visual and crop_feats is None and bool(needs.kinds) and len(props) > 0
        if needs.visual and crop_feats is None and not joined:
            crop_feats = encode_proposal_crops()
        name_feats = None
        if needs.names and props.fully_named and len(props):
            name_feats = self.class_names([c or "" for c in props.class_names or []])

        image_feat = self.encoder.image(pil, self.backbone.spec, digest) if needs.kam else None  # (E,)
        view_box: Optional[Box] = None
        if needs.kinds:
            pixels, geometry = preprocess(pil, self.backbone.spec.with_resize_mode(cfg.qam_resize))
            view_box = geometry.visible_box()
        for start in range(0, len(queries), chunk):
            part = queries[start : start + chunk]
            text = self.encoder.text(part)  # (Q, E)
            maps: dict[str, AttentionMaps] = {}
            boxes_qam: dict[str, list[Optional[Box]]] = {}
            for kind in needs.kinds:
                maps[kind] = compute_maps(self.backbone, pixels, geometry, text, kind)  # type: ignore[arg-type]
                boxes_qam[kind] = qam_boxes(maps[kind], cfg.thr_a, cfg.region_rule)
            qam_crops: dict[Box, torch.Tensor] = {}
            unique = sorted({b for boxes in boxes_qam.values() for b in boxes if b is not None})
            if needs.visual and (unique or crop_feats is None):
                boxes = torch.tensor(unique, dtype=torch.float32).reshape(-1, 4)
                cut: Optional[torch.Tensor] = None  # the crops' uint8 pixels where some were cut ahead
                if crop_feats is None:  # joined: the proposals' crops first, then this chunk's QAM boxes
                    if ready.crop_pixels is not None:
                        backend = resolve_crop_backend(cfg.crop_backend, device)
                        qam_cut = crop_uint8(pil, unique, crop_spec, backend, device)
                        cut = torch.cat([ready.crop_pixels, qam_cut.to(ready.crop_pixels.device)])
                    boxes = torch.cat([work_props.boxes.float(), boxes])
                feats = self.encoder.crops(pil, boxes, crop_spec, crop_batch, digest, cfg.crop_backend, cut)
                if crop_feats is None:
                    crop_feats, feats = feats[: len(work_props)], feats[len(work_props) :]
                qam_crops = dict(zip(unique, feats))
            yield ScoringInputs(
                queries=part,
                image_size=(width, height),
                proposals=props,
                text=text.to(device),
                crop_feats=crop_feats,
                name_feats=name_feats,
                maps=maps,
                qam_boxes=boxes_qam,
                qam_crop_feats=qam_crops,
                view_box=view_box,
                notes=list(notes),
                image_feat=image_feat,
                scale=scale,
            )
            del maps, boxes_qam, qam_crops, text  # this chunk's maps go before the next chunk's are made

    def _needs(self, needs: Optional[Needs]) -> Needs:
        """What to compute: ``needs`` (default: the config's), with what KAM reads, checked."""
        reads_names = self.kam is None or self.kam.use_names
        needs = self.config.needs(reads_names) if needs is None else needs
        if needs.kam:  # KAM reads the crops, and the class names where it learned them
            needs = needs | Needs(visual=True, names=reads_names)
        for kind in needs.kinds:
            if kind not in ("qa", "va"):
                raise BicmError(f"unknown attention map {kind!r}; use qa or va")
        if needs.kinds and self.backbone.qam_unsupported_reason():
            raise BicmError(self.backbone.qam_unsupported_reason() or "")
        return needs

    def prepare(
        self,
        image: Union[ImageSource, Image.Image],
        proposals: Union[ProposalsLike, ProposalSource] = None,
        *,
        image_key: Optional[str] = None,
        needs: Optional[Needs] = None,
        crops: bool = False,
    ) -> "PreparedImage":
        """An image's work before its CLIP forwards: decoded, downscaled to the working size,
        its proposals found (through the feature cache), cleaned and, with ``crops=True`` and
        no feature cache (a cache would skip most of them), its proposal crops cut
        (:func:`~bicm.crops.crop_uint8` with the config's backend). :meth:`iter_extract` takes
        the result in place of the image; :mod:`bicm.prefetch` runs this ahead, on a thread.
        """
        cfg = self.config
        needs = self._needs(needs)
        original = load_image(image)
        width, height = original.size
        # Work on at most cfg.max_pixels pixels; boxes in and out stay in ORIGINAL pixels.
        pil, scale = working_image(original, cfg.max_pixels)
        digest = image_digest(pil)  # the image's identity for the proposal and feature caches (~1 ms)
        if proposals is None:
            proposals = self.proposals
        if isinstance(proposals, ProposalSource):
            key = image_key or (None if isinstance(image, Image.Image) else str(image))
            found = self.encoder.proposals(proposals, pil, key, digest)
            # sources that look at the image see the working image; files hold original pixels
            proposals = found if isinstance(proposals, (FileSource, OracleSource)) else scaled(found, scale)
        props = self._clean(as_proposals(proposals), width, height)
        work_props = scaled(props, (1.0 / scale[0], 1.0 / scale[1]))  # the same boxes on the working image
        pixels = None
        naming = self.namer is not None and needs.names and not props.fully_named
        if crops and self.encoder.cache is None and len(props) and (needs.visual or naming):
            spec = self.backbone.spec.with_resize_mode(cfg.crop_resize)
            backend = resolve_crop_backend(cfg.crop_backend, self.backbone.device)
            pixels = crop_uint8(pil, work_props.boxes.tolist(), spec, backend, self.backbone.device)
        return PreparedImage(width, height, pil, scale, digest, props, work_props, pixels)

    def _clean(self, proposals: Proposals, width: int, height: int) -> Proposals:
        """Proposals clipped to the image, degenerate ones dropped, capped (with warnings)."""
        cfg = self.config
        cleaned = proposals.sanitize(width, height, cfg.min_box_size)
        if cleaned.n_clipped:
            warn(f"{cleaned.n_clipped} proposal box(es) reach outside the {width}x{height} image; clipped")
        if cleaned.n_dropped:
            warn(f"{cleaned.n_dropped} degenerate proposal box(es) dropped (empty, inverted or under {cfg.min_box_size:g} px)")
        return capped(cleaned.proposals, cfg.max_proposals)

    # ------------------------------------------------------------------------------------
    def score(self, inputs: "ScoringInputs", config: Optional[BiCMConfig] = None) -> list[GroundingResult]:
        """Fuse and select for every query of ``inputs`` under ``config`` (default: own).

        Cheap: no CLIP forward. Different configs (the ablation rows) can score the same
        inputs, as long as :meth:`extract` computed what they use. Candidates are the
        proposals followed by QAM's box ``P_t``.
        """
        cfg = config or self.config
        f = inputs
        plan = _Plan.of(cfg, f, self.kam is not None)
        text, device = f.text, f.text.device
        props = f.proposals if plan.proposals else Proposals.empty()
        boxes = props.boxes.to(device)  # (N, 4) original pixels
        to_original = torch.tensor([f.scale[0], f.scale[1]] * 2, device=device)  # working -> original pixels
        p_t = plan.qam_boxes  # P_t per query, working pixels (the maps' pixels)
        # COM (Eqs. 6-8) for the proposals, and for P_t: its own crop, the class name it borrows
        s_pq = com.s_pq(text, f.crop_feats) if plan.visual else None  # (Q, N)
        s_cq = com.s_cq(text, f.name_feats) if plan.names else None  # (Q, N)
        qam_pq = com.qam_s_pq(text, p_t, f.qam_crop_feats) if plan.visual else None  # (Q,)
        named = com.borrowed_names(s_cq) if s_cq is not None else None  # (Q,)
        qam_cq = s_cq.gather(1, named[:, None]).squeeze(1) if named is not None else None  # (Q,)
        # SF's top-down score (Eq. 9): the map's mean in each box, on the working image
        s_td = qam_td = None
        if plan.maps is not None:
            table = integral_image(plan.maps.raw if cfg.td_scale == "raw" else plan.maps.normalized)
            s_td = box_means(table, boxes / to_original)  # (Q, N)
            qam_td = box_means(table, torch.tensor([[b or (0.0, 0.0, 1.0, 1.0)] for b in p_t], dtype=torch.float32))[:, 0]

        results = []
        for i, query in enumerate(f.queries):
            names = list(props.class_names or [None] * len(props))
            cand = Candidates(boxes, names, None, _at(s_pq, i), _at(s_cq, i), _at(s_td, i), fused=torch.zeros(0))
            if p_t[i] is not None:
                box_t = torch.tensor([p_t[i]], dtype=torch.float32, device=device) * to_original
                name_t = props.class_names[int(named[i])] if named is not None else None  # type: ignore[index]
                cand = _with_qam_box(cand, box_t, name_t, _at(qam_pq, i, True), _at(qam_cq, i, True), _at(qam_td, i, True))
            if len(cand) == 0:
                results.append(_empty_result(query, plan, f, i, cfg))
                continue
            s_bu = com.bottom_up(cand.s_pq, cand.s_cq) if plan.com else None  # Eq. 8
            s_kam = None
            if plan.kam:
                assert self.kam is not None and f.image_feat is not None
                fp, fc = _candidate_feats(f, i, plan.proposals, p_t[i], named, self.kam.use_names)
                s_kam = self.kam.scores(f.image_feat, text[i], fp, fc)
            if s_bu is None and not plan.sf:
                fused = cand.s_td * cfg.lambda_t  # QAM alone: its one box, scored top-down
            else:
                fused = fuse(s_bu, cand.s_td if plan.sf else None, cfg.lambda_t, s_kam, cfg.lambda_k)  # Eqs. 10-11
            box, chosen = select(cand.boxes, fused, cfg.selection)
            results.append(_result(query, box, chosen, cand, fused, s_kam, plan, f, i, cfg))
        return results

    def candidate_features(
        self, inputs: "ScoringInputs", index: int, config: Optional[BiCMConfig] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-candidate inputs of KAM's MLP for query ``index``, in :meth:`score`'s order.

        Returns ``fp`` ``(K, E)`` crop embeddings and ``fc`` ``(K, E)`` class-name embeddings
        (``None`` without names) of the proposals followed by QAM's box ``P_t`` (which takes
        the class name of the proposal with the highest S_CQ).
        """
        cfg = config or self.config
        f = inputs
        if f.crop_feats is None and len(f.proposals):
            raise ValueError("the inputs hold no crop embeddings; extract(needs=Needs(visual=True)) must compute them")
        qam_box = f.qam_boxes.get(cfg.attention, [None] * len(f.queries))[index] if cfg.uses_qam else None
        best = None
        if f.name_feats is not None and len(f.proposals):
            best = com.borrowed_names(com.s_cq(f.text, f.name_feats))
        return _candidate_feats(f, index, len(f.proposals) > 0, qam_box, best, True)


@dataclass
class PreparedImage:
    """An image's work before its CLIP forwards (:meth:`Grounder.prepare`).

    Attributes
    ----------
    width, height: the original image's size.
    pil: the working image (at most ``config.max_pixels`` pixels), RGB.
    scale: ``(sx, sy)`` original pixels per working pixel.
    digest: the working image's identity in the caches.
    props: cleaned proposals, xyxy in original pixels.
    work_props: the same boxes on the working image.
    crop_pixels: ``(N, 3, H_in, W_in)`` uint8 crops of ``work_props`` (crop spec and backend
        of the config), or ``None``: cut when encoded.
    """

    width: int
    height: int
    pil: Image.Image
    scale: tuple[float, float]
    digest: str
    props: Proposals
    work_props: Proposals
    crop_pixels: Optional[torch.Tensor] = None


@dataclass
class ScoringInputs:
    """The per-image work of BiCM for a chunk of queries: everything :meth:`Grounder.score`
    reads, independent of how the scores are fused.

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
    qam_crop_feats: ``(E,)`` crop embedding of every distinct QAM box.
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


@dataclass
class _Plan:
    """Which terms one config scores on one :class:`ScoringInputs`, after the checks."""

    qam: bool
    com: bool
    sf: bool
    kam: bool
    proposals: bool  # there are proposals and COM or SF looks at them
    visual: bool  # S_PQ (Eq. 6)
    names: bool  # S_CQ (Eq. 7)
    maps: Optional[AttentionMaps]
    qam_boxes: list[Optional[Box]]
    notes: list[str]

    @staticmethod
    def of(cfg: BiCMConfig, f: ScoringInputs, has_kam: bool) -> "_Plan":
        """Raise what cannot run (one clear error); note what runs differently."""
        if cfg.uses_kam and not has_kam:
            raise BicmError("the kam component needs a trained KAM model (kam=PATH; see 'bicm train-kam')")
        if cfg.uses_kam and f.image_feat is None:
            raise ValueError("the inputs hold no image embedding; extract(needs=Needs(kam=True)) must compute it")
        props, notes = f.proposals, list(f.notes)
        looks = cfg.uses_com or cfg.uses_sf
        use_props = looks and len(props) > 0
        if looks and len(props) == 0:
            if not cfg.uses_qam:
                raise BicmError("no proposals and QAM is off: nothing to choose from (pass proposals or add qam)")
            notes.append("no proposals: QAM's box is the only candidate")
        if cfg.uses_com and cfg.com_mode == "class" and use_props and not props.fully_named:
            raise BicmError("COM in class-name mode needs proposals that all have class names")
        maps = f.maps.get(cfg.attention) if cfg.uses_qam else None
        if cfg.uses_qam and maps is None:
            raise ValueError(f"the inputs hold no {cfg.attention!r} map; extract(needs=...) must include it")
        boxes = f.qam_boxes.get(cfg.attention, [None] * len(f.queries)) if cfg.uses_qam else [None] * len(f.queries)
        if cfg.uses_qam and not any(boxes):
            notes.append("the attention map is flat: QAM proposes no box")
        visual = cfg.uses_visual and use_props
        names = cfg.uses_names and use_props and props.fully_named
        if cfg.com_mode == "both" and cfg.uses_com and use_props and not names:
            notes.append("proposals carry no class names for every box: COM used S_PQ alone")
        if visual and f.crop_feats is None:
            raise ValueError("the inputs hold no crop embeddings; extract(needs=Needs(visual=True)) must compute them")
        if names and f.name_feats is None:
            raise ValueError("the inputs hold no class-name embeddings; extract(needs=Needs(names=True)) must compute them")
        return _Plan(cfg.uses_qam, cfg.uses_com, cfg.uses_sf, cfg.uses_kam, use_props, visual, names, maps, boxes, notes)


def _with_qam_box(cand: Candidates, box: torch.Tensor, name: Optional[str], pq, cq, td) -> Candidates:  # noqa: ANN001
    """``cand`` and one more candidate, QAM's box ``P_t`` (last); a term absent for the others
    stays absent."""

    def cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if a is None else torch.cat([a, b])

    return replace(
        cand, boxes=torch.cat([cand.boxes, box]), class_names=cand.class_names + [name], qam_index=len(cand),
        s_pq=cat(cand.s_pq, pq), s_cq=cat(cand.s_cq, cq), s_td=cat(cand.s_td, td),
    )


def _at(values: Optional[torch.Tensor], i: int, keep_dim: bool = False) -> Optional[torch.Tensor]:
    """Row ``i`` of ``(Q, N)`` scores (or ``[values[i]]`` of ``(Q,)`` ones), ``None`` stays."""
    if values is None:
        return None
    return values[i : i + 1] if keep_dim else values[i]


def _result(query, box, chosen, cand: Candidates, fused, s_kam, plan: _Plan, f: ScoringInputs, i: int, cfg: BiCMConfig) -> GroundingResult:  # noqa: ANN001
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return GroundingResult(
        query=query,
        box=box,
        score=float(fused[chosen].max()),
        selected=chosen,
        candidates=replace(
            cand, boxes=cand.boxes.cpu(), s_pq=cpu(cand.s_pq), s_cq=cpu(cand.s_cq), s_td=cpu(cand.s_td), fused=fused.cpu(), s_kam=cpu(s_kam)
        ),
        attention_raw=None if plan.maps is None else plan.maps.raw[i].cpu(),
        attention=None if plan.maps is None else plan.maps.normalized[i].cpu(),
        qam_box=_scale_box(plan.qam_boxes[i], f.scale),
        s_iq=None if plan.maps is None else float(plan.maps.s_iq[i]),
        view_box=_scale_box(f.view_box, f.scale) if plan.qam else None,
        components=cfg.components,
        image_size=f.image_size,
        selection=cfg.selection,
        proposal_source=f.proposals.source,
        notes=plan.notes,
    )


def _empty_result(query: str, plan: _Plan, f: ScoringInputs, i: int, cfg: BiCMConfig) -> GroundingResult:
    maps = plan.maps
    return GroundingResult(
        query=query,
        box=None,
        score=None,
        selected=[],
        candidates=Candidates(torch.zeros(0, 4), [], None, None, None, None, torch.zeros(0)),
        attention_raw=None if maps is None else maps.raw[i].cpu(),
        attention=None if maps is None else maps.normalized[i].cpu(),
        qam_box=None,
        s_iq=None if maps is None else float(maps.s_iq[i]),
        view_box=_scale_box(f.view_box, f.scale),
        components=cfg.components,
        image_size=f.image_size,
        selection=cfg.selection,
        proposal_source=f.proposals.source,
        notes=list(plan.notes) + ["nothing to choose from: no box"],
    )


def _candidate_feats(
    f: ScoringInputs, i: int, use_props: bool, qam_box: Optional[Box], best_name: Optional[torch.Tensor], names: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KAM's ``fp`` ``(K, E)`` and ``fc`` ``(K, E)`` (or ``None``) for query ``i``'s candidates."""
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


def default_crop_batch(device: torch.device) -> int:
    """Crops per forward when the config leaves it open: 64 on a CPU, 256 on a GPU."""
    return 256 if device.type == "cuda" else 64


def _scale_box(box: Optional[Box], scale: tuple[float, float]) -> Optional[Box]:
    if box is None or scale == (1.0, 1.0):
        return box
    sx, sy = scale
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
