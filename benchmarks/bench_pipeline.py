"""The whole pipeline against the hardware floor and against a naive fp32 pipeline, in ONE run.

Workload (Flickr-like): a ViT-B-32-sized CLIP with random weights (QuickGELU), N images of
500x375, 15 queries and 100 named proposals each (fixed boxes: proposal generation is not
timed), QAM + COM + SF with the default config. Run by hand on a quiet machine:

    python benchmarks/bench_pipeline.py [--images 20] [--naive-images 2] [--json out.json]

It measures, in order:

1. the GEMM rate of each precision (square matmuls, fp32 and bf16; fp16 on CUDA);
2. the FLOPs of the workload (torch's FlopCounterMode over one image of the pipeline: every
   matmul/convolution of the forward passes and of QAM's backward) and of one crop;
3. the project's pipeline end to end (`Grounder.ground_many` per image) in its default
   setting (`--precision auto`, what `bicm` does on this machine) and its fastest (the
   precision with the higher measured GEMM rate, and `--compile`: torch.compile of the
   crop/image encoder, whose one-off compile time is reported apart, not in the timing; when
   that candidate is slower end to end than the default, the default is reported as the
   fastest and the candidate under "candidate");
4. crop encoding alone (100 crops), to compare with the GEMM rate;
5. the naive fp32 reference of `naive_pipeline.py` on the first `--naive-images` images
   (per query it redoes everything; its time per image is the same for every image, so the
   ratio uses time per image), and checks it chooses the same boxes as the pipeline.

Prints queries/s, images/s, achieved GFLOP/s, fractions of the GEMM rate and the ratios;
`--json` writes {"speedup_vs_naive", "crop_gemm_fraction", "floor_ratio", "queries_per_s",
"precision", "device", ...}. floor_ratio = measured time / (FLOPs / GEMM rate of the
precision used).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from typing import Callable, Optional

import numpy as np
import torch
from common import random_vit_b32
from naive_pipeline import naive_ground
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bicm import Grounder, Proposals
from bicm.backbone import Backbone, dtype_name, resolve_precision
from bicm.com import crop_pixels, encode_crops

QUERIES = [
    "a man in a blue shirt", "the dog on the left", "two children", "a red car", "the tree",
    "a woman holding an umbrella", "the building in the background", "a bicycle", "grass",
    "the sky", "a white boat", "people walking", "the small bird", "a wooden bench", "the road",
]


def gemm_rate(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> tuple[float, int]:
    """Best GFLOP/s of square matmuls in ``dtype`` (the size grows while one call stays short)."""
    n, rate = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        sync(device)
        start = time.perf_counter()
        calls = 0
        while time.perf_counter() - start < seconds / 4 or calls < 2:
            torch.mm(a, b)
            calls += 1
            sync(device)
        elapsed = time.perf_counter() - start
        rate = max(rate, 2 * n**3 * calls / elapsed / 1e9)
        if n >= 2048 or elapsed / calls > 0.25:
            return rate, n
        n *= 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def workload(n_images: int, seed: int = 0) -> list[tuple[Image.Image, Proposals]]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n_images):
        image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
        xy = rng.uniform(0, [400, 300], size=(100, 2))
        wh = rng.uniform(20, 200, size=(100, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [500, 375])], axis=1)
        names = [f"object {int(i)}" for i in rng.integers(0, 40, 100)]
        items.append((image, Proposals(torch.tensor(boxes, dtype=torch.float32), class_names=names)))
    return items


def run_pipeline(grounder: Grounder, items, queries) -> tuple[float, list]:
    answers = []
    start = time.perf_counter()
    for image, proposals in items:
        grounder.class_names._cache.clear()  # each image's class names are encoded as if new
        answers.append([r.box for r in grounder.ground_many(image, queries, proposals)])
    sync(grounder.backbone.device)
    return time.perf_counter() - start, answers


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` (2 per multiply-add). PyTorch's fused inference attention kernel
    (``_native_multi_head_attention``) is invisible to the counter, so it is switched off while
    counting: the count then includes the attention projections (8.7 vs 5.9 GFLOP per ViT-B-32 crop)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    return int(counter.get_total_flops())


def with_precision(backbone: Backbone, dtype: Optional[torch.dtype], compiled: bool = False) -> Backbone:
    return dataclasses.replace(backbone, amp=None, precision=dtype, compiled=compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--naive-images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-compile", action="store_true", help="The fastest setting without torch.compile.")
    args = parser.parse_args()
    device = torch.device(args.device)
    queries = (QUERIES * 10)[: args.queries]
    items = workload(args.images)

    # 1. GEMM rates
    precisions: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda":
        precisions["fp16"] = torch.float16
    rates: dict[str, float] = {}
    rates_seen: dict[str, list[float]] = {}
    for name, dtype in precisions.items():
        rates[name], n = gemm_rate(dtype or torch.float32, device)
        rates_seen[name] = [rates[name]]
        print(f"GEMM {name:>4}: {rates[name]:9.1f} GFLOP/s (n = {n})", flush=True)

    base = random_vit_b32(args.device)
    default_dtype = resolve_precision("auto", device)
    fastest_name = max(rates, key=rates.get)
    settings = {"default": (default_dtype, False), "fastest": (precisions[fastest_name], not args.no_compile)}

    # 2. FLOPs of the workload (one image: the pipeline's work does not depend on the pixels)
    probe = Grounder(with_precision(base, None))
    image0, props0 = items[0]
    probe.ground_many(image0, queries[:2], props0)  # warm-up
    probe.class_names._cache.clear()
    flops_image = count_flops(lambda: probe.ground_many(image0, queries, props0))
    flops_crop = count_flops(lambda: encode_crops(probe.backbone, image0, props0.boxes[:1]))
    flops_total = flops_image * len(items)
    print(f"FLOPs: {flops_image / 1e9:.1f} GFLOP per image ({flops_crop / 1e9:.2f} per crop), "
          f"{flops_total / 1e12:.2f} TFLOP for {len(items)} images", flush=True)

    # 3. the pipeline, default and fastest settings
    results = {}
    for label, (dtype, compiled) in settings.items():
        if label == "fastest" and (dtype, compiled) == settings["default"]:
            results["fastest"] = results["default"]
            print("fastest setting = the default setting on this machine", flush=True)
            continue
        grounder = Grounder(with_precision(base, dtype, compiled))
        start = time.perf_counter()
        grounder.ground_many(image0, queries[:2], props0)  # warm-up (the bf16 copy of the tower, compiling)
        encode_crops(grounder.backbone, image0, props0.boxes[:1])  # a batch of one may compile apart
        sync(device)
        warmup = time.perf_counter() - start
        seconds, answers = run_pipeline(grounder, items, queries)
        crops_t = []
        for _ in range(3):
            start = time.perf_counter()
            encode_crops(grounder.backbone, image0, props0.boxes)
            sync(device)
            crops_t.append(time.perf_counter() - start)
        crop_seconds = float(np.median(crops_t))
        prep_t = []
        for _ in range(3):
            start = time.perf_counter()
            crop_pixels(image0, props0.boxes.tolist(), grounder.backbone.spec)
            prep_t.append(time.perf_counter() - start)
        name = dtype_name(dtype)
        floor = flops_total / (rates[name] * 1e9)
        results[label] = {
            "precision": name,
            "compiled": compiled,
            "warmup_seconds": warmup,
            "seconds": seconds,
            "answers": answers,
            "queries_per_s": len(items) * len(queries) / seconds,
            "images_per_s": len(items) / seconds,
            "gflops_achieved": flops_total / seconds / 1e9,
            "gemm_fraction": flops_total / seconds / 1e9 / rates[name],
            "floor_ratio": seconds / floor,
            "crops_per_s": 100 / crop_seconds,
            "crop_seconds": crop_seconds,
            "crop_prep_seconds": float(np.median(prep_t)),
            "crop_gemm_fraction": 100 * flops_crop / crop_seconds / 1e9 / rates[name],
        }
        r = results[label]
        print(f"{label} ({name}{', compiled' if compiled else ''}; warm-up {warmup:.1f} s): {seconds:.1f} s, {r['queries_per_s']:.2f} queries/s, {r['images_per_s']:.3f} images/s, "
              f"{r['gflops_achieved']:.1f} GFLOP/s = {100 * r['gemm_fraction']:.0f}% of GEMM, floor ratio {r['floor_ratio']:.2f}; "
              f"crops {r['crops_per_s']:.1f}/s = {100 * r['crop_gemm_fraction']:.0f}% of GEMM "
              f"(cutting and resizing 100 crops alone: {r['crop_prep_seconds']:.2f} s)", flush=True)

    # the GEMM rates again: on a shared machine the rate drifts; the floor uses the best seen
    for name, dtype in precisions.items():
        again, _ = gemm_rate(dtype or torch.float32, device)
        print(f"GEMM {name:>4} again: {again:9.1f} GFLOP/s", flush=True)
        rates_seen[name].append(again)
        rates[name] = max(rates[name], again)
    for r in results.values():
        used = rates[r["precision"]]
        r["gemm_fraction"] = r["gflops_achieved"] / used
        r["floor_ratio"] = r["seconds"] / (flops_total / (used * 1e9))
        r["crop_gemm_fraction"] = 100 * flops_crop / r["crop_seconds"] / 1e9 / used

    # 5. the naive fp32 reference
    naive_items = items[: args.naive_images]
    start = time.perf_counter()
    naive_answers = [naive_ground(base, image, queries, [tuple(b) for b in p.boxes.tolist()], p.class_names) for image, p in naive_items]
    naive_seconds = time.perf_counter() - start
    naive_per_image = naive_seconds / len(naive_items)
    if results["fastest"]["seconds"] > results["default"]["seconds"]:  # the candidate lost: the default is fastest
        print("the fastest candidate was slower end to end than the default; the default is the fastest setting", flush=True)
        results["candidate"], results["fastest"] = results["fastest"], results["default"]
    fast = results["fastest"]
    checked_run = fast if fast["precision"] == "fp32" else results["default"]  # bf16 boxes may differ: not a check
    same = sum(
        int(a is not None and b is not None and np.allclose(a, b, atol=1e-3))
        for ours, theirs in zip(checked_run["answers"], naive_answers) if checked_run["precision"] == "fp32"
        for a, b in zip(ours, theirs)
    )
    checked = sum(len(x) for x in naive_answers) if checked_run["precision"] == "fp32" else 0
    speedup = naive_per_image / (fast["seconds"] / len(items))
    print(f"fastest ({fast['precision']}) against the best GEMM rate: {100 * fast['gemm_fraction']:.0f}% of GEMM, "
          f"floor ratio {fast['floor_ratio']:.2f}, crops at {100 * fast['crop_gemm_fraction']:.0f}% of GEMM", flush=True)
    print(f"naive fp32: {naive_per_image:.1f} s per image ({len(naive_items)} images); speed-up of the fastest setting "
          f"{speedup:.1f}x; same box as the pipeline for {same} of {checked} queries", flush=True)

    report = {
        "speedup_vs_naive": round(speedup, 2),
        "crop_gemm_fraction": round(fast["crop_gemm_fraction"], 3),
        "floor_ratio": round(fast["floor_ratio"], 3),
        "queries_per_s": round(fast["queries_per_s"], 3),
        "precision": fast["precision"],
        "device": args.device if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})",
        "torch": torch.__version__,
        "gemm_gflops": {k: round(v, 1) for k, v in rates.items()},
        "gemm_gflops_seen": {k: [round(x, 1) for x in v] for k, v in rates_seen.items()},
        "workload": {"images": len(items), "queries_per_image": len(queries), "proposals_per_image": 100,
                     "gflop_per_image": round(flops_image / 1e9, 2), "gflop_per_crop": round(flops_crop / 1e9, 3)},
        "default": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results["default"].items() if k != "answers"},
        "fastest": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fast.items() if k != "answers"},
        **({"candidate": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results["candidate"].items() if k != "answers"}}
           if "candidate" in results else {}),
        "naive": {"images": len(naive_items), "seconds_per_image": round(naive_per_image, 2), "same_box": same, "checked": checked},
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
