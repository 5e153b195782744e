"""Write the inputs of the quickstart: a drawn scene, its detections, and random CLIP weights.

No pretrained CLIP can be downloaded on an offline machine, so the quickstart uses a ViT-B-32
with RANDOM weights saved in OpenAI's state-dict format: it exercises the whole pipeline
(QAM + COM + SF) and the real loading path, but its boxes mean nothing. With internet, drop
``--checkpoint`` and bicm downloads the paper's ``ViT-B-32``/``openai`` weights.

Usage: python examples/make_demo_inputs.py OUT_DIR
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import open_clip
import torch
from PIL import Image, ImageDraw


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (480, 320), (70, 150, 80))
    draw = ImageDraw.Draw(image)
    boxes = [[40, 60, 150, 170], [300, 150, 420, 270], [200, 40, 260, 100]]
    draw.rectangle(boxes[0], fill=(220, 40, 40))
    draw.ellipse(boxes[1], fill=(40, 60, 220))
    draw.polygon([(230, 40), (260, 100), (200, 100)], fill=(240, 220, 40))
    image.save(out / "img.png")
    detections = {
        "box_format": "xyxy",
        "images": {"img.png": {"boxes": boxes, "scores": [0.9, 0.8, 0.7], "class_names": ["square", "ball", "triangle"]}},
    }
    (out / "dets.json").write_text(json.dumps(detections, indent=1))
    ckpt = out / "random-vit-b-32.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        logging.disable(logging.WARNING)  # open_clip's "initialized randomly" is the point here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
        logging.disable(logging.NOTSET)
        torch.save(model.state_dict(), ckpt)
    print(f"wrote {out}/img.png, {out}/dets.json, {ckpt}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
