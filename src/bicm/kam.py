"""KAM, knowledge adaptation matching (Sec. 3.5, Fig. 3): the MLP, its training, its file.

The MLP scores one candidate box of one image-query pair from four L2-normalised CLIP
embeddings, concatenated in the paper's order ``[fi, fp_r, fc_r, fq]``::

    (4E) -> FC -> BN -> ReLU -> FC -> BN -> ReLU -> FC -> (1) -> sigmoid = S_KAM

``fi`` is the whole image, ``fp_r`` the crop of box ``r``, ``fc_r`` its class name (zeros
where the proposals carry none and the model was trained without them), ``fq`` the query.

Training (:func:`train_kam`) reads pseudo labels (made by :mod:`bicm.pseudo`), never CLIP:
the loss is the softmax cross-entropy over the candidate boxes of each pair with the
pseudo-labelled box as the target (the loss of Hu et al. 2016 that the paper cites), on the
MLP's pre-sigmoid outputs. Adam, lr 1e-4, 50 epochs (Sec. 4.1), seeded.

A trained model is a safetensors file whose metadata holds its config and the fingerprint
of the backbone whose features it learned (:meth:`KamModel.check_backbone` refuses any
other backbone: the embeddings of two CLIPs are not interchangeable).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .atomic import atomic_path
from .errors import BicmError
from .safeload import json_loads, regular_file

__all__ = ["KamConfig", "KamMLP", "KamPair", "KamModel", "kam_inputs", "train_kam", "pair_loss", "FILE_KEY"]

FILE_KEY = "bicm_kam"
_FORMAT = 1


@dataclass(frozen=True)
class KamConfig:
    """How the KAM MLP is built and trained (paper defaults where it gives them).

    Attributes
    ----------
    hidden: width of the two hidden layers (the paper does not give it).
    epochs: passes over the pseudo labels (50).
    lr: Adam learning rate (1e-4).
    batch_pairs: image-query pairs per step (all candidates of a pair stay together).
    seed: initialisation and shuffling.
    """

    hidden: int = 512
    epochs: int = 50
    lr: float = 1e-4
    batch_pairs: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_pairs < 1:
            raise BicmError("hidden, epochs and batch size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BicmError(f"learning rate must be positive, got {self.lr}")


class KamMLP(nn.Module):
    """Fig. 3: three fully connected layers, BN + ReLU after the first two.

    ``forward`` returns pre-sigmoid logits ``(R,)`` for ``(R, 4E)`` inputs; S_KAM is their
    sigmoid (:meth:`score`).
    """

    def __init__(self, embed_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Linear(4 * embed_dim, hidden),  # fuses the four inputs
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),  # transforms the fused features
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),  # the score
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(R,)`` S_KAM in (0, 1) of ``(R, 4E)`` inputs (BN in inference mode)."""
        return torch.sigmoid(self(x))


def kam_inputs(fi: torch.Tensor, fp: torch.Tensor, fc: Optional[torch.Tensor], fq: torch.Tensor) -> torch.Tensor:
    """``(K, 4E)`` MLP inputs ``[fi, fp_r, fc_r, fq]`` of K candidates.

    fi: ``(E,)`` image; fp: ``(K, E)`` crops; fc: ``(K, E)`` class names or ``None`` (zeros);
    fq: ``(E,)`` query.
    """
    k, e = fp.shape
    fc = torch.zeros(k, e, dtype=fp.dtype, device=fp.device) if fc is None else fc
    return torch.cat([fi.reshape(1, e).expand(k, e), fp, fc.to(fp.dtype), fq.reshape(1, e).expand(k, e)], dim=1)


@dataclass
class KamPair:
    """One pseudo-labelled image-query pair, as the MLP sees it.

    fi: ``(E,)``; fq: ``(E,)``; fp: ``(K, E)``; fc: ``(K, E)`` or ``None``;
    target: indices of the pseudo-labelled candidate(s) (several when the label is a union).
    """

    fi: torch.Tensor
    fq: torch.Tensor
    fp: torch.Tensor
    fc: Optional[torch.Tensor]
    target: list[int]

    def inputs(self, use_names: bool) -> torch.Tensor:
        return kam_inputs(self.fi.float(), self.fp.float(), self.fc.float() if use_names and self.fc is not None else None, self.fq.float())


