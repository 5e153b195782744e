"""The paper's published numbers (Acc@0.5, %), as data, to print beside ours.

Shi, Hayat, Cai: "Unpaired Referring Expression Grounding via Bidirectional Cross-Modal
Matching", Tables 1-6. Row names are bicm's ablation row names; ``Baseline [25]`` is
Wang & Specia (ICCV 2019), ``[26]`` Parcalabescu & Frank (CVPRW 2020).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["PAPER", "paper_numbers"]

_FLICKR_TEST = {
    # Table 4 (components) and Table 1 (the full method, "Ours")
    "QAM": 30.86,
    "COM": 57.60,
    "QAM+COM": 58.43,
    "QAM+COM+SF": 60.15,
    "QAM+COM+SF+KAM": 61.46,
    # Table 5 (top-down maps)
    "QAM (VA) + COM": 57.85,
    "QAM (QA) + COM": 58.43,
    "QAM (VA) + COM + SF": 57.97,
    "QAM (QA) + COM + SF": 60.15,
    # Table 6 (bottom-up information, COM only)
    "object class name": 54.09,
    "visual object": 40.29,
    "visual object + class name": 57.60,
    # baselines (Table 1)
    "Baseline [25]": 53.25,
    "Parcalabescu et al. [26]": 54.91,
}

#: (dataset, split) -> {row name: accuracy in %}
PAPER: dict[tuple[str, str], dict[str, float]] = {
    ("flickr", "test"): _FLICKR_TEST,
    ("referit", "test"): {"QAM+COM+SF+KAM": 42.96, "Baseline [25]": 27.56, "Parcalabescu et al. [26]": 30.08},
    ("gref", "val"): {"QAM+COM+SF+KAM": 52.85, "Baseline [25]": 37.76, "Parcalabescu et al. [26]": 43.93},
}

# RefCOCOg through the refer API defaults to the UMD partition; only "gref" (Google) is the paper's.
_ALIASES = {"flickr30k_entities": "flickr", "refclef": "referit"}


def paper_numbers(dataset: str, split: str) -> Optional[dict[str, float]]:
    """The published numbers for this dataset and split, or ``None``."""
    return PAPER.get((_ALIASES.get(dataset, dataset), split))
