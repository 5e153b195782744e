"""Time of the web demo's first and second request on one image (`bicm serve`'s defaults).

    python benchmarks/bench_serve.py [--repeats 3]

Runs the app in-process (starlette's TestClient, no network) on the shipped shapes CLIP with
selective-search proposals named over the shapes vocabulary and QAM + COM + SF, as the page's
defaults. Each repeat uses a fresh scene of the shapes world (so its first request really is
a new image): the first request grounds one phrase in it, the second request another phrase
in the same image (its proposals and crop features come from the server's in-memory cache).
A warm-up request on another scene comes first (imports, matplotlib's font cache).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from starlette.testclient import TestClient

from bicm.options import ModelOptions
from bicm.serve import create_app, start_service
from bicm.shapes.world import make_scene, render


def scene_png(seed: int) -> bytes:
    scene = make_scene(np.random.default_rng(seed), n_objects=6, size=(360, 280))
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client: TestClient, png: bytes, phrase: str) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.post(
        "/api/ground",
        data={"queries": phrase, "proposals": "selective-search", "components": "qam,com,sf"},
        files={"image": ("scene.png", png, "image/png")},
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    service = start_service(ModelOptions(device="cpu", precision="fp32"))
    print(f"start-up (load the shapes CLIP, hash its weights): {time.perf_counter() - start:.2f} s")
    with TestClient(create_app(service)) as client:
        post(client, scene_png(999), "the red square")  # warm-up
        first, second = [], []
        for seed in range(args.repeats):
            png = scene_png(1000 + seed)
            t1, d1 = post(client, png, "the large star")
            t2, d2 = post(client, png, "the blue circle on the left")
            assert not d1["cache"]["image_seen_before"] and d2["cache"]["image_seen_before"]
            first.append((t1, d1["timing"]))
            second.append((t2, d2["timing"]))
            print(f"scene {seed}: first {t1:.2f} s {d1['timing']}; second {t2:.2f} s {d2['timing']}")
    for name, rows in (("first request (new image)", first), ("second request (same image)", second)):
        med = statistics.median(t for t, _ in rows)
        ground = statistics.median(t["ground_s"] for _, t in rows)
        render = statistics.median(t["render_s"] for _, t in rows)
        print(f"{name}: median {med:.2f} s (grounding {ground:.2f} s, drawing {render:.2f} s)")
    service.close()


if __name__ == "__main__":
    main()
