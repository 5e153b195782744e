"""The CLIP backbone: a loaded model with its tokenizer, preprocessing and encoders.

:func:`load_backbone` loads one (by architecture and pretrained tag, or from a local file:
:mod:`bicm.checkpoints`); :class:`Backbone` encodes texts, preprocessed pixels and images
into L2-normalised embeddings. The pieces around it have their own modules: preprocessing
geometry in :mod:`bicm.preprocess`, devices and precision in :mod:`bicm.devices`, the fast
low-precision image tower in :mod:`bicm.tower`.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoints import DEFAULT_MODEL, SHAPES_MODEL, load_from_file, load_from_tag, shapes_weights
from .devices import dtype_name, resolve_amp, resolve_device, resolve_precision
from .errors import BicmError, warn
from .preprocess import PreprocessSpec, preprocess_many
from .tower import fast_image_tower, text_transformer

__all__ = ["TEXT_BATCH", "Backbone", "encode_tokens", "load_backbone", "text_lengths"]


@dataclass
class Backbone:
    """A loaded CLIP model with its tokenizer, preprocessing and device settings.

    Use :func:`load_backbone` to make one. All ``encode_*`` methods return L2-normalised
    float32 embeddings on the backbone's device.
    """

    model: torch.nn.Module
    tokenizer: Any
    spec: PreprocessSpec
    device: torch.device
    name: str
    amp: Optional[torch.dtype] = None
    model_cfg: dict[str, Any] = field(default_factory=dict)
    #: Weight dtype of the no-gradient image encoder (proposal crops, whole images): ``None``
    #: is fp32; ``torch.bfloat16`` / ``torch.float16`` run a low-precision COPY of the image
    #: tower. QAM's gradient path and the text encoder always use the fp32 model.
    precision: Optional[torch.dtype] = None
    #: Run the no-gradient image encoder through ``torch.compile`` (the first batch compiles,
    #: which is slow; worth it for long runs, and not always faster: see benchmarks/README.md).
    #: Falls back to eager, with a warning, where compiling fails (no C++ compiler,
    #: unsupported model).
    compiled: bool = False

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self._fast_visual: Optional[torch.nn.Module] = None
        self._compiled_visual: Optional[torch.nn.Module] = None

    # ---- facts -----------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return proj.out_features
        if proj is not None:
            return int(proj.shape[1])
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model, "context_length", None) or getattr(self.tokenizer, "context_length", 77))

    def qam_unsupported_reason(self) -> Optional[str]:
        """Why QAM cannot run on this image tower (a one-line message), or ``None`` when it can."""
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            return (
                f"QAM needs a ViT image encoder, but {self.name} has a {type(visual).__name__}; "
                "run COM alone (--components com)"
            )
        block = visual.transformer.resblocks[-1]
        if not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            return f"QAM supports standard open_clip ViT blocks; {self.name} uses {type(block).__name__}"
        if visual.attn_pool is not None or visual.pool_type != "tok":
            return f"QAM needs [CLS]-token pooling; {self.name} pools with {visual.pool_type!r}/attention pooling"
        return None

    def fingerprint(self) -> str:
        """Hash of the weights (and the autocast dtype): changes whenever the features would.

        Computed once (it reads every weight) and remembered.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.blake2b(digest_size=12)
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            cached = f"{digest.hexdigest()}-{str(self.amp).replace('torch.', '') if self.amp else 'fp32'}"
            if self.precision is not None:  # low-precision crop/image features are other features
                cached += f"-w{dtype_name(self.precision)}"
            self._fingerprint = cached
        return cached

    def image_encoder(self) -> torch.nn.Module:
        """The image tower that :meth:`encode_pixels` runs: the model's own (fp32), or a copy
        with weights in :attr:`precision`, made on first use and kept; wrapped by
        ``torch.compile`` when :attr:`compiled` (same weights, compiled on the first call)."""
        visual = self.model.visual
        if self.precision is not None:
            if self._fast_visual is None:
                self._fast_visual = fast_image_tower(self.model.visual, self.precision, fuse=not self.compiled)
            visual = self._fast_visual
        if not self.compiled:
            return visual
        if self._compiled_visual is None:
            self._compiled_visual = torch.compile(visual)
        return self._compiled_visual

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the encoders (no-op in fp32)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    # ---- text --------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize ``texts`` to ``(N, context_length)`` ids, warning about truncation."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            limit = self.context_length - 2  # start and end tokens
            for text in texts:
                n = len(encode(text))
                if n > limit:
                    warn(f"query {_clip_text(text)!r} has {n} tokens; truncated to the model's {limit}")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode texts. Returns ``(N, E)`` L2-normalised float32.

        A text's embedding depends on the text alone, bit for bit, not on the texts encoded
        with it: every forward of the text tower has :data:`TEXT_BATCH` rows (the last batch
        padded by repeating a row) and a token length from a fixed ladder (8, 16, 32, ... up to
        the context; the text's own length rounded up, see :func:`text_lengths`). Matrix
        kernels choose their blocking, and so their rounding, by the shapes; with fixed shapes
        a phrase or class name gets the same bits whether it is encoded alone, with others,
        in another process or Ray worker, or comes from the feature cache.
        """
        if len(texts) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenize(texts)
        lengths = text_lengths(self.model, tokens)  # (N,) tokens each text's forward keeps
        out = torch.empty(len(texts), self.embed_dim, device=self.device)
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().flatten()
            for start in range(0, rows.numel(), TEXT_BATCH):
                part = rows[start : start + TEXT_BATCH]
                batch = tokens[part]
                if part.numel() < TEXT_BATCH:  # padded with copies of a row: fixed shapes
                    batch = torch.cat([batch, batch[:1].expand(TEXT_BATCH - part.numel(), -1)])
                with self.autocast():
                    feats = encode_tokens(self.model, batch, int(length))
                out[part] = F.normalize(feats[: part.numel()].float(), dim=-1)
        return out

    # ---- images -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Encode preprocessed images ``(N, 3, H, W)``. Returns ``(N, E)`` L2-normalised."""
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start : start + batch_size].to(self.device, non_blocking=True)
            out.append(F.normalize(self._encode_chunk(chunk).float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        visual = self.image_encoder()
        if self.precision is not None:
            chunk = chunk.to(self.precision)
        if visual is self._compiled_visual:
            torch._dynamo.maybe_mark_dynamic(chunk, 0)  # one graph for every batch size
            try:
                return visual(chunk)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model still works
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                warn(f"torch.compile failed ({type(exc).__name__}: {first}); encoding images without it")
                self.compiled, self._compiled_visual = False, None
                visual = self.image_encoder()
        if self.precision is not None:
            return visual(chunk)
        with self.autocast():
            return visual(chunk)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Preprocess and encode RGB images. Returns ``(N, E)`` L2-normalised."""
        if not images:
            return torch.zeros(0, self.embed_dim, device=self.device)
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_many(images[start : start + batch_size], self.spec)
            out.append(self.encode_pixels(pixels, batch_size))
        return torch.cat(out)


def _clip_text(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


#: Rows of every text-tower forward (:meth:`Backbone.encode_text`; fixed, so that the bits of
#: a text's embedding never depend on its batch). 16 rows and lengths from 8 up measured fastest
#: for 40 class names and 15 queries per image on a 2-core CPU (benchmarks/README.md).
TEXT_BATCH = 16


def _trimmable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text tower is causal and pools at the end-of-text token (open_clip
    CLIP with an attention mask and ``argmax``/``eos`` pooling): then the positions after a
    text's end-of-text token cannot change its feature."""
    import open_clip

    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and getattr(model, "attn_mask", None) is not None
    )


def _ends(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of each row's end-of-text token."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def text_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` token length each row is encoded with by :meth:`Backbone.encode_text`: its own
    length (through the end-of-text token) rounded up to 8, 16, 32, 64 (at most the
    context), or the whole context for text towers that cannot be trimmed."""
    context = tokens.shape[1]
    if not _trimmable(model) or tokens.numel() == 0:
        return torch.full((tokens.shape[0],), context, dtype=torch.long)
    needed = (_ends(model, tokens) + 1).clamp(min=1).cpu().double()
    ladder = (2 ** torch.ceil(torch.log2(needed))).clamp(min=8).long()  # 8: most queries share one shape
    return ladder.clamp(max=context)


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
    """``model.encode_text`` without the padding after the end-of-text tokens.

    CLIP's text transformer is causal and pools at the EOT token, so positions after a row's
    EOT cannot change its pooled feature: dropping them is exact and saves most of the work
    (queries are ~5-15 tokens of 77). Models this does not hold for (bidirectional or
    CLS-pooled text towers) go through ``model.encode_text`` unchanged.

    Parameters
    ----------
    tokens: ``(N, L)`` token ids.
    length: tokens kept per row (at least every row's EOT position + 1); default: up to the
        longest row's EOT.

    Returns
    -------
    ``(N, E)`` text features, not normalised.
    """
    from open_clip.transformer import text_global_pool

    if not _trimmable(model):
        return model.encode_text(tokens)
    if length is None:
        length = int(_ends(model, tokens).max().item()) + 1 if tokens.numel() else 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = text_transformer(model.transformer, x, model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x



def load_backbone(
    model: Optional[str] = None,
    pretrained: Optional[str] = None,
    checkpoint: Union[str, Path, None] = None,
    *,
    device: Union[str, torch.device, None] = "auto",
    amp: Optional[str] = None,
    quick_gelu: Optional[bool] = None,
    cache_dir: Optional[str] = None,
    precision: Optional[str] = "fp32",
    compile: bool = False,
) -> Backbone:
    """Load a CLIP backbone.

    Parameters
    ----------
    model:
        open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``RN50``, ...), or
        ``"shapes"`` for the small CLIP trained on the shapes world that ships with bicm. With
        a ``checkpoint`` it is optional (taken from the file when absent).
    pretrained:
        open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...). Defaults to
        ``openai`` when neither a tag nor a checkpoint is given.
    checkpoint:
        A local weights file or an open_clip model folder (formats: :mod:`bicm.checkpoints`).
    device:
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    amp:
        Autocast for the encoders: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` (CUDA only).
    quick_gelu:
        Force the activation (``True`` = QuickGELU, as OpenAI CLIP). ``None``: decided by
        the tag, the file or the config.
    precision:
        Weights of the image encoder for proposal crops and whole images: ``"fp32"``,
        ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"`` (see :func:`resolve_precision`). QAM's
        gradient path stays fp32 whatever this is.
    compile:
        Run that image encoder through ``torch.compile`` (see :attr:`Backbone.compiled`).
    """
    import open_clip

    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    weights_dtype = resolve_precision(precision, dev)
    display_name = None
    if model == SHAPES_MODEL and checkpoint is None and pretrained is None:
        checkpoint, model, display_name = shapes_weights(), None, SHAPES_MODEL
    if checkpoint is not None:
        if pretrained is not None:
            raise BicmError("pass either a pretrained tag or a checkpoint file, not both")
        clip, cfg, spec, name, tokenizer_name = load_from_file(Path(checkpoint), model, quick_gelu)
    else:
        clip, cfg, spec, name, tokenizer_name = load_from_tag(model or DEFAULT_MODEL, pretrained, quick_gelu, cache_dir)
    context_length = getattr(clip, "context_length", None)
    if tokenizer_name:
        tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=context_length)
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length or 77)
    clip = clip.to(dev).float()
    return Backbone(clip, tokenizer, spec, dev, display_name or name, amp_dtype, cfg, precision=weights_dtype, compiled=compile)
