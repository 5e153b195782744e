"""KAM's matching step at scale: the best query of every image, memory bounded.

`bicm.pseudo.best_queries` streams the queries in chunks against the image embeddings, so
peak memory is the image embeddings plus one chunk of similarities, whatever the number of
queries. This script measures time and peak resident memory for synthetic unit embeddings
(the text encoder is replaced by a seeded random generator: this times the matching, not
CLIP) and checks the answer against brute force on a sample of images.

    python benchmarks/bench_pseudo_match.py --images 100000 --queries 100000 20000
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.nn import functional as F

from bicm.pseudo import best_queries


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    images = F.normalize(torch.randn(args.images, args.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    print(f"images {args.images} x {args.dim}: {images.numel() * 4 / 2**20:.0f} MiB; peak RSS so far {rss_mib():.0f} MiB")

    for n_queries in args.queries:
        def encode(texts: list[str]) -> torch.Tensor:  # deterministic per query index
            start = int(texts[0])
            g = torch.Generator().manual_seed(1000 + start)
            return F.normalize(torch.randn(len(texts), args.dim, generator=g), dim=1)

        names = [str(i) for i in range(n_queries)]
        begin = time.perf_counter()
        index, sims = best_queries(images, names, encode, chunk=args.chunk)
        seconds = time.perf_counter() - begin
        peak = rss_mib()
        sample = torch.arange(0, args.images, max(1, args.images // 200))
        truth = torch.stack([(images[sample] @ encode(names[s : s + args.chunk]).T).max(dim=1).values
                             for s in range(0, n_queries, args.chunk)]).max(dim=0).values
        assert torch.allclose(sims[sample], truth, atol=1e-5), "streamed matching differs from brute force"
        flops = 2 * args.images * n_queries * args.dim
        print(
            f"{args.images} images x {n_queries} queries: {seconds:.1f} s ({flops / seconds / 1e9:.0f} GFLOP/s incl. encoding stub), "
            f"peak RSS {peak:.0f} MiB (a full similarity matrix would be {args.images * n_queries * 4 / 2**30:.1f} GiB)"
        )


if __name__ == "__main__":
    main()