def pair_loss(logits: torch.Tensor, sizes: Sequence[int], targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean softmax cross-entropy over pairs.

    logits: ``(R,)`` for the candidates of all pairs, pair after pair; sizes: candidates per
    pair; targets: the labelled candidate indices of each pair (uniform target over them).
    """
    padded, mask = _pad(logits, sizes)
    logp = F.log_softmax(padded, dim=1).masked_fill(~mask, 0.0)
    weight = torch.zeros_like(logp)
    for i, target in enumerate(targets):
        weight[i, list(target)] = 1.0 / len(target)
    return -(logp * weight).sum(dim=1).mean()


def _pad(values: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K_max)`` rows of the concatenated ``values`` (-inf padding) and the valid mask."""
    lengths = torch.tensor(list(sizes), device=values.device)
    mask = torch.arange(int(lengths.max()), device=values.device)[None] < lengths[:, None]
    padded = values.new_full(mask.shape, float("-inf"))
    padded = padded.masked_scatter(mask, values)
    return padded, mask


@dataclass
class KamModel:
    """A trained KAM MLP bound to the backbone it learned from."""

    mlp: KamMLP
    config: KamConfig
    backbone_id: str
    backbone_name: str = ""
    use_names: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.mlp.embed_dim

    def fingerprint(self) -> str:
        """A short hash of the weights and config (names this model in run files)."""
        import hashlib

        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.mlp.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_backbone(self, fingerprint: str, name: str = "") -> None:
        """Refuse a backbone other than the one this model was trained on."""
        if fingerprint != self.backbone_id:
            raise BicmError(
                f"this KAM model was trained on backbone {self.backbone_name or '?'}@{self.backbone_id[:12]}, "
                f"not {name or '?'}@{fingerprint[:12]}; train one for this backbone ('bicm pseudo-label', 'bicm train-kam')"
            )

    @torch.no_grad()
    def scores(self, fi: torch.Tensor, fq: torch.Tensor, fp: torch.Tensor, fc: Optional[torch.Tensor]) -> torch.Tensor:
        """``(K,)`` S_KAM of K candidates (shapes as :func:`kam_inputs`)."""
        self.mlp.eval()
        x = kam_inputs(fi.float(), fp.float(), fc.float() if (self.use_names and fc is not None) else None, fq.float())
        return self.mlp.score(x.to(next(self.mlp.parameters()).device)).to(fp.device)

    def to(self, device: Union[str, torch.device]) -> "KamModel":
        self.mlp.to(device)
        return self

    def save(self, path: Union[str, Path]) -> None:
        """Write a safetensors file (atomically) carrying the config and backbone id."""
        from safetensors.torch import save_file

        meta = {
            "format": _FORMAT,
            "embed_dim": self.embed_dim,
            "config": asdict(self.config),
            "backbone_id": self.backbone_id,
            "backbone_name": self.backbone_name,
            "use_names": self.use_names,
            "info": self.info,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.mlp.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={FILE_KEY: json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "KamModel":
        """Read a file written by :meth:`save` (safetensors: no code runs)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        regular_file(path, "KAM model", missing=f"KAM model {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(FILE_KEY)
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BicmError(f"{path} is not a safetensors file ({exc})") from None
        if raw is None:
            raise BicmError(f"{path} is not a bicm KAM model (no {FILE_KEY!r} metadata)")
        try:
            meta = json_loads(raw, path)
        except ValueError as exc:
            raise BicmError(f"{path}: its {FILE_KEY!r} metadata is not valid JSON ({exc})") from None
        config, embed_dim = _check_meta(meta, path)
        # the recorded sizes must match the stored weights before anything is allocated from them
        first = state.get("net.0.weight")
        if not isinstance(first, torch.Tensor) or tuple(first.shape) != (config.hidden, 4 * embed_dim):
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
            raise BicmError(
                f"{path}: weights do not match the recorded config (hidden={config.hidden}, embed_dim={embed_dim}; "
                f"first layer {shape})"
            )
        # every declared size, not only the first layer's, is checked against the file's tensors
        # on the meta device (no memory) before the real layers are allocated
        with torch.device("meta"):
            probe = KamMLP(embed_dim, config.hidden)
        wanted = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if wanted != found:
            bad = next((k for k in wanted if wanted[k] != found.get(k)), None) or next(iter(set(found) - set(wanted)), "?")
            raise BicmError(
                f"{path}: weights do not match the recorded config (hidden={config.hidden}, embed_dim={embed_dim}; "
                f"{bad}: {found.get(bad)} in the file, {wanted.get(bad)} declared)"
            )
        mlp = KamMLP(embed_dim, config.hidden)
        try:
            mlp.load_state_dict(state)
        except RuntimeError as exc:
            raise BicmError(f"{path}: weights do not match the recorded config ({str(exc).splitlines()[0]})") from None
        mlp.eval().to(device)
        return cls(mlp, config, meta["backbone_id"], meta.get("backbone_name", ""), bool(meta.get("use_names", True)), meta.get("info", {}))


def _check_meta(meta: Any, path: Path) -> tuple[KamConfig, int]:
    """The config and embedding width a KAM file records, type-checked (one BicmError line)."""

    def bad(what: str) -> BicmError:
        return BicmError(f"{path}: malformed KAM metadata ({what})")

    if not isinstance(meta, dict):
        raise bad(f"a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != _FORMAT:
        raise BicmError(f"{path}: unsupported KAM file format {str(meta.get('format'))[:40]!r}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad("no 'config' object")
    fields = {"hidden": int, "epochs": int, "lr": (int, float), "batch_pairs": int, "seed": int}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise bad(f"unknown config entry {unknown[0][:40]!r}")
    for key, kind in fields.items():
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], kind)):
            raise bad(f"config {key!r} is a {type(config[key]).__name__}")
    embed_dim = meta.get("embed_dim")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or not 1 <= embed_dim <= 1 << 16:
        raise bad(f"embed_dim {str(embed_dim)[:40]}")
    if not 1 <= config.get("hidden", 512) <= 1 << 16:
        raise bad(f"hidden {config['hidden']}")
    if not isinstance(meta.get("backbone_id"), str):
        raise bad("no 'backbone_id' string")
    if not isinstance(meta.get("backbone_name", ""), str) or not isinstance(meta.get("info", {}), dict):
        raise bad("'backbone_name' or 'info' of the wrong type")
    return KamConfig(**config), embed_dim


def train_kam(
    pairs: Sequence[KamPair],
    config: KamConfig = KamConfig(),
    *,
    use_names: bool = True,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
    state: Optional[Union[str, Path]] = None,
    on_resume: Optional[Callable[[int], None]] = None,
) -> tuple[KamMLP, list[dict[str, float]]]:
    """Train the MLP on pseudo-labelled pairs (CPU; small).

    Returns the MLP (in eval mode) and one history record per epoch: ``loss`` (mean
    cross-entropy), ``agree`` (share of pairs whose top-scored candidate is a labelled one)
    and ``seconds``.

    Resumable when ``state`` (a file path) is given: after every epoch the training state
    (weights, optimizer, shuffling random state, history) is written there atomically; a
    later call with the same pairs and config continues after the last finished epoch
    (``on_resume(epoch)`` is told) and gives the same weights as an uninterrupted run; the
    file is removed at the end. On Ctrl-C it raises :class:`~bicm.interrupt.Interrupted`
    saying what was kept. A state of other pairs or settings is refused.
    """
    from .interrupt import Interrupted, load_state

    pairs = [p for p in pairs if p.fp.shape[0] >= 1 and p.target]
    if not pairs:
        raise BicmError("no pseudo labels to train on (lower --thr-k, or pseudo-label more images)")
    embed_dim = int(pairs[0].fi.shape[-1])
    if any(p.fp.shape[1] != embed_dim for p in pairs):
        raise BicmError("the pseudo labels mix embeddings of different sizes (different backbones?)")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(config.seed)
        mlp = KamMLP(embed_dim, config.hidden)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=config.lr)
    inputs = [p.inputs(use_names) for p in pairs]  # (K_i, 4E) each, built once
    sizes = [x.shape[0] for x in inputs]
    history: list[dict[str, float]] = []
    state_file = None if state is None else Path(state)
    settings: dict[str, Any] = {}
    first = 0
    if state_file is not None:  # the digest reads every input: only worth it when resuming is asked for
        settings = {**asdict(config), "use_names": use_names, "pairs": _pairs_digest(inputs, pairs)}
        saved = load_state(state_file, _STATE_FORMAT, settings)
        if saved is not None:
            mlp.load_state_dict(saved["mlp"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            history = [dict(h) for h in saved["history"]]
            first = int(saved["epoch"])
            if on_resume is not None:
                on_resume(first)
    try:
        _epochs(mlp, optimizer, generator, pairs, inputs, sizes, config, history, first, on_epoch, state_file, settings)
    except KeyboardInterrupt:
        done = len(history)
        if state_file is None or done == 0:
            raise Interrupted("no epoch had finished; nothing to keep" if done == 0 else f"stopped after epoch {done}") from None
        raise Interrupted(f"training state after epoch {done} of {config.epochs} is in {state_file}") from None
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    mlp.eval()
    return mlp, history


_STATE_FORMAT = "bicm-train-kam-state-1"


def _pairs_digest(inputs: Sequence[torch.Tensor], pairs: Sequence[KamPair]) -> str:
    """A short id of the training data (inputs and targets), so a saved state is only resumed
    on the same pseudo labels."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for x, pair in zip(inputs, pairs):
        digest.update(x.detach().to(torch.float32).contiguous().numpy().tobytes())
        digest.update(json.dumps(sorted(pair.target)).encode())
    return digest.hexdigest()


def _epochs(
    mlp: KamMLP,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    pairs: Sequence[KamPair],
    inputs: Sequence[torch.Tensor],
    sizes: Sequence[int],
    config: KamConfig,
    history: list[dict[str, float]],
    first: int,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]],
    state_file: Optional[Path],
    settings: dict[str, Any],
) -> None:
    """Epochs ``first + 1 .. config.epochs`` of :func:`train_kam` (appends to ``history``)."""
    from .interrupt import deferred, save_state

    for epoch in range(first + 1, config.epochs + 1):
        start = time.perf_counter()
        mlp.train()
        order = torch.randperm(len(pairs), generator=generator).tolist()
        total, agree, seen = 0.0, 0, 0
        for b in range(0, len(order), config.batch_pairs):
            batch = order[b : b + config.batch_pairs]
            x = torch.cat([inputs[i] for i in batch])
            if x.shape[0] < 2:  # BatchNorm needs two rows
                continue
            logits = mlp(x)
            loss = pair_loss(logits, [sizes[i] for i in batch], [pairs[i].target for i in batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            top = _pad(logits.detach(), [sizes[i] for i in batch])[0].argmax(dim=1).tolist()
            agree += sum(int(t in pairs[i].target) for t, i in zip(top, batch))
        record = {"epoch": epoch, "loss": total / max(1, seen), "agree": agree / max(1, seen), "seconds": time.perf_counter() - start}
        with deferred():  # the epoch's record and its saved state go together
            history.append(record)
            if state_file is not None:  # the last epoch too, so a Ctrl-C after it keeps it
                saved = {"epoch": epoch, "mlp": mlp.state_dict(), "optimizer": optimizer.state_dict(),
                         "generator": generator.get_state(), "history": history}
                save_state(state_file, _STATE_FORMAT, settings, saved)
        if on_epoch is not None:
            on_epoch(epoch, record)


def save_curve(history: Sequence[dict[str, float]], path: Union[str, Path], title: str = "KAM training") -> None:
    """Loss and agreement per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="loss (softmax CE over candidates)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    other = ax.twinx()
    other.plot(epochs, [100 * h["agree"] for h in history], color="tab:orange", label="top-1 = pseudo label (%)")
    other.set_ylabel("top-1 = pseudo label (%)", color="tab:orange")
    other.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
