"""Checkpoint loading and saving: CLIP weights from open_clip's registry or from local files.

* By architecture and pretrained tag, through open_clip's own registry and downloads
  (bicm's default ``ViT-B-32`` + ``openai``). OpenAI weights are always built with
  QuickGELU: the tag's config says so and :func:`bicm.backbone.load_backbone` forces it
  (open_clip itself only warns).
* From a local file (``checkpoint=``):

  - an open_clip state dict (``.bin``/``.pt``/``.pth``, optionally ``{"state_dict": ...}``
    with ``module.`` prefixes, as open_clip training writes it);
  - an OpenAI-style state dict (``torch.save(model.state_dict())``, fp16 weights are fine);
  - an OpenAI TorchScript archive (the original ``ViT-B-32.pt`` files);
  - safetensors (``open_clip_model.safetensors`` from the hub, or files written by
    :func:`save_checkpoint`, which carry their open_clip config in the metadata).

  The architecture comes, in this order, from ``model=``, the file's embedded config, an
  ``open_clip_config.json`` beside the file, or the tensor shapes (OpenAI conventions:
  64-wide heads). Pickled files are read by bicm's capped torch reader
  (:func:`bicm.safeload.read_torch_file`: tensors and plain containers, within a memory budget);
  TorchScript archives are read as data (:mod:`bicm.safeload`), never compiled: no code
  from a checkpoint is executed.

Also the shipped shapes CLIP (:data:`SHAPES_MODEL`, :func:`shapes_weights`) and the
``lambda_t`` its model card records (:func:`recorded_lambda_t`).

What open_clip does and what bicm keeps
---------------------------------------
The layout conversions open_clip's ``load_checkpoint`` applies to a state dict in memory
(third-party layouts such as MobileCLIP, and the old text-tower layout of ``CustomTextCLIP``)
are open_clip's own functions here (:func:`_to_open_clip_layout`). Reading the file is not:
``open_clip.factory.load_state_dict`` calls ``torch.load`` itself, without bicm's memory-bomb
scan, retries WITHOUT ``weights_only`` when torch raises ``TypeError``, and cannot read
TorchScript archives at all (torch refuses them under ``weights_only``; without it, it hands
them to ``torch.jit.load``, which runs their code). So :func:`read_state_dict` reads files
through :mod:`bicm.safeload` and does the small unwrapping (``state_dict`` nesting,
``module.`` prefixes, OpenAI's extra entries) itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch

from .atomic import atomic_path
from .errors import BicmError, warn
from .preprocess import PreprocessSpec
from .safeload import json_loads, read_torch_file, read_torchscript, regular_file
from .safeload import is_torchscript as _is_torchscript

__all__ = [
    "CheckpointContents",
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "LoadedModel",
    "SHAPES_MODEL",
    "SHAPES_WEIGHTS",
    "infer_model_cfg",
    "load_from_file",
    "load_from_tag",
    "read_state_dict",
    "recorded_lambda_t",
    "save_checkpoint",
    "shapes_weights",
]

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
#: ``--model shapes``: the small CLIP trained on the shapes world, shipped with bicm
SHAPES_MODEL = "shapes"
SHAPES_WEIGHTS = "shapes-clip.safetensors"

#: Entries of OpenAI checkpoints that are not parameters of the model
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def recorded_lambda_t(model: Optional[str] = None, checkpoint: Union[str, Path, None] = None) -> Optional[float]:
    """The ``lambda_t`` calibrated for a model (``10 ** round(log10(median |S_BU| / median
    |S_TD|))`` over unlabelled candidates), when its card records one.

    The card is the JSON file beside the weights (``<weights stem>.json``, as ``bicm
    train-clip`` writes), with ``"lambda_t": {"value": ...}``; for ``model="shapes"`` (or no
    model and no checkpoint) the shipped shapes CLIP's card. ``None`` when there is none.
    """
    if checkpoint is None and model not in (None, SHAPES_MODEL):
        return None
    weights = Path(checkpoint) if checkpoint is not None else shapes_weights()
    card = weights.with_suffix(".json")
    if not card.is_file():
        return None
    try:
        found = json_loads(card.read_text(), card).get("lambda_t")
        value = float(found["value"] if isinstance(found, dict) else found)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, BicmError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def shapes_weights() -> Path:
    """Where the CLIP trained on the shapes world lies inside the installed package."""
    from importlib import resources

    path = Path(str(resources.files("bicm.shapes").joinpath("model", SHAPES_WEIGHTS)))
    regular_file(path, "shapes model", missing=f"the shapes model is not in this installation ({SHAPES_WEIGHTS}); train one with 'bicm train-clip'")
    return path


class LoadedModel(NamedTuple):
    """An open_clip model as :func:`load_from_tag` and :func:`load_from_file` return it (fp32, on
    the CPU), with what :func:`bicm.backbone.load_backbone` needs around it."""

    model: torch.nn.Module
    #: the open_clip ``model_cfg`` it was built from, with its ``quick_gelu`` decided
    model_cfg: dict[str, Any]
    spec: PreprocessSpec
    #: display name: ``"ARCH/TAG"`` or ``"file:NAME"``
    name: str
    #: the open_clip tokenizer to use (an architecture name), or ``None`` for CLIP's own BPE
    tokenizer_name: Optional[str]


def load_from_tag(arch: str, tag: Optional[str], quick_gelu: Optional[bool], cache_dir: Optional[str]) -> LoadedModel:
    """Build ``arch`` with the weights of the pretrained ``tag`` (open_clip's registry and
    downloads; ``None``: ``openai``). ``quick_gelu=None`` takes the tag's activation."""
    import open_clip

    arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        raise BicmError(f"unknown model architecture {arch!r}; open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is None:
        if DEFAULT_PRETRAINED not in tags:
            raise BicmError(f"pass a pretrained tag for {arch} (known: {', '.join(tags) or 'none'}) or --checkpoint PATH")
        tag = DEFAULT_PRETRAINED
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        raise BicmError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        clip = open_clip.create_model(
            arch, pretrained=tag, device="cpu", precision="fp32", force_quick_gelu=quick_gelu, cache_dir=cache_dir
        )
    except RuntimeError as exc:
        if "download" in str(exc).lower() or "connection" in str(exc).lower():
            raise BicmError(
                f"could not download the {arch}/{tag} weights (offline?); download them where there is "
                "internet and pass the file with --checkpoint PATH (OpenAI .pt, open_clip .bin/.pt or .safetensors)"
            ) from None
        raise
    cfg = open_clip.get_model_config(arch) or {}
    cfg = dict(cfg, quick_gelu=quick_gelu)
    spec = PreprocessSpec.from_open_clip(open_clip.get_model_preprocess_cfg(clip))
    return LoadedModel(clip, cfg, spec, f"{arch}/{tag}", arch)


def load_from_file(path: Path, arch: Optional[str], quick_gelu: Optional[bool]) -> LoadedModel:
    """Build the model of a local weights file or open_clip model folder (see the module docs
    for the formats and where the architecture comes from)."""
    import open_clip

    if not path.exists():
        raise BicmError(f"checkpoint not found: {path}")
    config: Optional[dict[str, Any]] = None
    if path.is_dir():
        config = _read_sidecar_config(path / "open_clip_config.json")
        weights = _find_weights_in_dir(path)
        if weights is None:
            raise BicmError(f"no weights file (.safetensors, .bin, .pt, .pth) in folder {path}")
        path = weights
    contents = read_state_dict(path)
    state_dict, is_torchscript = contents.state, contents.is_torchscript
    config = contents.config or config or _read_sidecar_config(path.parent / "open_clip_config.json")

    if arch is not None:
        arch = arch.replace("/", "-")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise BicmError(f"unknown model architecture {arch!r}")
        preprocess_cfg: dict[str, Any] = {}
        tokenizer_name: Optional[str] = arch
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False)) or is_torchscript
    elif config is not None:
        model_cfg = dict(config["model_cfg"])
        preprocess_cfg = dict(config.get("preprocess_cfg", {}))
        tokenizer_name = None
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False))
    else:
        model_cfg = infer_model_cfg(state_dict, path)
        preprocess_cfg = {}
        tokenizer_name = None
        if quick_gelu is None:
            quick_gelu = True
            if not is_torchscript:
                warn(
                    f"{path.name} does not record its activation; assuming QuickGELU (OpenAI CLIP weights). "
                    "Pass --quick-gelu or --no-quick-gelu (Python: quick_gelu=) to choose"
                )
    model_cfg = dict(model_cfg, quick_gelu=bool(quick_gelu))
    build_cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    custom = bool(model_cfg.get("custom_text") or "hf_model_name" in (model_cfg.get("text_cfg") or {}))
    _check_declared_size(custom, build_cfg, state_dict, path)
    try:
        clip = open_clip.CustomTextCLIP(**build_cfg) if custom else open_clip.CLIP(**build_cfg)
    except (TypeError, ValueError, AssertionError) as exc:
        raise BicmError(f"cannot build a model from the config of {path}: {exc}") from None
    _load_state_dict(clip, state_dict, path, contents.optional)
    spec_cfg = dict(size=clip.visual.image_size)
    spec_cfg.update(preprocess_cfg)
    spec = PreprocessSpec.from_open_clip(spec_cfg)
    return LoadedModel(clip, model_cfg, spec, f"file:{path.name}", tokenizer_name)


