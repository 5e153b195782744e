"""End to end on the Flickr-like workload as `bicm eval` runs it: JPEG files decoded, proposals
from a detections file, crops cut by each backend, with and without work prepared ahead
(bicm.prefetch); images/s, crop preparation's share of an image, and on CUDA the encoder's
share of the time (torch.cuda events around every `encode_pixels`) and peak GPU memory.

    python benchmarks/bench_prefetch.py [--device cuda] [--images 20] [--quick] [--json out.json]

Also: crops/s of cutting alone and of cutting + encoding, per backend and precision; the
pixel difference and embedding cosine between the backends' crops (random ViT-B-32).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_pipeline import QUERIES, sync, workload
from common import random_vit_b32

from bicm import BiCMConfig, Grounder
from bicm.backbone import Backbone
from bicm.crops import crop_uint8, encode_crops
from bicm.devices import dtype_name, resolve_precision
from bicm.imageio import load_image
from bicm.prefetch import ahead
from bicm.proposals.sources import make_source


class EncoderTimer:
    """Time inside ``Backbone.encode_pixels``: CUDA events on a GPU, wall time on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.events, self.seconds = device, [], 0.0

    def __enter__(self) -> "EncoderTimer":
        self._original = Backbone.encode_pixels
        timer = self

        def timed(backbone, pixels, *args, **kwargs):
            if timer.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = timer._original(backbone, pixels, *args, **kwargs)
                end.record()
                timer.events.append((start, end))
                return out
            begin = time.perf_counter()
            out = timer._original(backbone, pixels, *args, **kwargs)
            timer.seconds += time.perf_counter() - begin
            return out

        Backbone.encode_pixels = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        Backbone.encode_pixels = self._original  # type: ignore[method-assign]

    def total(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000
        return self.seconds


def end_to_end(grounder: Grounder, files: list[tuple[str, Path]], source, queries, depth: int) -> dict:
    """The eval loop (prepare -> extract -> score per image), timed as a whole."""
    device = grounder.backbone.device

    def prepare(item):
        key, path = item
        return grounder.prepare(load_image(path, exif_transpose=False), source, image_key=key, crops=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    answers = []
    with EncoderTimer(device) as timer:
        sync(device)
        start = time.perf_counter()
        for (key, path), ready in ahead(files, prepare, depth):
            image = ready.get() if ready is not None else prepare((key, path))
            grounder.class_names._cache.clear()  # as bench_pipeline: every class name is new
            answers.append([r.box for inputs in grounder.iter_extract(image, queries, image_key=key) for r in grounder.score(inputs)])
        sync(device)
        seconds = time.perf_counter() - start
        encoder = timer.total()
    out = {"seconds": seconds, "images_per_s": len(files) / seconds, "encoder_share": encoder / seconds, "answers": answers}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 images, 3 queries, 1 repeat: a check that the script runs.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.images, args.queries, args.repeats = 4, 3, 1
    device = torch.device(args.device)
    queries = (QUERIES * 10)[: args.queries]
    items = workload(args.images)
    base = random_vit_b32(args.device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "images": args.images, "queries_per_image": len(queries)}

    # 1. the backends' crops: pixels and embeddings
    image0, props0 = items[0]
    boxes = props0.boxes
    a = crop_uint8(image0, boxes.tolist(), base.spec, "pil").int()
    b = crop_uint8(image0, boxes.tolist(), base.spec, "tensor", device).cpu().int()
    with torch.inference_mode():
        fa = encode_crops(base, image0, boxes, backend="pil")
        fb = encode_crops(base, image0, boxes, backend="tensor")
    cos = (fa * fb).sum(1)
    report["pixels"] = {"max_abs_diff": int((a - b).abs().max()), "mean_abs_diff": float((a - b).abs().float().mean()),
                        "min_cosine_fp32": float(cos.min()), "mean_cosine_fp32": float(cos.mean())}
    print(f"tensor vs pil crops (100 boxes): pixel diff max {report['pixels']['max_abs_diff']}, mean "
          f"{report['pixels']['mean_abs_diff']:.5f}; embedding cosine min {cos.min():.6f}, mean {cos.mean():.6f}", flush=True)

    # 2. crops/s: cutting alone, and cut + encode, per backend and precision
    precisions = {"fp32": None, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if device.type == "cuda" else {})
    report["crops_per_s"] = {}
    for backend in ("pil", "tensor"):
        def cut():
            crop_uint8(image0, boxes.tolist(), base.spec, backend, device)
            sync(device)
        cut()
        t = min(_timed(cut) for _ in range(args.repeats))
        report["crops_per_s"][f"{backend} cut"] = 100 / t
        for name, dtype in precisions.items():
            import dataclasses

            bb = dataclasses.replace(base, amp=None, precision=dtype)
            with torch.inference_mode():
                run = lambda: (encode_crops(bb, image0, boxes, backend=backend), sync(device))  # noqa: E731
                run()
                t = min(_timed(run) for _ in range(args.repeats))
            report["crops_per_s"][f"{backend} cut+encode {name}"] = 100 / t
    print("crops/s: " + ", ".join(f"{k} {v:.1f}" for k, v in report["crops_per_s"].items()), flush=True)

    # 3. end to end: files, detections file, eval's loop; each backend, with and without work ahead
    dtype = resolve_precision("auto", device)
    import dataclasses

    backbone = dataclasses.replace(base, amp=None, precision=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        files, dets = [], {}
        for i, (image, props) in enumerate(items):
            path = Path(tmp) / f"{i}.jpg"
            image.save(path, quality=95)
            files.append((path.name, path))
            dets[path.name] = {"boxes": props.boxes.tolist(), "class_names": props.class_names}
        (Path(tmp) / "dets.json").write_text(json.dumps({"box_format": "xyxy", "images": dets}))
        source = make_source(str(Path(tmp) / "dets.json"))
        report["end_to_end"] = {}
        for backend in ("pil", "tensor"):
            grounder = Grounder(backbone, BiCMConfig(crop_backend=backend))
            end_to_end(grounder, files[:1], source, queries[:2], 0)  # warm-up
            for depth in (0, 2):
                runs = [end_to_end(grounder, files, source, queries, depth) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                label = f"{backend}, ahead {depth}"
                report["end_to_end"][label] = {k: round(v, 4) for k, v in best.items() if k != "answers"} | {
                    "seconds_all": [round(r["seconds"], 2) for r in runs]}
                print(f"{label} ({dtype_name(dtype)}): {best['images_per_s']:.3f} images/s (runs {report['end_to_end'][label]['seconds_all']} s), "
                      f"encoder {100 * best['encoder_share']:.0f}% of the time"
                      + (f", peak GPU {best['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in best else ""), flush=True)
        # crop preparation's share of an image: cutting 100 crops / the time per image of the default
        per_image = report["end_to_end"]["pil, ahead 2"]["seconds"] / args.images
        report["crop_prep_share"] = {b: (100 / report["crops_per_s"][f"{b} cut"]) / per_image for b in ("pil", "tensor")}
        print("crop preparation (100 crops) / time per image (pil, ahead 2): "
              + ", ".join(f"{b} {100 * v:.1f}%" for b, v in report["crop_prep_share"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
