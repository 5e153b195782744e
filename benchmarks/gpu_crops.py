"""Crop encoding throughput by batch size, precision and torch.compile (ViT-B-32, random
weights), and the same with crop preparation (cut, resize, normalise on the CPU) included.

Meant for a GPU (see gpu_check.sh); runs anywhere:

    python benchmarks/gpu_crops.py [--device cuda] [--batches 64 256 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from bench_pipeline import workload
from common import random_vit_b32

from bicm.api import default_crop_batch
from bicm.crops import encode_crops
from bicm.devices import resolve_precision


def rate(backbone, pixels: torch.Tensor, batch: int, repeats: int) -> float:
    """Crops per second of ``encode_pixels`` (best of ``repeats``, after one warm-up)."""
    backbone.encode_pixels(pixels[:batch], batch)
    best = 0.0
    for _ in range(repeats):
        if pixels.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        backbone.encode_pixels(pixels, batch)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        best = max(best, pixels.shape[0] / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], help="fp16 only on CUDA.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = random_vit_b32(args.device)
    known = {"fp32": None, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if device.type == "cuda" else {})
    precisions = {name: known[name] for name in args.precisions if name in known}
    n = max(args.batches)
    pixels = torch.randn(n, 3, 224, 224, device=device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "crops_per_s": {}, "auto_precision": str(resolve_precision("auto", device))}
    for name, dtype in precisions.items():
        for compiled in (False, True):
            backbone = dataclasses.replace(base, precision=dtype, compiled=compiled)
            start = time.perf_counter()
            backbone.encode_pixels(pixels[:2], 2)  # the bf16 copy; compiling
            warm = time.perf_counter() - start
            for batch in args.batches:
                crops = rate(backbone, pixels, batch, args.repeats)
                key = f"{name}{'+compile' if compiled else ''}@{batch}"
                report["crops_per_s"][key] = round(crops, 1)
                print(f"{key:>22}: {crops:9.1f} crops/s (warm-up {warm:.1f} s)", flush=True)
    # with preparation on the CPU: one Flickr-like image's 100 crops, default batch for the device
    image, props = workload(1)[0]
    backbone = dataclasses.replace(base, precision=resolve_precision("auto", device))
    batch = default_crop_batch(device)
    encode_crops(backbone, image, props.boxes, batch_size=batch)
    start = time.perf_counter()
    for _ in range(args.repeats):
        encode_crops(backbone, image, props.boxes, batch_size=batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    report["with_preparation_crops_per_s"] = round(100 * args.repeats / (time.perf_counter() - start), 1)
    print(f"100 crops of one image, preparation included (auto precision, batch {batch}): "
          f"{report['with_preparation_crops_per_s']:.1f} crops/s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
