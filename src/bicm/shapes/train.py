"""`bicm train-clip`: a small CLIP trained contrastively on the shapes world.

The model is a standard open_clip ``CLIP`` (ViT image tower, causal text transformer, the
standard tokenizer), so it loads through the same path as any open_clip checkpoint. Its
preprocessing squashes the whole image to the input size (``resize_mode="squash"``), so the
attention maps cover every pixel.

Data: a pool of images generated once (scenes rendered at full size and squashed to the
input, and single-object images so that proposal crops are in distribution), captioned anew
every time a sample is drawn: referring expressions of the scene (the same generator as the
test queries, so the text is in distribution), object descriptions with absolute positions,
and names of single objects. Horizontal flips swap "left" and "right". Loss: symmetric
InfoNCE with a learnable temperature. Everything is seeded; the same command gives the same
weights on the same machine and torch version.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_write_text
from ..checkpoints import save_checkpoint
from ..interrupt import Interrupted, TrainingState, deferred, ignore_in_worker, load_state, state_path
from ..preprocess import PreprocessSpec
from ..provenance import versions
from .world import COLOURS, SHAPES, WORLD_VERSION, Referent, ShapeObject, make_scene, phrase_text, referents, render, single_object_image

__all__ = ["TrainConfig", "train_clip", "model_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    layers: int = 4
    head_width: int = 16
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    context_length: int = 20
    embed_dim: int = 128
    crop_scale: float = 0.8
    scenes: int = 14000
    singles: int = 7000
    batch_size: int = 256
    steps: int = 2600
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    threads: int = 2
    eval_pairs: int = 512
    eval_every: int = 100


def model_config(cfg: TrainConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of the shapes CLIP."""
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.width,
            "layers": cfg.layers,
            "head_width": cfg.head_width,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    return PreprocessSpec(size=(cfg.image_size, cfg.image_size), resize_mode="squash")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
@dataclass
class Sample:
    pixels: np.ndarray  # (3, S, S) uint8, already squashed to the input size
    objects: tuple[ShapeObject, ...]
    width: int
    height: int
    referents: list[Referent] = field(default_factory=list)
    single: bool = False


def _to_input(image: Image.Image, size: int) -> np.ndarray:
    """``(3, size, size)`` uint8: the same bicubic squash as bicm.preprocess.preprocess."""
    resized = image.resize((size, size), Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).copy()


def pool_size(cfg: "TrainConfig") -> int:
    """Side of the stored pool images: the input size, or 1.25 times it when batches take
    random crops (so that a crop is resized down, never up)."""
    return cfg.image_size if cfg.crop_scale >= 1 else int(round(cfg.image_size * 1.25))


def _make_chunk(args: tuple[int, int, int, dict]) -> list[Sample]:
    seed, start, count, cfg_dict = args
    cfg = TrainConfig(**cfg_dict)
    side = pool_size(cfg)
    out = []
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        if index < cfg.scenes:
            scene = make_scene(rng, "phrase" if rng.random() < 0.5 else "ref")
            out.append(Sample(_to_input(render(scene), side), scene.objects, scene.width, scene.height, referents(scene)))
        else:
            image, obj = single_object_image(rng, side=96)
            out.append(Sample(_to_input(image, side), (obj,), 96, 96, [], single=True))
    return out


def make_pool(cfg: TrainConfig, progress: Optional[Callable[[int, int], None]] = None) -> list[Sample]:
    """The training images, generated with up to ``cfg.threads`` processes (deterministic)."""
    import multiprocessing as mp

    total = cfg.scenes + cfg.singles
    chunk = 500
    jobs = [(cfg.seed, start, min(chunk, total - start), asdict(cfg)) for start in range(0, total, chunk)]
    pool: list[Sample] = []
    if cfg.threads > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # children only draw: no torch
        with mp.get_context(method).Pool(cfg.threads, initializer=ignore_in_worker) as workers:
            for part in workers.imap(_make_chunk, jobs):
                pool.extend(part)
                if progress:
                    progress(len(pool), total)
    else:
        for job in jobs:
            pool.extend(_make_chunk(job))
            if progress:
                progress(len(pool), total)
    return pool


