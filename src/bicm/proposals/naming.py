"""Naming class-agnostic proposals by CLIP zero-shot classification over a vocabulary.

Vocabularies: ``vg1600`` (the 1600 Visual Genome object names of the paper's detector,
shipped with bicm), ``coco80`` (COCO's 80 classes), ``shapes`` (the shapes world's five
shapes), or a text file with one name per line
(lines may list synonyms separated by commas: the first is used).

Each box gets the vocabulary name whose prompt embedding is closest to the box crop's CLIP
embedding; its "name score" is the softmax probability of that name over the vocabulary at
the model's own temperature (``logit_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image

from ..backbone import Backbone
from ..errors import BicmError
from ..safeload import regular_file
from . import Proposals

__all__ = ["Vocabulary", "ClipNamer", "BUILTIN_VOCABULARIES"]

BUILTIN_VOCABULARIES = {"vg1600": "visual_genome_objects_1600.txt", "coco80": "coco_80.txt", "shapes": "shapes.txt"}


@dataclass(frozen=True)
class Vocabulary:
    """A list of class names with a name for itself (``"vg1600"``, ``"file:my.txt"``)."""

    name: str
    names: tuple[str, ...]

    @classmethod
    def load(cls, spec: Union[str, Path]) -> "Vocabulary":
        """``"vg1600"``, ``"coco80"`` or a path to a text file (one name per line)."""
        spec = str(spec)
        if spec in BUILTIN_VOCABULARIES:
            text = resources.files("bicm.proposals").joinpath("vocab", BUILTIN_VOCABULARIES[spec]).read_text("utf-8")
            return cls(spec, _parse(text))
        path = Path(spec)
        if path.exists():
            regular_file(path, "vocabulary")
        if not path.is_file():
            raise BicmError(f"unknown vocabulary {spec!r}: use {', '.join(BUILTIN_VOCABULARIES)} or a text file")
        try:
            names = _parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise BicmError(f"cannot read vocabulary {path}: {exc}") from None
        if not names:
            raise BicmError(f"vocabulary {path} has no names")
        return cls(f"file:{path.name}", names)

    def __len__(self) -> int:
        return len(self.names)


def _parse(text: str) -> tuple[str, ...]:
    return tuple(line.split(",")[0].strip() for line in text.splitlines() if line.strip())


class ClipNamer:
    """Names boxes with the CLIP zero-shot class of their crops.

    Parameters
    ----------
    backbone: the CLIP that encodes crops and names.
    vocabulary: a :class:`Vocabulary`, or a spec for :meth:`Vocabulary.load`.
    template: prompt for each name (CLIP's usual ``"a photo of a {}."``).
    encode_text: how the prompts become embeddings (default: the backbone).
    """

    def __init__(
        self,
        backbone: Backbone,
        vocabulary: Union[Vocabulary, str, Path],
        template: str = "a photo of a {}.",
        encode_text: Optional[Callable[[list[str]], torch.Tensor]] = None,
    ) -> None:
        if template.count("{}") != 1:
            raise BicmError(f"naming template must contain exactly one {{}}, got {template!r}")
        self.backbone = backbone
        self.encode_text = encode_text or backbone.encode_text
        self.vocabulary = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary.load(vocabulary)
        self.template = template
        self._text: Optional[torch.Tensor] = None

    @property
    def id(self) -> str:
        return f"clip-names({self.vocabulary.name},{self.template!r})"

    @property
    def text_features(self) -> torch.Tensor:
        """``(V, E)`` L2-normalised prompt embeddings of the vocabulary (computed once)."""
        if self._text is None:
            self._text = self.encode_text([self.template.format(n) for n in self.vocabulary.names])
        return self._text

    def classify(self, crop_features: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Names and probabilities for ``(N, E)`` L2-normalised crop embeddings."""
        if crop_features.shape[0] == 0:
            return [], torch.zeros(0)
        scale = float(getattr(self.backbone.model, "logit_scale", torch.tensor(4.6052)).exp().clamp(max=100))
        probs = (scale * crop_features @ self.text_features.T).softmax(dim=-1)
        best, index = probs.max(dim=-1)
        return [self.vocabulary.names[i] for i in index.tolist()], best.float().cpu()

    def name(self, proposals: Proposals, image: Image.Image, crop_features: Optional[torch.Tensor] = None) -> Proposals:
        """A copy of ``proposals`` with a class name (and name score) for every box.

        ``crop_features`` (``(N, E)``, L2-normalised) avoids encoding the crops again when the
        caller already has them.
        """
        if crop_features is None:
            from ..crops import encode_crops

            crop_features = encode_crops(self.backbone, image, proposals.boxes.to(self.backbone.device))
        names, scores = self.classify(crop_features)
        named = proposals.with_names(list(names), scores)
        named.meta["named_by"] = self.id
        return named
