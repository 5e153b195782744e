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
4. crop encoding alone (100 crops), to compare with the GEMM rate, in `--crop-rounds` rounds
   that each pair one timing with the probes around it (median over the rounds);
5. the naive fp32 reference of `naive_pipeline.py` on the first `--naive-images` images
   (per query it redoes everything; its time per image is the same for every image, so the
   ratio uses time per image), and checks it chooses the same boxes as the pipeline.

On a shared machine the GEMM rate drifts (as other tenants use the core's AMX unit; how far
it swung on the Xeon is in benchmarks/README.md), so the floor is computed from GEMM probes taken around each timed piece
(before every image and after the last; around the crop timing), not from one number
measured minutes earlier. The FLOPs are split by the precision they run in: the crop/image
tower in the precision of the setting, everything else (QAM's gradient path, text) in fp32:

    floor = FLOPs_tower / rate(tower precision) + FLOPs_rest / rate(fp32)

floor_ratio = measured time / floor. The same ratios against the best rate seen anywhere in
the run are reported too (``*_best``): conservative, they charge the neighbours' load to us.

Prints queries/s, images/s, achieved GFLOP/s, fractions of the GEMM rate and the ratios;
`--json` writes {"speedup_vs_naive", "crop_gemm_fraction", "floor_ratio", "queries_per_s",
"precision", "device", ...}.
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
from bicm.backbone import Backbone, encode_tokens
from bicm.crops import crop_pixels, encode_crops
from bicm.devices import dtype_name, resolve_precision

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
        if n >= (8192 if device.type == "cuda" else 2048) or elapsed / calls > 0.25:
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


class Probe:
    """Short square-GEMM probes of the given precisions, logged: the rate the machine gives
    right now (one matmul size, about ``seconds`` per precision)."""

    def __init__(self, precisions: dict[str, Optional[torch.dtype]], device: torch.device, n: int, seconds: float = 0.2) -> None:
        self.device, self.seconds, self.n = device, seconds, n
        self.mats = {name: (torch.randn(n, n, device=device).to(dt or torch.float32),
                            torch.randn(n, n, device=device).to(dt or torch.float32)) for name, dt in precisions.items()}
        self.log: dict[str, list[float]] = {name: [] for name in precisions}

    def __call__(self) -> dict[str, float]:
        out = {}
        for name, (a, b) in self.mats.items():
            torch.mm(a, b)
            sync(self.device)
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < self.seconds or calls < 2:
                torch.mm(a, b)
                calls += 1
                sync(self.device)
            out[name] = 2 * self.n**3 * calls / (time.perf_counter() - start) / 1e9
            self.log[name].append(out[name])
        return out


def mean_rates(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: (a[k] + b[k]) / 2 for k in a}


class RowCounter:
    """Counts the images (crops, whole images) that go through ``Backbone.encode_pixels``."""

    def __init__(self) -> None:
        self.rows = 0

    def __enter__(self) -> "RowCounter":
        self._original = Backbone.encode_pixels
        counter = self

        def counted(backbone, pixels, *args, **kwargs):
            counter.rows += int(pixels.shape[0])
            return counter._original(backbone, pixels, *args, **kwargs)

        Backbone.encode_pixels = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        Backbone.encode_pixels = self._original  # type: ignore[method-assign]


def run_pipeline(grounder: Grounder, items, queries, probe: Probe, flops_crop: int, flops_rest: int, tower: str,
                 warm_names: bool = False) -> dict:
    """Time ``ground_many`` image by image, with GEMM probes before each image and after the
    last (not timed). Returns the time, the answers, the FLOPs and the floor from the rates
    probed around each image. ``warm_names``: the class names of every image were encoded
    before (a long run's steady state); otherwise each image's are encoded as if new."""
    answers, seconds, floor, flops_tower, flops_rest_all, ratios = [], 0.0, 0.0, 0, 0, []
    if warm_names:
        grounder.class_names(sorted({n for _, p in items for n in p.class_names or []}))
    before = probe()
    for image, proposals in items:
        if not warm_names:
            grounder.class_names._cache.clear()
        with RowCounter() as rows:
            start = time.perf_counter()
            answers.append([r.box for r in grounder.ground_many(image, queries, proposals)])
            sync(grounder.backbone.device)
            took = time.perf_counter() - start
        seconds += took
        after = probe()
        rates = mean_rates(before, after)
        f_tower = rows.rows * flops_crop
        image_floor = f_tower / (rates[tower] * 1e9) + flops_rest / (rates["fp32"] * 1e9)
        floor += image_floor
        ratios.append(took / image_floor)
        flops_tower += f_tower
        flops_rest_all += flops_rest
        before = after
    return {"seconds": seconds, "answers": answers, "floor_seconds": floor, "flops": flops_tower + flops_rest_all,
            "image_ratios": ratios, "flops_tower": flops_tower, "flops_rest": flops_rest_all}


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


def text_padding_flops(backbone: Backbone, texts: list[str]) -> int:
    """FLOPs of encoding ``texts`` as the backbone does (fixed-shape batches) minus those of
    encoding each text alone at its own length (the useful work)."""
    tokens = backbone.tokenize(texts)
    ends = tokens.argmax(dim=-1) + 1  # CLIP's tokenizer: the end-of-text id is the largest
    with torch.inference_mode():
        batched = count_flops(lambda: backbone.encode_text(texts))
        alone = sum(count_flops(lambda i=i: encode_tokens(backbone.model, tokens[i : i + 1], int(ends[i]))) for i in range(len(texts)))
    return batched - alone


def with_precision(backbone: Backbone, dtype: Optional[torch.dtype], compiled: bool = False) -> Backbone:
    return dataclasses.replace(backbone, amp=None, precision=dtype, compiled=compiled)


def rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k != "answers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--naive-images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-compile", action="store_true", help="The fastest setting without torch.compile.")
    parser.add_argument("--crop-rounds", type=int, default=10, help="Paired (crop timing, GEMM probe) rounds.")
    parser.add_argument("--warm-names", action="store_true",
                        help="Encode the workload's 40 class names before timing (a long run's steady state: the "
                             "Grounder keeps them); by default each image's names are encoded as if new.")
    args = parser.parse_args()
    device = torch.device(args.device)
    queries = (QUERIES * 10)[: args.queries]
    items = workload(args.images)

    # 1. GEMM rates
    precisions: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda":
        precisions["fp16"] = torch.float16
    rates: dict[str, float] = {}
    size = 0
    for name, dtype in precisions.items():
        rates[name], n = gemm_rate(dtype or torch.float32, device)
        size = max(size, n)
        print(f"GEMM {name:>4}: {rates[name]:9.1f} GFLOP/s (n = {n})", flush=True)

    base = random_vit_b32(args.device)
    default_dtype = resolve_precision("auto", device)
    fastest_name = max(rates, key=rates.get)
    settings = {"default": (default_dtype, False), "fastest": (precisions[fastest_name], not args.no_compile)}
    used = {dtype_name(d) for d, _ in settings.values()} | {"fp32"}
    probe = Probe({k: v for k, v in precisions.items() if k in used}, device, size)

    # 2. FLOPs of the workload (one image: the pipeline's work does not depend on the pixels,
    #    except for the number of distinct QAM boxes, counted per image while timing)
    probe_grounder = Grounder(with_precision(base, None))
    image0, props0 = items[0]
    probe_grounder.ground_many(image0, queries[:2], props0)  # warm-up
    probe_grounder.class_names._cache.clear()
    vocabulary = sorted({n for _, p in items for n in p.class_names or []})
    if args.warm_names:
        probe_grounder.class_names(vocabulary)
    with RowCounter() as rows0:
        flops_image = count_flops(lambda: probe_grounder.ground_many(image0, queries, props0))
    flops_crop = count_flops(lambda: encode_crops(probe_grounder.backbone, image0, props0.boxes[:1]))
    flops_rest = flops_image - rows0.rows * flops_crop  # QAM (prefix, last block, backward), text
    # The text tower runs fixed shapes (16 rows, lengths 8, 16, 32, ...: Backbone.encode_text),
    # so some rows and positions are padding. The floor counts only the useful work: each text
    # alone at its own length.
    padding = text_padding_flops(probe_grounder.backbone, queries + ([] if args.warm_names else sorted(set(props0.class_names or []))))
    flops_rest -= padding
    print(f"FLOPs: {flops_image / 1e9:.1f} GFLOP per image ({flops_crop / 1e9:.2f} per crop x {rows0.rows} "
          f"encoded crops; {flops_rest / 1e9:.1f} GFLOP of QAM and text, always fp32, not counting "
          f"{padding / 1e9:.1f} GFLOP of padding in the text tower's fixed-shape batches)", flush=True)
    with torch.inference_mode():
        reference = probe_grounder.backbone.encode_pixels(crop_pixels(image0, props0.boxes.tolist(), base.spec))

    # 3. the pipeline, default and fastest settings
    results = {}
    for label, (dtype, compiled) in settings.items():
        if label == "fastest" and (dtype, compiled) == settings["default"]:
            results["fastest"] = results["default"]
            print("fastest setting = the default setting on this machine", flush=True)
            continue
        grounder = Grounder(with_precision(base, dtype, compiled))
        name = dtype_name(dtype)
        start = time.perf_counter()
        grounder.ground_many(image0, queries[:2], props0)  # warm-up (the low-precision tower, compiling)
        encode_crops(grounder.backbone, image0, props0.boxes[:1])  # a batch of one may compile apart
        sync(device)
        warmup = time.perf_counter() - start
        run = run_pipeline(grounder, items, queries, probe, flops_crop, flops_rest, name, args.warm_names)
        seconds = run["seconds"]
        # 4. crop encoding alone (100 crops), in rounds that each pair one timing with the
        #    probes just before and after it; the fraction is the median over the rounds
        crops_t, crop_fractions, crop_probe = [], [], []
        before = probe()
        for _ in range(args.crop_rounds):
            start = time.perf_counter()
            feats = encode_crops(grounder.backbone, image0, props0.boxes)
            sync(device)
            crops_t.append(time.perf_counter() - start)
            after = probe()
            rate_now = mean_rates(before, after)[name]
            crop_probe.append(rate_now)
            crop_fractions.append(100 * flops_crop / crops_t[-1] / 1e9 / rate_now)
            before = after
        crop_seconds = float(np.median(crops_t))
        prep_t = []
        for _ in range(3):
            start = time.perf_counter()
            crop_pixels(image0, props0.boxes.tolist(), grounder.backbone.spec)
            prep_t.append(time.perf_counter() - start)
        results[label] = {
            "precision": name,
            "compiled": compiled,
            "warmup_seconds": warmup,
            "seconds": seconds,
            "answers": run["answers"],
            "queries_per_s": len(items) * len(queries) / seconds,
            "images_per_s": len(items) / seconds,
            "tflop": run["flops"] / 1e12,
            "tower_flop_share": run["flops_tower"] / run["flops"],
            "gflops_achieved": run["flops"] / seconds / 1e9,
            "floor_seconds": run["floor_seconds"],
            "floor_ratio": seconds / run["floor_seconds"],
            "crops_per_s": 100 / crop_seconds,
            "crop_seconds": crop_seconds,
            "crop_gemm_rate": float(np.median(crop_probe)),
            "crop_gemm_fraction": float(np.median(crop_fractions)),
            "crop_gemm_fraction_range": [round(min(crop_fractions), 3), round(max(crop_fractions), 3)],
            "floor_ratio_median_image": float(np.median(run["image_ratios"])),
            "crop_prep_seconds": float(np.median(prep_t)),
            "crop_min_cosine_to_fp32": float((feats.float() * reference).sum(dim=1).min()),
            "_flops_tower": run["flops_tower"],
            "_flops_rest": run["flops_rest"],
        }
        r = results[label]
        print(f"{label} ({name}{', compiled' if compiled else ''}; warm-up {warmup:.1f} s): {seconds:.1f} s, "
              f"{r['queries_per_s']:.2f} queries/s, {r['images_per_s']:.3f} images/s, {r['gflops_achieved']:.1f} GFLOP/s, "
              f"floor ratio {r['floor_ratio']:.2f} (floor {r['floor_seconds']:.1f} s from the rates around each image; median image "
              f"{r['floor_ratio_median_image']:.2f}); "
              f"crops {r['crops_per_s']:.1f}/s = {100 * r['crop_gemm_fraction']:.0f}% of the {name} GEMM rate around them "
              f"(median of {args.crop_rounds} rounds, {min(crop_fractions) * 100:.0f}-{max(crop_fractions) * 100:.0f}%; probes "
              f"median {r['crop_gemm_rate']:.0f} GFLOP/s); cutting and resizing 100 crops alone: {r['crop_prep_seconds']:.2f} s; "
              f"min cosine of its crop embeddings to fp32 {r['crop_min_cosine_to_fp32']:.5f}", flush=True)

    # 5. the naive fp32 reference, and the pipeline in fp32 on the same images (exactness check)
    naive_items = items[: args.naive_images]
    naive_answers, naive_seconds = [], 0.0
    probe()
    for image, p in naive_items:
        start = time.perf_counter()
        naive_answers.append(naive_ground(base, image, queries, [tuple(b) for b in p.boxes.tolist()], p.class_names))
        naive_seconds += time.perf_counter() - start
        probe()
    naive_per_image = naive_seconds / max(1, len(naive_items))
    fp32_grounder = Grounder(with_precision(base, None))
    fp32_answers = [[r.box for r in fp32_grounder.ground_many(image, queries, p)] for image, p in naive_items]

    def agree(xs, ys) -> int:
        return sum(int(a is not None and b is not None and np.allclose(a, b, atol=1e-3))
                   for x, y in zip(xs, ys) for a, b in zip(x, y))

    checked = sum(len(x) for x in naive_answers)
    same = agree(fp32_answers, naive_answers)

    # the best rate seen anywhere in the run (conservative floors)
    best = {k: max([rates.get(k, 0.0)] + v) for k, v in probe.log.items()}
    if results["fastest"]["seconds"] > results["default"]["seconds"]:  # the candidate lost: the default is fastest
        print("the fastest candidate was slower end to end than the default; the default is the fastest setting", flush=True)
        results["candidate"], results["fastest"] = results["fastest"], results["default"]
    for r in {id(v): v for v in results.values()}.values():
        floor_best = r.pop("_flops_tower") / (best[r["precision"]] * 1e9) + r.pop("_flops_rest") / (best["fp32"] * 1e9)
        r["floor_ratio_best"] = r["seconds"] / floor_best
        r["crop_gemm_fraction_best"] = 100 * flops_crop / r["crop_seconds"] / 1e9 / best[r["precision"]]
        r["same_box_as_fp32_first_images"] = agree(r["answers"][: len(naive_items)], fp32_answers)
    fast = results["fastest"]
    speedup = naive_per_image / (fast["seconds"] / len(items))
    print(f"fastest ({fast['precision']}{', compiled' if fast['compiled'] else ''}): floor ratio {fast['floor_ratio']:.2f} "
          f"({fast['floor_ratio_best']:.2f} against the best rates seen), crops at {100 * fast['crop_gemm_fraction']:.0f}% "
          f"of the GEMM rate around them ({100 * fast['crop_gemm_fraction_best']:.0f}% of the best seen)", flush=True)
    print(f"naive fp32: {naive_per_image:.1f} s per image ({len(naive_items)} images); speed-up of the fastest setting "
          f"{speedup:.1f}x; the pipeline in fp32 chooses the naive box for {same} of {checked} queries, the fastest "
          f"setting the fp32 pipeline's for {fast['same_box_as_fp32_first_images']} of {checked}", flush=True)
    print("GEMM probes (GFLOP/s): " + "; ".join(
        f"{k} median {np.median(v):.0f}, range {min(v):.0f}-{max(v):.0f} over {len(v)}" for k, v in probe.log.items()), flush=True)

    report = {
        "speedup_vs_naive": round(speedup, 2),
        "crop_gemm_fraction": round(fast["crop_gemm_fraction"], 3),
        "floor_ratio": round(fast["floor_ratio"], 3),
        "queries_per_s": round(fast["queries_per_s"], 3),
        "precision": fast["precision"],
        "device": args.device if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})",
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "floor_ratio_best": round(fast["floor_ratio_best"], 3),
        "crop_gemm_fraction_best": round(fast["crop_gemm_fraction_best"], 3),
        "gemm_gflops_start": {k: round(v, 1) for k, v in rates.items()},
        "gemm_gflops_best": {k: round(v, 1) for k, v in best.items()},
        "gemm_probes": {k: {"median": round(float(np.median(v)), 1), "min": round(min(v), 1), "max": round(max(v), 1), "n": len(v)}
                        for k, v in probe.log.items()},
        "workload": {"images": len(items), "queries_per_image": len(queries), "proposals_per_image": 100, "class_names": "warm" if args.warm_names else "new per image",
                     "gflop_per_image": round(flops_image / 1e9, 2), "gflop_per_crop": round(flops_crop / 1e9, 3),
                     "gflop_rest_per_image": round(flops_rest / 1e9, 2)},
        "default": rounded(results["default"]),
        "fastest": rounded(fast),
        **({"candidate": rounded(results["candidate"])} if "candidate" in results else {}),
        "naive": {"images": len(naive_items), "seconds_per_image": round(naive_per_image, 2),
                  "fp32_pipeline_same_box": same, "checked": checked},
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