def _absolute_position(obj: ShapeObject, width: int, height: int) -> Optional[str]:
    cx, cy = obj.centre
    fx, fy = cx / width, cy / height
    if fx < 0.33:
        return "on the left"
    if fx > 0.67:
        return "on the right"
    if fy < 0.33:
        return "at the top"
    if fy > 0.67:
        return "at the bottom"
    return "in the middle"


_FLIP = {"left": "right", "right": "left"}


def _describe(obj: ShapeObject, rng: np.random.Generator) -> str:
    return f"{obj.colour} {obj.shape}" if rng.random() < 0.8 else obj.shape


def caption(sample: Sample, rng: np.random.Generator, flipped: bool) -> str:
    """A fresh caption for a pool sample (positions follow the flip).

    Single objects: their name ("the red ellipse", "a red ellipse", "ellipse"). Scenes: one
    of their referring expressions phrased in either style (the same generator as the
    queries of the datasets, on other scenes), an object with its absolute position ("a red
    ellipse on the left"), or a list of two or three of the objects ("a red ellipse and a
    blue star").
    """
    if sample.single:
        obj = sample.objects[0]
        return str(rng.choice([f"the {obj.colour} {obj.shape}", f"a {obj.colour} {obj.shape}", f"{obj.colour} {obj.shape}", obj.shape]))
    choice = rng.random()
    if sample.referents and choice < 0.5:
        ref = sample.referents[int(rng.integers(len(sample.referents)))]
        text = phrase_text(ref, "ref" if rng.random() < 0.5 else "phrase", rng)
    elif choice < 0.8 or len(sample.objects) < 2:
        obj = sample.objects[int(rng.integers(len(sample.objects)))]
        text = "a " + _describe(obj, rng)
        if rng.random() < 0.6:
            text += " " + _absolute_position(obj, sample.width, sample.height)
    else:
        k = min(len(sample.objects), int(rng.integers(2, 4)))
        picked = rng.choice(len(sample.objects), size=k, replace=False)
        text = " and ".join("a " + _describe(sample.objects[int(i)], rng) for i in picked)
    if flipped:
        text = " ".join(_FLIP.get(w, w) for w in text.split())
    return text