#: A model may hold this much more than the file's tensors (buffers no file stores, such as
#: the text tower's attention mask).
_DECLARED_SLACK = 64 << 20


def _check_declared_size(custom: bool, build_cfg: dict[str, Any], state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse an architecture that would hold more than the file's tensors, before building it.

    The config comes from the file (or beside it) and a few bytes of it can ask for gigabytes
    (``width: 8192``): the model is first built on the meta device (no memory), and its
    parameters and buffers compared with the bytes the file really stores, as fp32.
    """
    import open_clip

    from .safeload import stored_bytes

    layers = 0
    for tower in ("vision_cfg", "text_cfg"):
        value = (build_cfg.get(tower) or {}).get("layers", 0) if isinstance(build_cfg.get(tower), dict) else 0
        layers += sum(value) if isinstance(value, (list, tuple)) else value if isinstance(value, int) else 0
    if layers > len(state):  # every layer holds tensors: more layers than tensors cannot fit
        raise BicmError(f"checkpoint {path.name} does not fit the architecture: {layers} layers, {len(state)} tensors in the file")
    try:
        with torch.device("meta"):
            probe = open_clip.CustomTextCLIP(**build_cfg) if custom else open_clip.CLIP(**build_cfg)
        declared = sum(t.numel() for t in list(probe.parameters()) + list(probe.buffers())) * 4
    except (TypeError, ValueError, AssertionError, RuntimeError, OverflowError) as exc:
        raise BicmError(f"cannot build a model from the config of {path}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    held = sum(t.numel() for t in state.values()) * 4
    held = min(held, 2 * stored_bytes(state.values()))  # views of one storage count once (fp16 files: x2)
    if declared > held + _DECLARED_SLACK:
        raise BicmError(
            f"checkpoint {path.name} does not fit the architecture: the config asks for "
            f"{declared / 2**20:,.0f} MB of weights, the file holds {held / 2**20:,.0f} MB (nothing was built)"
        )


@dataclass
class CheckpointContents:
    """What :func:`read_state_dict` found in a weights file.

    Attributes
    ----------
    state: parameter name -> tensor (``module.`` prefixes and OpenAI extras removed).
    config: an embedded open_clip config (``{"model_cfg": ..., "preprocess_cfg": ...}``) or None.
    is_torchscript: the file is a TorchScript archive (the OpenAI format).
    optional: names that may be left unused (buffers of a TorchScript archive, such as
        its attention mask).
    """

    state: dict[str, torch.Tensor]
    config: Optional[dict[str, Any]] = None
    is_torchscript: bool = False
    optional: frozenset[str] = frozenset()


def read_state_dict(path: Path) -> CheckpointContents:
    """Read the tensors of a checkpoint file without executing any pickled code.

    Kept instead of ``open_clip.factory.load_state_dict``, which reads the file with a plain
    ``torch.load`` (no memory-bomb scan, a retry without ``weights_only`` on ``TypeError``,
    no way to read an OpenAI TorchScript archive as data): see the module docs. The
    unwrapping after the read (``{"state_dict": ...}``, ``module.`` prefixes, OpenAI's extra
    entries) is the same as open_clip's, except that ``module.`` is stripped only when every
    name has it (open_clip looks at the first name only).
    """
    config = None
    is_torchscript_file = False
    optional: frozenset[str] = frozenset()
    path = regular_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                state = {k: handle.get_tensor(k) for k in handle.keys()}
            if "open_clip_config" in meta:
                config = json_loads(meta["open_clip_config"], path)
        elif _is_torchscript(path):
            # never torch.jit.load: that compiles and runs the archive's code
            is_torchscript_file = True
            state, optional = read_torchscript(path)
        else:
            try:
                loaded = read_torch_file(path, "checkpoint")  # capped: no memory bombs, nothing run
            except BicmError as exc:
                detail = str(exc).replace(f"refusing to read {path}: ", "refusing its pickle: ").replace(f"cannot read {path}: ", "")
                raise BicmError(f"cannot read checkpoint {path}: {detail}") from None
            if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, Mapping):
                raise BicmError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
            state = dict(loaded)
    except BicmError:
        raise
    except Exception as exc:  # corrupt zip, foreign pickle, bad header, ...
        raise BicmError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise BicmError(f"checkpoint {path} contains no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return CheckpointContents(state, config, is_torchscript_file, optional)


def _load_failure(exc: Exception) -> str:
    """Why torch.load refused, in bicm's words (torch's own message advises weights_only=False,
    which would run the file's code)."""
    import pickle
    import re

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text.lower():
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|but got <class ')([\w.]+)", text)
        what = f"it asks for {found.group(1)}" if found else "it holds objects other than tensors and plain containers"
        return (
            f"refusing its pickle: {what}, which model weights never need (nothing from the file was run). "
            "If you trust the file, convert it to safetensors where it came from"
        )
    detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return detail[:200]


def _read_sidecar_config(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        config = json_loads(path.read_text(encoding="utf-8"), path)
    except (OSError, json.JSONDecodeError) as exc:
        raise BicmError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise BicmError(f"{path} has no 'model_cfg' entry")
    return config


def _find_weights_in_dir(folder: Path) -> Optional[Path]:
    """The weights file of an open_clip model folder. Not ``open_clip.factory._find_checkpoint_in_dir``:
    that is private to open_clip and never picks a ``.pt`` file, which bicm accepts."""
    preferred = [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    return found[0] if found else None


def infer_model_cfg(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Infer an open_clip ``model_cfg`` from the tensor shapes of a standard CLIP state dict.

    Follows OpenAI's conventions (64-wide attention heads), which every OpenAI and the
    standard open_clip CLIP architectures share. Models with other head widths need a config
    (``model=`` or an embedded/sidecar ``open_clip_config``).

    open_clip's ``build_model_from_openai_state_dict`` infers the same architecture but
    returns only a model (half of its weights cast to fp16), not the config that
    :class:`~bicm.backbone.Backbone` keeps and :func:`save_checkpoint` writes, and ignores
    the MLP width; hence this function.
    """
    try:
        if "visual.proj" in state:  # ViT
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
            vision_cfg: dict[str, Any] = dict(
                layers=layers, width=width, patch_size=patch, image_size=patch * grid, mlp_ratio=mlp
            )
        elif "visual.attnpool.positional_embedding" in state:  # ModifiedResNet
            counts = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            out = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_cfg = dict(layers=counts, width=width, image_size=out * 32)
        else:
            raise KeyError("visual.proj")
        text_width = state["ln_final.weight"].shape[0]
        text_cfg = dict(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // 64,
            layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        )
        embed_dim = state["text_projection"].shape[1]
    except KeyError as exc:
        raise BicmError(
            f"cannot infer the architecture of {path} (missing {exc}); pass --model ARCH "
            "or put an open_clip_config.json beside it"
        ) from None
    return {"embed_dim": int(embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _to_open_clip_layout(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The state dict in the layout of ``model``, by open_clip's own conversions (the ones its
    ``load_checkpoint`` applies after reading a file): third-party layouts (MobileCLIP) and the
    old layout of a ``CustomTextCLIP``'s text tower (``positional_embedding`` -> ``text.``...).
    A state dict already in ``model``'s layout comes back as it is.

    Not used from ``load_checkpoint``: open_clip's resizing of positional embeddings. It would
    interpolate the positions of a checkpoint made for another image size or context length
    where bicm refuses the file as not fitting the architecture (and asserts when the widths
    differ).
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    try:
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a conversion of a foreign layout failed: the file does not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BicmError(f"checkpoint {path.name} does not fit the architecture: {first}") from None
    return dict(state)


def _load_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, optional: frozenset[str] = frozenset()
) -> None:
    """Load ``state`` into ``model`` (strictly), or say in one line why it does not fit."""
    state = _to_open_clip_layout(model, state, path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k not in optional}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if "logit_scale" in wrong and state["logit_scale"].numel() == own["logit_scale"].numel():
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
        wrong.remove("logit_scale")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise BicmError(f"checkpoint {path.name} does not fit the architecture: " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    model: torch.nn.Module,
    path: Union[str, Path],
    model_cfg: Mapping[str, Any],
    preprocess: Optional[PreprocessSpec] = None,
) -> Path:
    """Save an open_clip model as safetensors that carries its own config (atomic write).

    The file loads with ``load_backbone(checkpoint=path)`` and with open_clip itself
    (``open_clip.create_model(..., pretrained=path)`` given the same architecture).
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = {"model_cfg": dict(model_cfg)}
    if preprocess is not None:
        config["preprocess_cfg"] = preprocess.to_open_clip()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        # one metadata entry: safetensors writes its metadata map in no fixed order, and a single
        # entry keeps the file byte-identical from run to run
        save_file(tensors, str(tmp), metadata={"open_clip_config": json.dumps(config)})
    return path
