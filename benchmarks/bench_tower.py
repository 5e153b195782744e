"""The low-precision crop tower, one rewrite at a time, in interleaved paired rounds.

On a shared machine the GEMM rate swings within seconds (other tenants use the core's AMX
unit), so variants are never timed one after the other: every round times each variant once
(alternating their order) next to a square-GEMM probe, and each variant is reported as the
median over the rounds of its ratio to the first variant (and how many rounds it won):

    python benchmarks/bench_tower.py [--rounds 16] [--batch 64] [--device cpu]

Variants (ViT-B-32 with random weights, QuickGELU): the fp32 tower; a plain bf16 copy; then
`bicm.tower.fast_image_tower`'s rewrites added one by one (SiLU fold, patch embedding as a
matmul, oneDNN's fused linear+SiLU, self-attention through scaled_dot_product_attention);
batch sizes of the full tower; the tower before the attention rewrite with PyTorch's fused MHA
inference path switched off (what torch.compile and autograd see).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_pipeline import Probe, sync
from common import random_vit_b32

from bicm.tower import fast_image_tower


class NoFastPath(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.tower(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(was)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    visual = random_vit_b32(args.device).model.visual
    full = fast_image_tower(visual, dtype)
    towers = {
        f"plain {args.dtype} copy": copy.deepcopy(visual).to(dtype),
        "+ SiLU fold": fast_image_tower(visual, dtype, fuse=False, patch_matmul=False, fused_attention=False),
        "+ patch matmul": fast_image_tower(visual, dtype, fuse=False, fused_attention=False),
        "+ fused linear+SiLU": fast_image_tower(visual, dtype, fused_attention=False),
        "+ fused attention (SDPA)": full,
        "fused linear+SiLU, MHA fast path off": NoFastPath(fast_image_tower(visual, dtype, fused_attention=False)),
    }
    variants = {name: (tower, dtype, args.batch) for name, tower in towers.items()}
    variants["fp32 (the model)"] = (visual, torch.float32, args.batch)
    for batch in (16, 32, 128):
        if batch != args.batch:
            variants[f"full, batch {batch}"] = (full, dtype, batch)
    n = 128
    pixels = torch.randn(n, 3, 224, 224, device=device)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(visual(pixels[:8]), dim=-1)
        for name, (tower, dt, batch) in variants.items():
            out = torch.nn.functional.normalize(tower(pixels[:8].to(dt)).float(), dim=-1)
            tower(pixels[:batch].to(dt))  # warm-up
            print(f"{name:>26}: min cosine to fp32 {float((out * reference).sum(-1).min()):.5f}", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        probe = Probe({args.dtype: dtype}, device, 2048)
        for r in range(args.rounds):
            probe()
            order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
            for name, (tower, dt, batch) in order:
                x = pixels.to(dt)
                sync(device)
                start = time.perf_counter()
                for i in range(0, n, batch):
                    tower(x[i : i + batch])
                sync(device)
                rates[name].append(n / (time.perf_counter() - start))
    first = next(iter(rates))
    probes = probe.log[args.dtype]
    print(f"GEMM {args.dtype} probes: median {statistics.median(probes):.0f}, range {min(probes):.0f}-{max(probes):.0f} GFLOP/s")
    print(f"| variant | crops/s (median) | ratio to {first} (median of {args.rounds} paired rounds) | rounds won |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        ratios = [a / b for a, b in zip(values, rates[first])]
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.3f} | {sum(x > 1 for x in ratios)}/{len(ratios)} |")
    print("each step against the one before it:")
    names = list(towers)[:5]
    for prev, cur in zip(names, names[1:]):
        ratios = [a / b for a, b in zip(rates[cur], rates[prev])]
        print(f"  {cur}: x{statistics.median(ratios):.3f} (won {sum(x > 1 for x in ratios)}/{len(ratios)})")


if __name__ == "__main__":
    main()