class Batches:
    """Random batches of (pixels, token ids) from the pool, seeded."""

    def __init__(self, pool: list[Sample], cfg: TrainConfig, tokenizer: Any, seed: int) -> None:
        self.pool, self.cfg, self.tokenizer = pool, cfg, tokenizer
        self.rng = np.random.default_rng(seed)
        spec = preprocess_spec(cfg)
        self.mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def pixels(self, arrays: list[np.ndarray], augment: bool = True) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised model inputs from pool images. With ``augment`` and
        ``cfg.crop_scale < 1``, each is a random crop (area ``crop_scale``-1 of the image,
        aspect 3/4-4/3, anywhere), as CLIP's training crops are; otherwise the whole image.
        Either way resized to the input size by RoIAlign (bilinear, 2x2 samples per pixel)."""
        from torchvision.ops import roi_align

        x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
        side, size = x.shape[-1], self.cfg.image_size
        crop = augment and self.cfg.crop_scale < 1
        if side != size or crop:
            boxes = []
            for b in range(x.shape[0]):
                w = h = float(side)
                if crop:
                    area = float(self.rng.uniform(self.cfg.crop_scale, 1.0)) * side * side
                    ratio = math.exp(float(self.rng.uniform(math.log(3 / 4), math.log(4 / 3))))
                    w, h = min(float(side), math.sqrt(area * ratio)), min(float(side), math.sqrt(area / ratio))
                x0, y0 = float(self.rng.uniform(0, side - w)), float(self.rng.uniform(0, side - h))
                boxes.append([float(b), x0, y0, x0 + w, y0 + h])
            x = roi_align(x, torch.tensor(boxes), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        return (x - self.mean) / self.std

    def __call__(self, indices: Optional[np.ndarray] = None, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if indices is None:
            indices = self.rng.integers(0, len(self.pool), size=self.cfg.batch_size)
        arrays, texts = [], []
        for i in indices:
            sample = self.pool[int(i)]
            flip = augment and bool(self.rng.random() < 0.5)
            arrays.append(sample.pixels[:, :, ::-1] if flip else sample.pixels)
            texts.append(caption(sample, self.rng, flip))
        return self.pixels(arrays, augment), self.tokenizer(texts), texts


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _retrieval(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, texts: list[str]) -> tuple[float, float]:
    """Top-1 image->text and text->image accuracy over ``len(images)`` held-out pairs.

    Captions repeat (many images are "the red ellipse"), so retrieving any caption with the
    same text, or any image whose caption has the same text, counts as correct.
    """
    with torch.inference_mode():
        f = F.normalize(model.encode_image(images), dim=-1)
        g = F.normalize(model.encode_text(tokens), dim=-1)
        sim = f @ g.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    rows = torch.arange(len(texts))
    return float(same[rows, sim.argmax(1)].float().mean()), float(same[sim.argmax(0), rows].float().mean())


def zero_shot_single(model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, n: int = 300) -> float:
    """Accuracy of naming held-out single-object images among all colour x shape names."""
    names = [f"the {c} {s}" for c in COLOURS for s in SHAPES]
    rng = np.random.default_rng([cfg.seed, 31337])
    spec = preprocess_spec(cfg)
    arrays, truth = [], []
    for _ in range(n):
        image, obj = single_object_image(rng, side=96)
        arrays.append(_to_input(image, cfg.image_size))
        truth.append(names.index(f"the {obj.colour} {obj.shape}"))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(np.stack(arrays)).float() / 255.0 - mean) / std
    with torch.inference_mode():
        f = F.normalize(model.encode_image(pixels), dim=-1)
        g = F.normalize(model.encode_text(tokenizer(names)), dim=-1)
    return float(((f @ g.T).argmax(1) == torch.tensor(truth)).float().mean())


def held_out(cfg: TrainConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The held-out pairs (another seed; half scenes, half single objects) and their captions."""
    held_cfg = asdict(TrainConfig(**{**asdict(cfg), "scenes": cfg.eval_pairs // 2}))
    pool = _make_chunk((cfg.seed + 7, 0, cfg.eval_pairs, held_cfg))
    return Batches(pool, cfg, tokenizer, seed=cfg.seed + 3)(np.arange(len(pool)), augment=False)


def clip_metrics(model: torch.nn.Module, cfg: TrainConfig, map_images: int = 0) -> dict[str, Any]:
    """What the model card reports: held-out retrieval, zero-shot single-object naming and,
    with ``map_images``, whether the attention maps localise (:func:`bicm.shapes.probe.map_metrics`
    on that many ``val`` scenes of each protocol)."""
    import open_clip

    from .probe import backbone_of, map_metrics

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    images, tokens, texts = held_out(cfg, tokenizer)
    i2t, t2i = _retrieval(model, images, tokens, texts)
    maps = {}
    if map_images:
        backbone = backbone_of(model, preprocess_spec(cfg), cfg.context_length)
        maps = {"localisation": {p: map_metrics(backbone, p, "val", map_images) for p in ("ref", "phrase")}}
    return {
        **maps,
        "retrieval": {
            "pairs": cfg.eval_pairs,
            "image_to_text_top1": i2t,
            "text_to_image_top1": t2i,
            "note": "held-out pairs (half scenes, half single objects); a caption with the same text counts as correct",
        },
        "zero_shot_single_object_30_way": zero_shot_single(model, tokenizer, cfg),
    }


_STATE_FORMAT = "bicm-train-clip-state-2"


def train_clip(
    cfg: TrainConfig,
    out: Path,
    *,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_pool: Optional[Callable[[int, int], None]] = None,
    save_every: int = 100,
    on_resume: Optional[Callable[[int], None]] = None,
    map_images: int = 100,
) -> dict[str, Any]:
    """Train the shapes CLIP and write ``out`` (safetensors), its curves and a model card.

    Resumable: every ``save_every`` steps (0: never) and on Ctrl-C, the training state (weights,
    optimizer, data-order random state, history) is written atomically to
    :func:`state_path`; the same call later continues from it (``on_resume(step)`` is told)
    and gives the same weights as an uninterrupted run. The state file is removed at the end.
    On Ctrl-C it raises :class:`~bicm.interrupt.Interrupted` saying what was kept.

    Returns the model card (also written next to the weights as ``<out>.json``).
    """
    import open_clip

    out = Path(out)
    saved_state = state_path(out)
    resumed = load_state(saved_state, _STATE_FORMAT, asdict(cfg))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    training = TrainingState(saved_state, _STATE_FORMAT, asdict(cfg), resumed, started)
    try:
        pool = make_pool(cfg, on_pool)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while generating the image pool; {training.kept()}") from None
    pool_seconds = time.perf_counter() - started
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    model = open_clip.CLIP(**{k: v for k, v in model_config(cfg).items()})
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    batches = Batches(pool, cfg, tokenizer, seed=cfg.seed + 1)
    eval_images, eval_tokens, eval_texts = held_out(cfg, tokenizer)

    history = training.history
    first = training.restore(model, optim, batches.rng)
    if training.resumed is not None and on_resume is not None:
        on_resume(first)

    completed = first
    data_rng = batches.rng.bit_generator.state  # the data order's state before step `completed`
    try:
        for step in range(first, cfg.steps):
            data_rng = batches.rng.bit_generator.state
            for group in optim.param_groups:
                group["lr"] = lr_at(step)
            images, tokens, _ = batches()
            image_f, text_f, scale = model(images, tokens)
            logits = scale * image_f @ text_f.T
            target = torch.arange(len(images))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            optim.zero_grad(set_to_none=True)
            loss.backward()
            with deferred():  # the update and its record happen together or not at all
                optim.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                record = {"step": step + 1, "loss": loss.item(), "temperature": 1.0 / scale.item()}
                history.append(record)
                completed = step + 1
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                model.eval()
                i2t, t2i = _retrieval(model, eval_images, eval_tokens, eval_texts)
                model.train()
                record.update(i2t=i2t, t2i=t2i)
            if on_step is not None:
                on_step(step + 1, record)
            if save_every > 0 and completed % save_every == 0 and completed < cfg.steps:
                training.save(completed, model, optim, batches.rng.bit_generator.state)
    except KeyboardInterrupt:
        if completed > first:
            # interrupted inside step `completed` (its batch already drawn) or just after it
            training.save(completed, model, optim, data_rng if completed == step else batches.rng.bit_generator.state)
        raise training.stopped(completed, cfg.steps) from None
    model.eval()
    seconds = training.seconds()
    model = model.half().float()  # the card describes the shipped (float16) weights exactly
    metrics = clip_metrics(model, cfg, map_images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.half(), out, model_config(cfg), preprocess_spec(cfg))
    card = {
        "model": "bicm shapes CLIP",
        "command": f"bicm train-clip --out {out.name} --seed {cfg.seed} --steps {cfg.steps}",
        "config": asdict(cfg),
        "open_clip_model_cfg": model_config(cfg),
        "world": {"version": WORLD_VERSION, "shapes": list(SHAPES), "colours": list(COLOURS)},
        "training_seconds": round(seconds, 1),
        "pool_seconds": round(pool_seconds, 1),
        **metrics,
        "final_loss": history[-1]["loss"],
        "weights_dtype": "float16 (loaded as float32)",
        "torch": torch.__version__,
        "versions": versions(),
        "seed": cfg.seed,
        "resumed_from_step": first or None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    atomic_write_text(out.parent / (out.stem + ".json"), json.dumps(card, indent=1) + "\n")
    atomic_write_text(out.parent / (out.stem + ".history.json"), json.dumps(history) + "\n")
    plot_curves(history, out.parent / (out.stem + ".curves.png"))
    saved_state.unlink(missing_ok=True)
    return card


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and retrieval accuracy against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = 25
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) > window else losses
    left.plot(steps, losses, color="0.8", linewidth=0.8, label="loss")
    left.plot(steps[len(steps) - len(smooth) :], smooth, color="C0", label=f"mean of {window}")
    left.set_xlabel("step")
    left.set_ylabel("InfoNCE loss")
    left.legend()
    evals = [h for h in history if "i2t" in h]
    right.plot([h["step"] for h in evals], [h["i2t"] for h in evals], marker="o", label="image -> text")
    right.plot([h["step"] for h in evals], [h["t2i"] for h in evals], marker="o", label="text -> image")
    right.set_xlabel("step")
    right.set_ylabel("top-1 retrieval (held-out pairs)")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
