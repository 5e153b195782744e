"""Pictures of results: the heatmap over the image, the candidates and the chosen box."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from .results import GroundingResult
from .atomic import atomic_path

__all__ = ["save_visualization", "render_visualization"]


def save_visualization(
    image: Image.Image,
    results: Sequence[GroundingResult],
    path: Union[str, Path],
    *,
    max_candidates: int = 30,
    dpi: int = 110,
    truths: Optional[Sequence[Optional[Sequence[float]]]] = None,
) -> Path:
    """Draw one panel per query and write a PNG (or any format matplotlib knows) atomically.

    Each panel shows the normalised attention map over the image (when QAM ran), the
    top-scoring candidates (thin white, up to ``max_candidates``), QAM's box ``P_t``
    (dashed yellow) and the chosen box (thick red), titled with the query and its score. Where
    CLIP's whole-image view (its center crop) did not reach, no heat is drawn and a dotted
    black frame marks the view. ``truths`` (one xyxy box or ``None`` per result) adds the true
    box (dashed green) and the chosen box's IoU with it to each panel.
    """
    path = Path(path)
    fig = _figure(image, results, max_candidates, truths)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def render_visualization(
    image: Image.Image,
    results: Sequence[GroundingResult],
    *,
    max_candidates: int = 30,
    dpi: int = 110,
    format: str = "png",
) -> bytes:
    """The picture of :func:`save_visualization`, as the bytes of a ``format`` file (in memory),
    trimmed to the drawn panels."""
    fig = _figure(image, results, max_candidates)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=format, bbox_inches="tight", pad_inches=0.05)
    return buffer.getvalue()


def _figure(
    image: Image.Image,
    results: Sequence[GroundingResult],
    max_candidates: int,
    truths: Optional[Sequence[Optional[Sequence[float]]]] = None,
):
    """One panel per result on a matplotlib ``Figure``.

    Built without pyplot (no global figure registry), so that threads of a server can draw at
    the same time and nothing has to be closed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(results)
    if n == 0:
        raise ValueError("nothing to draw: no results")
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    aspect = image.height / max(image.width, 1)
    panel_w = 5.0
    fig = Figure(figsize=(panel_w * cols, panel_w * aspect * rows + 0.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    pixels = np.asarray(image)
    for ax in axes.flat[n:]:
        ax.axis("off")
    truths = list(truths) if truths is not None else [None] * n
    if len(truths) != n:
        raise ValueError(f"{len(truths)} true boxes for {n} results")
    for ax, result, truth in zip(axes.flat, results, truths):
        extent = (0, image.width, image.height, 0)  # pixel i spans [i, i + 1): the box convention
        ax.imshow(pixels, extent=extent)
        if result.attention is not None:
            values = result.attention.numpy()  # the working size when the image was downscaled
            heat = np.ma.masked_array(values, mask=_outside(result, image, values.shape))
            ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, extent=extent)
            if result.view_box is not None and result.view_box != (0.0, 0.0, float(image.width), float(image.height)):
                _rect(ax, Rectangle, result.view_box, "black", 1.0, ":", 0.6)
        cands = result.candidates
        if len(cands):
            order = cands.fused.argsort(descending=True)[:max_candidates].tolist()
            for idx in order:
                if idx == cands.qam_index or idx in result.selected:
                    continue
                _rect(ax, Rectangle, cands.boxes[idx].tolist(), "white", 0.8, "-", 0.7)
        if result.qam_box is not None:
            _rect(ax, Rectangle, result.qam_box, "yellow", 1.8, "--", 1.0)
        if len(result.selected) > 1:
            for idx in result.selected:
                _rect(ax, Rectangle, cands.boxes[idx].tolist(), "red", 1.0, ":", 1.0)
        if result.box is not None:
            _rect(ax, Rectangle, result.box, "red", 2.8, "-", 1.0)
        score = "no box" if result.score is None else f"score {result.score:.3f}"
        if truth is not None:
            _rect(ax, Rectangle, truth, "lime", 2.2, "--", 1.0)
            overlap = 0.0 if result.box is None else float(box_iou(torch.tensor([result.box]), torch.tensor([list(truth)]))[0, 0])
            score += f", IoU {overlap:.2f} with the truth (green)"
        title = "\n".join(textwrap.wrap(f'"{result.query}"', 50)[:2])
        ax.set_title(f"{title}\n{score}", fontsize=10)
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        ax.axis("off")
    fig.tight_layout()
    return fig


def _outside(result: GroundingResult, image: Image.Image, shape: tuple[int, ...]) -> np.ndarray:
    """``shape`` (the map's ``(H, W)``) True where CLIP's whole-image view did not reach."""
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    if result.view_box is not None:
        x1, y1, x2, y2 = result.view_box  # original pixels
        cols = (np.arange(width) + 0.5) * image.width / width
        rows = (np.arange(height) + 0.5) * image.height / height
        mask |= ((cols < x1) | (cols > x2))[None, :]
        mask |= ((rows < y1) | (rows > y2))[:, None]
    return mask


def _rect(ax, rectangle, box, color, width, style, alpha) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(
        rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width, linestyle=style, alpha=alpha)
    )
