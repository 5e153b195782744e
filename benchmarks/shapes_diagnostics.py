"""Why BiCM scores what it scores on the shapes world: proposals, maps and QAM's box.

On the first N images of the shapes test split, with the shipped shapes CLIP:

* selective-search recall: share of ground-truth boxes some proposal overlaps with IoU > 0.5
  (single-object queries and all queries);
* pointing game: share of queries whose map maximum lies inside a ground-truth box, for the
  query-aware (QA) and vanilla (VA) maps;
* QAM's box: its area relative to the ground truth, and its IoU.

    python benchmarks/shapes_diagnostics.py [--images 100]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.ops import box_iou

from bicm import Grounder
from bicm.data import load_dataset
from bicm.imageio import load_image
from bicm.proposals.selective import SelectiveSearch
from bicm.shapes.dataset import default_root, ensure_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    root = ensure_shapes(default_root(), ("test",))
    samples = load_dataset("shapes", "test", root)
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.image_file, []).append(s)
    grounder = Grounder.from_pretrained("shapes", device="cpu", components=("qam",))
    search = SelectiveSearch()
    recall_single, recall_all, kinds = [], [], []
    pointing: dict[str, list[bool]] = {"qa": [], "va": []}
    area, iou = [], []
    for image_file, group in list(groups.items())[: args.images]:
        pil = load_image(root / image_file, exif_transpose=False)
        boxes = search.propose(pil).boxes
        for s in group:
            hit = len(boxes) > 0 and float(box_iou(torch.tensor([s.box]), boxes).max()) > 0.5
            recall_all.append(hit)
            if s.kind != "plural":
                recall_single.append(hit)
        features = grounder.extract(pil, [s.query for s in group], None, kinds=("qa", "va"), visual=False, names=False)
        for kind in ("qa", "va"):
            for i, s in enumerate(group):
                m = features.maps[kind].raw[i]
                y, x = divmod(int(m.argmax()), m.shape[1])
                pointing[kind].append(any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in s.boxes))
        for i, s in enumerate(group):
            kinds.append(s.kind)
            b = features.qam_boxes["qa"][i]
            if b is not None:
                g = s.box
                area.append((b[2] - b[0]) * (b[3] - b[1]) / ((g[2] - g[0]) * (g[3] - g[1])))
                iou.append(float(box_iou(torch.tensor([b]), torch.tensor([g]))[0, 0]))
    kinds_arr = np.array(kinds)
    print(f"{len(kinds)} queries on {min(args.images, len(groups))} images")
    print(f"selective-search recall@0.5: single-object {np.mean(recall_single):.3f}, all {np.mean(recall_all):.3f}")
    for kind, hits in pointing.items():
        hits_arr = np.array(hits)
        per = ", ".join(f"{k} {hits_arr[kinds_arr == k].mean():.2f}" for k in sorted(set(kinds)))
        print(f"pointing game ({kind.upper()} map): {hits_arr.mean():.3f} ({per})")
    print(f"QAM box area / truth area: median {np.median(area):.2f} (quartiles {np.quantile(area, 0.25):.2f}-{np.quantile(area, 0.75):.2f})")
    print(f"QAM box IoU: median {np.median(iou):.2f}; IoU > 0.5 for {np.mean(np.array(iou) > 0.5):.3f}")


if __name__ == "__main__":
    main()
