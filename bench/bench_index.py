"""Retrieval index benchmark: exact torch search against FAISS on a synthetic bank of 1M embeddings.

A benchmark, not a test. The bank is clustered, as real embeddings are (unit vectors scattered
around 1,000 random centres), so that approximate search is meaningful; queries come from the
same distribution but are not in the bank. For each backend: build time, query latency at batch 1
and batch 64, and (FAISS) recall@10 against the exact search.

    .venv/bin/python bench/bench_index.py                  # needs `pip install faiss-cpu` (the retrieval extra)
    .venv/bin/python bench/bench_index.py --n 200000 --hnsw

Prints a table and merges the figures into bench/results.json under the "index" key.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import common  # noqa: F401,E402  (puts the project on sys.path)
from common import merge_results  # noqa: E402
from model.retrieval import ExactIndex, FaissIndex, Index, SearchResult  # noqa: E402


def clustered_bank(n: int, dim: int, clusters: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank (n, dim), held-out queries (256, dim)): unit vectors around random unit centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=-1)

    def draw(m: int) -> torch.Tensor:
        out = torch.empty(m, dim)
        for s in range(0, m, 100_000):  # chunked: the temporaries stay small
            e = min(m, s + 100_000)
            c = centres[torch.randint(0, clusters, (e - s,), generator=g)]
            out[s:e] = F.normalize(c + spread * torch.randn(e - s, dim, generator=g) / dim**0.5, dim=-1)
        return out

    return draw(n), draw(256)


def latency_ms(fn: Callable[[torch.Tensor], SearchResult], queries: torch.Tensor, batch: int, reps: int) -> float:
    """Median wall time of one search call at this batch size, in milliseconds (one warm-up call)."""
    fn(queries[:batch])
    times = []
    for r in range(reps):
        q = queries[(r * batch) % len(queries):][:batch]
        if len(q) < batch:
            q = queries[:batch]
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of the true top-k ids that the approximate top-k contains."""
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())) / truth.numel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="bank size")
    p.add_argument("--dim", type=int, default=128, help="embedding width (the default retriever's dim)")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.5,
                   help="noise norm around each centre (1.5: cosine ≈ 0.55 to it; clusters overlap, as in real banks)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=4096, help="IVF cells (≈ 4·sqrt(n))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--hnsw", action="store_true", help="also build HNSW (slow to build at 1M on one thread)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    bank, queries = clustered_bank(args.n, args.dim, args.clusters, args.spread, args.seed)
    print(f"bank {args.n:,} × {args.dim} ({args.clusters} clusters) in {time.perf_counter() - t0:.1f}s")
    rows: list[dict[str, Any]] = []

    def run(name: str, index: Index, build_s: float, truth: torch.Tensor | None, **extra: Any) -> torch.Tensor:
        search = lambda q: index.search(q, args.k)  # noqa: E731
        found = index.search(queries, args.k).ids
        row = {"backend": name, "build_s": round(build_s, 2),
               "latency_ms_batch1": round(latency_ms(search, queries, 1, 20), 3),
               "latency_ms_batch64": round(latency_ms(search, queries, 64, 5), 3),
               "recall@10": round(recall_at_k(found, truth), 4) if truth is not None else 1.0, **extra}
        row["per_query_ms_batch64"] = round(row["latency_ms_batch64"] / 64, 3)
        rows.append(row)
        print(f"  {name:<28} build {row['build_s']:>7.2f}s  batch1 {row['latency_ms_batch1']:>9.3f} ms  "
              f"batch64 {row['latency_ms_batch64']:>9.3f} ms  recall@10 {row['recall@10']:.4f}")
        return found

    t = time.perf_counter()
    exact = ExactIndex(args.dim)
    exact.add(bank)
    truth = run("exact torch fp32", exact, time.perf_counter() - t, None)
    t = time.perf_counter()
    exact_bf16 = ExactIndex(args.dim, dtype=torch.bfloat16)
    exact_bf16.add(bank)
    run("exact torch bf16", exact_bf16, time.perf_counter() - t, truth)
    del exact_bf16

    faiss_info: dict[str, Any] = {}
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        faiss_info = {"faiss": faiss.__version__}
        t = time.perf_counter()
        flat = FaissIndex(args.dim, kind="flat")
        flat.add(bank)
        run("faiss flat (exact)", flat, time.perf_counter() - t, truth)
        del flat
        t = time.perf_counter()
        ivf = FaissIndex(args.dim, kind="ivf", nlist=args.nlist, nprobe=args.nprobe[0])
        # train the cells on a sample (FAISS's guidance: 30–256 points per cell), then add everything
        sample = bank[torch.randperm(args.n, generator=torch.Generator().manual_seed(1))[: min(args.n, 64 * args.nlist)]]
        ivf.train(sample)
        ivf.add(bank)
        build = time.perf_counter() - t
        for nprobe in args.nprobe:
            ivf.set_search_params(nprobe=nprobe)
            run(f"faiss IVF{args.nlist} nprobe={nprobe}", ivf, build, truth, nlist=args.nlist, nprobe=nprobe)
        del ivf
        if args.hnsw:
            t = time.perf_counter()
            hnsw = FaissIndex(args.dim, kind="hnsw", m=32, ef_search=64)
            hnsw.add(bank)
            build = time.perf_counter() - t
            for ef in (64, 256):
                hnsw.set_search_params(ef_search=ef)
                run(f"faiss HNSW32 ef={ef}", hnsw, build, truth, m=32, ef_search=ef)
    except ImportError:
        print("faiss-cpu is not installed: `pip install faiss-cpu` to benchmark the approximate backend")

    results = {
        "versions": faiss_info,
        "bank": {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "queries": 256,
                 "k": args.k},
        "protocol": "median wall time of one search call (batch 1: 20 calls, batch 64: 5 calls) after one warm-up; "
                    "recall@10 = share of the exact top-10 found, over 256 held-out queries",
        "backends": rows,
    }
    merge_results("index", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
