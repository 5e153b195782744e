"""COM: cross-modal object matching (paper Sec. 3.3, Eqs. 6-8).

For Q queries with L2-normalised CLIP text embeddings ``f_q`` and N proposals:

* :func:`s_pq` (Eq. 6): ``S_PQ[q, r] = cos(fp_r, f_q)``, with ``fp_r`` the CLIP embedding of
  the crop of proposal ``r`` (:mod:`bicm.crops` cuts and encodes them).
* :func:`s_cq` (Eq. 7): ``S_CQ[q, r] = cos(fc_r, f_q)``, with ``fc_r`` the text embedding of
  the proposal's class name through a prompt (:class:`ClassNameEncoder`).
* :func:`bottom_up` (Eq. 8): ``S_BU = S_PQ + S_CQ``. Table 6's variants use one term alone
  (``com_mode="class"`` or ``"visual"``).

QAM's box ``P_t`` is a candidate too. It has a crop (so ``S_PQ``: :func:`qam_s_pq`) but no
class name: it borrows the name of the proposal whose name matches the query best
(:func:`borrowed_names`), and with it that proposal's ``S_CQ``.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch

from .backbone import Backbone
from .errors import BicmError

__all__ = ["s_pq", "s_cq", "bottom_up", "borrowed_names", "qam_s_pq", "ClassNameEncoder"]


def s_pq(text: torch.Tensor, crop_feats: torch.Tensor) -> torch.Tensor:
    """Eq. 6: cosine similarity of every query with every proposal crop.

    Parameters
    ----------
    text: ``(Q, E)`` L2-normalised query embeddings ``f_q``.
    crop_feats: ``(N, E)`` L2-normalised crop embeddings ``fp_r``.

    Returns
    -------
    ``(Q, N)``.
    """
    return text @ crop_feats.T


def s_cq(text: torch.Tensor, name_feats: torch.Tensor) -> torch.Tensor:
    """Eq. 7: cosine similarity of every query with every proposal's class name.

    Parameters
    ----------
    text: ``(Q, E)`` L2-normalised query embeddings ``f_q``.
    name_feats: ``(N, E)`` L2-normalised class-name embeddings ``fc_r``.

    Returns
    -------
    ``(Q, N)``.
    """
    return text @ name_feats.T


def bottom_up(s_pq: Optional[torch.Tensor], s_cq: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Eq. 8: ``S_BU = S_PQ + S_CQ`` over whichever terms are present (same shapes, e.g.
    ``(Q, K)`` or ``(K,)``); ``None`` when neither is."""
    terms = [s for s in (s_pq, s_cq) if s is not None]
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def borrowed_names(s_cq: torch.Tensor) -> torch.Tensor:
    """The proposal whose class name ``P_t`` takes, per query: the highest ``S_CQ``.

    Parameters
    ----------
    s_cq: ``(Q, N)`` from :func:`s_cq`, N >= 1.

    Returns
    -------
    ``(Q,)`` int64 proposal indices; ``s_cq.gather(1, idx[:, None])`` is ``P_t``'s ``S_CQ``.
    """
    return s_cq.argmax(dim=1)


def qam_s_pq(
    text: torch.Tensor, boxes: Sequence[Optional[Hashable]], crop_feats: Mapping[Hashable, torch.Tensor]
) -> torch.Tensor:
    """Eq. 6 for QAM's box: ``S_PQ`` of each query with the crop of its own ``P_t``.

    Parameters
    ----------
    text: ``(Q, E)`` query embeddings.
    boxes: each query's ``P_t`` (a key of ``crop_feats``), or ``None`` where QAM found none.
    crop_feats: ``(E,)`` crop embedding of every distinct ``P_t``.

    Returns
    -------
    ``(Q,)``, NaN where a query has no ``P_t``.
    """
    out = torch.full((text.shape[0],), float("nan"), device=text.device)
    for i, box in enumerate(boxes):
        if box is not None:
            out[i] = text[i] @ crop_feats[box]
    return out


class ClassNameEncoder:
    """Text embeddings ``fc_r`` of class names through a prompt template, cached by name.

    Parameters
    ----------
    template: a format string with one ``{}``, e.g. ``"{}"`` (the paper: the bare name)
        or ``"a photo of a {}."``.
    encode_text: how texts become embeddings (default: the backbone; a cached encoder
        can be passed).
    """

    def __init__(
        self,
        backbone: Backbone,
        template: str = "{}",
        encode_text: Optional[Callable[[list[str]], torch.Tensor]] = None,
    ) -> None:
        if template.count("{}") != 1:
            raise BicmError(f"class prompt template must contain exactly one {{}}, got {template!r}")
        self.backbone = backbone
        self.template = template
        self.encode_text = encode_text or backbone.encode_text
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """``(N, E)`` L2-normalised embeddings of ``names``."""
        # the missing names in one call: the backbone encodes every text with fixed shapes, so
        # a name's bits do not depend on which names are still missing (which depends on the
        # images this process saw before): the same in every run, shard and Ray worker
        missing = sorted({n for n in names if n not in self._cache})
        if missing:
            feats = self.encode_text([self.template.format(n) for n in missing])
            self._cache.update(zip(missing, feats))
        if not names:
            return torch.zeros(0, self.backbone.embed_dim, device=self.backbone.device)
        return torch.stack([self._cache[n] for n in names])
