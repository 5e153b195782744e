"""`bicm eval` on the local engine and on Ray (`--engine ray`) with 1 and 2 workers, on this machine.

Workload: the shapes world's test scenes (shapes-ref, about 5 queries each), the shipped
shapes CLIP in fp32, selective-search proposals (top 30) named by the shapes vocabulary, the
Table 4 rows, no feature cache. Each engine evaluates the same images into its own run
folder; the predictions are checked to be byte-identical (one torch thread per worker and
for the reference local run, as tests/test_cluster.py runs them; a second local run uses
torch's default, every core).

Reported per engine: the wall time of the whole run (Ray: from ``ray.init`` to shutdown),
Ray's start-up (``ray.init`` of a local runtime), the time to the first image's records
(actors started, each loading the model), and images per second after the first image.

    python benchmarks/bench_ray.py [--images 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bicm.cluster import GrounderSpec, engine
from bicm.data import load_dataset
from bicm.evaluate import ablation_rows, run_eval
from bicm.options import EngineOptions, MethodOptions, ModelOptions, RunOptions, SourceOptions
from bicm.shapes.dataset import ensure_shapes


def run_once(root: Path, out: Path, threads: int, ray_workers: Optional[int]) -> dict[str, Any]:
    """One eval over the world's test split; ``ray_workers=None``: the local engine."""
    model = ModelOptions(model="shapes", device="cpu", precision="fp32", threads=threads)
    source = SourceOptions(proposals="selective-search", top_n=30, name_with="shapes")
    rows = ablation_rows("table4", MethodOptions(selection="paper").config(model, "shapes-ref").replace(components=("qam", "com", "sf")))
    spec = GrounderSpec(model, rows[0][1], source, None, RunOptions(no_cache=True))
    samples = load_dataset("shapes-ref", "test", root, image_root=root)
    options = EngineOptions(engine="local" if ray_workers is None else "ray", workers=ray_workers or 1, cpus_per_worker=1.0)
    stamps: list[float] = []
    start = time.perf_counter()
    with engine(options, spec) as cluster:
        ready = time.perf_counter()
        grounder = spec.build()  # the driver's model (the run file's identity; the local engine's work)
        loaded = time.perf_counter()
        run_eval(grounder, samples, root, out, rows, dataset="shapes-ref", split="test", source=grounder.proposals,
                 progress=False, cluster=cluster, on_image=lambda n: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    images = len(stamps)
    return {
        "engine": (f"local, {threads or 'all'} thread(s)") if ray_workers is None else f"ray x{ray_workers} (1 CPU, 1 thread each)",
        "images": images,
        "wall_s": round(end - start, 2),
        "ray_init_s": round(ready - start, 2),
        "driver_model_s": round(loaded - ready, 2),
        "first_image_s": round(stamps[0] - loaded, 2),
        "images_per_s_after_first": round((images - 1) / (stamps[-1] - stamps[0]), 3) if images > 1 else None,
        "images_per_s_overall": round(images / (end - start), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_shapes(Path(tmp) / "shapes", "ref", ("test",), counts={"test": args.images})
        results = [run_once(root, Path(tmp) / "local", 1, None), run_once(root, Path(tmp) / "local-all", 0, None)]
        for workers in (1, 2):
            results.append(run_once(root, Path(tmp) / f"ray{workers}", 1, workers))
        reference = (Path(tmp) / "local" / "predictions.jsonl").read_bytes()
        for workers in (1, 2):
            assert (Path(tmp) / f"ray{workers}" / "predictions.jsonl").read_bytes() == reference, f"ray x{workers} differs"
    print("| engine | images | wall (s) | Ray start-up (s) | driver model (s) | first image (s) | images/s after the first | images/s overall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['engine']} | {r['images']} | {r['wall_s']} | {r['ray_init_s']} | {r['driver_model_s']} | {r['first_image_s']} "
              f"| {r['images_per_s_after_first']} | {r['images_per_s_overall']} |")
    print("predictions: the Ray runs byte-identical to the local run with one thread")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
