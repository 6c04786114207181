"""Exact top-k: llm-embedder's native search against numpy, faiss and hnswlib, in one run.

For every corpus size N, dimension d, query count Q and thread count, each peer answers the same
queries (k = 10) and the table shows the best wall time, queries per second, recall@10 against
the exact answer, the share of the machine's physical bound reached, and how many times faster
ours is. The bound is measured in the same run:

    time >= max(N * d * bytes / stream_bandwidth, 2 * N * d * Q / sgemm_peak)

with the streaming-read bandwidth from a one-pass sum (``_native.bench.stream_sum``) and the sgemm
peak from the best of numpy's and torch's matmul at that thread count, probed before and after.

Clocks: single-threaded rows (and probes) are timed in process CPU time, which on a shared
machine equals the wall time an idle core would give (descheduled time does not count, memory
stalls do); multi-threaded rows in wall time, which other work on the machine inflates.

Peers: ``ours`` (``llm_embedder.Index(backend="exact")``, falling back to ``_native.topk`` when
the Index is unavailable), ``ours-f16`` (``_native.bench.topk_f16`` over float16 keys: half the
bytes, recall reported against float32), ``numpy`` (float32 matmul + argpartition, queries in
chunks so the score matrix stays under 256 MB), ``faiss`` (``IndexFlatIP``) and ``hnswlib``
(approximate; build parameters in the header). Install the peers with
``pip install ".[bench]" hnswlib``.

Usage:
    python benches/bench_topk.py --quick            # ~1 minute smoke run
    python benches/bench_topk.py                    # N 100k/1M, d 384/768, Q 1/64/1024
    python benches/bench_topk.py --n 100000 --d 768 --q 1,64 --threads 1 --out table.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable

import numpy as np
from llm_embedder import _native

K = 10


# ------------------------------------------------------------------------------------ data


def make_vectors(n: int, d: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors around random centres (embeddings cluster; pure noise flatters no one)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    step = 65536
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x = rng.standard_normal((hi - lo, d), dtype=np.float32)
        x *= 0.6
        x += centers[rng.integers(0, len(centers), hi - lo)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = x
    return out


# ------------------------------------------------------------------------------------ timing


def clock(single_thread: bool) -> Callable[[], float]:
    """The clock a row is judged on: process CPU time for single-threaded runs (on a shared
    machine it is the wall time an idle core would give: time spent descheduled does not
    count, memory stalls do), wall time when several threads run."""
    return time.process_time if single_thread else time.perf_counter


def best_time(
    fn: Callable[[], object], budget_s: float, max_reps: int, single_thread: bool = False
) -> float:
    """Best time of repeated calls (one untimed warm-up unless a call is slow)."""
    now = clock(single_thread)
    t0 = now()
    fn()
    first = now() - t0
    times = [first] if first > 1.0 else []
    spent = first
    while len(times) < max_reps and (not times or spent < budget_s):
        t0 = now()
        fn()
        dt = now() - t0
        times.append(dt)
        spent += dt
    return min(times)


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy then uses whatever OPENBLAS_NUM_THREADS says
        yield
        return
    with threadpool_limits(limits=n):
        yield


def probe_bandwidth(threads: int, gib: float) -> float:
    """Streaming-read bandwidth in bytes/s: best of repeated one-pass sums of a large array."""
    x = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    t = best_time(
        lambda: _native.bench.stream_sum(x, threads=threads), 2.0, 8, single_thread=threads == 1
    )
    return x.nbytes / t


def probe_sgemm(threads: int, size: int) -> tuple[float, str]:
    """Peak float32 FLOP/s: best of numpy's and torch's matmul of two size x size matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    results = {}
    with blas_threads(threads):
        results["numpy"] = flops / best_time(lambda: a @ b, 2.0, 5, threads == 1)
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        results["torch"] = flops / best_time(lambda: ta @ tb, 2.0, 5, threads == 1)
        torch.set_num_threads(old)
    except ImportError:
        pass
    name = max(results, key=results.get)
    return results[name], name


# ------------------------------------------------------------------------------------ peers


class Peer:
    name = ""
    exact = True
    bytes_per_value = 4

    def build(self, keys: np.ndarray, threads: int) -> float:
        return 0.0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Peer):
    name = "ours"

    def __init__(self) -> None:
        self.note = ""
        try:
            from llm_embedder import Index

            self.index_cls = Index
        except (ImportError, AttributeError) as exc:  # absent in a partial checkout
            self.index_cls = None
            self.note = f"llm_embedder.Index unavailable ({exc}); timing _native.topk directly"

    def build(self, keys: np.ndarray, threads: int) -> float:
        t0 = time.perf_counter()
        if self.index_cls is not None:
            self.index = self.index_cls(keys.shape[1], backend="exact", metric="ip")
            self.index.add(keys, list(range(len(keys))))
        else:
            self.keys = keys
        return time.perf_counter() - t0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        _native.set_num_threads(threads)
        if self.index_cls is not None:
            ids, _ = self.index.search(queries, K)
            return np.asarray(ids, dtype=np.int64)
        return _native.topk(queries, self.keys, K)[1]

    def close(self) -> None:
        _native.set_num_threads(0)
        self.index = self.keys = None


class OursTopk(Peer):
    """The native kernel on the very array the numpy peer reads (no Index, no copy): where the
    Index's own buffer happens to sit in slower memory, the two ``ours`` rows differ."""

    name = "ours-topk"

    def build(self, keys: np.ndarray, threads: int) -> float:
        self.keys = keys
        return 0.0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        return _native.topk(queries, self.keys, K, threads=threads)[1]

    def close(self) -> None:
        self.keys = None


class OursF16(Peer):
    name = "ours-f16"
    bytes_per_value = 2

    def build(self, keys: np.ndarray, threads: int) -> float:
        t0 = time.perf_counter()
        self.keys = keys.astype(np.float16)
        return time.perf_counter() - t0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        return _native.bench.topk_f16(queries, self.keys, K, threads=threads)[1]

    def close(self) -> None:
        self.keys = None


class Numpy(Peer):
    name = "numpy"

    def build(self, keys: np.ndarray, threads: int) -> float:
        self.keys = keys
        return 0.0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        n = len(self.keys)
        chunk = max(1, (256 << 20) // (4 * n))
        out = np.empty((len(queries), K), dtype=np.int64)
        with blas_threads(threads):
            for lo in range(0, len(queries), chunk):
                s = queries[lo : lo + chunk] @ self.keys.T
                part = np.argpartition(-s, K - 1, axis=1)[:, :K]
                order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
                out[lo : lo + chunk] = np.take_along_axis(part, order, 1)
        return out

    def close(self) -> None:
        self.keys = None


class Faiss(Peer):
    name = "faiss"

    def build(self, keys: np.ndarray, threads: int) -> float:
        import faiss

        self.faiss = faiss
        t0 = time.perf_counter()
        self.index = faiss.IndexFlatIP(keys.shape[1])
        self.index.add(keys)
        return time.perf_counter() - t0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        self.faiss.omp_set_num_threads(threads)
        return self.index.search(queries, K)[1]

    def close(self) -> None:
        self.index = None


class Hnsw(Peer):
    name = "hnswlib"
    exact = False

    def __init__(self, m: int, ef_construction: int, ef: int) -> None:
        self.m, self.ef_construction, self.ef = m, ef_construction, ef

    def build(self, keys: np.ndarray, threads: int) -> float:
        import hnswlib

        t0 = time.perf_counter()
        self.index = hnswlib.Index(space="ip", dim=keys.shape[1])
        self.index.init_index(
            max_elements=len(keys), M=self.m, ef_construction=self.ef_construction, random_seed=0
        )
        self.index.add_items(keys, np.arange(len(keys)), num_threads=threads)
        self.index.set_ef(self.ef)
        return time.perf_counter() - t0

    def search(self, queries: np.ndarray, threads: int) -> np.ndarray:
        return self.index.knn_query(queries, k=K, num_threads=threads)[0].astype(np.int64)

    def close(self) -> None:
        self.index = None


def interleaved(
    peers: list[Peer], queries: np.ndarray, threads: int, budget_s: float, max_reps: int
) -> dict[str, tuple[float, float, np.ndarray]]:
    """Best wall and CPU time and the answer of every peer, calling them in turns so that they
    all see the same machine load (other work on a shared machine comes and goes)."""
    wall: dict[str, list[float]] = {p.name: [] for p in peers}
    cpu: dict[str, list[float]] = {p.name: [] for p in peers}
    found: dict[str, np.ndarray] = {}

    def call(p: Peer, keep: bool) -> float:
        w0, c0 = time.perf_counter(), time.process_time()
        out = p.search(queries, threads)
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        found.setdefault(p.name, out)
        if keep:
            wall[p.name].append(dw)
            cpu[p.name].append(dc)
        return dw

    spent = 0.0
    for p in peers:  # warm-up round, kept when slow: a rep of seconds is already a fair sample
        w0 = time.perf_counter()
        spent += call(p, keep=False)
        if time.perf_counter() - w0 > 1.0:
            wall[p.name].append(time.perf_counter() - w0)
            cpu[p.name].append(float("inf"))  # unknown for the warm-up: never the minimum
    while min(len(v) for v in wall.values()) < max_reps and (
        spent < budget_s or min(len(v) for v in wall.values()) == 0
    ):
        for p in peers:
            spent += call(p, keep=True)
    return {p.name: (min(wall[p.name]), min(cpu[p.name]), found[p.name]) for p in peers}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


# ------------------------------------------------------------------------------------ main


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def parse_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, a minute or so")
    ap.add_argument("--n", type=parse_ints, help="corpus sizes (default 100000,1000000)")
    ap.add_argument("--d", type=parse_ints, help="dimensions (default 384,768)")
    ap.add_argument("--q", type=parse_ints, help="query counts (default 1,64,1024)")
    ap.add_argument("--threads", type=parse_ints, help="thread counts (default 1,2)")
    ap.add_argument("--peers", default="ours,ours-topk,ours-f16,numpy,faiss,hnswlib")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--hnsw-ef-construction", type=int, default=100)
    ap.add_argument("--hnsw-ef", type=int, default=64)
    ap.add_argument(
        "--hnsw-max-n",
        type=int,
        default=10**9,
        help="skip hnswlib above this N (its build dominates the run on 2 cores)",
    )
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per cell")
    ap.add_argument("--out", help="also write the table (Markdown) to this file")
    args = ap.parse_args(argv)

    if args.quick:
        ns, ds, qs, ths = [20_000], [384], [1, 64, 256], [1, 2]
        probe_gib, gemm = 0.25, 1024
    else:
        ns, ds, qs, ths = [100_000, 1_000_000], [384, 768], [1, 64, 1024], [1, 2]
        probe_gib, gemm = 1.0, 2048
    ns, ds, qs, ths = args.n or ns, args.d or ds, args.q or qs, args.threads or ths
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"# bench_topk: exact top-{K} (best of repeats, peers called in turns)")
    say()
    say(
        f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{platform.processor() or platform.platform()}"
    )
    try:
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[0]
        say(f"load average at start: {load} (other work on the machine inflates wall times)")
    except OSError:
        pass
    say(f"hnswlib: M={args.hnsw_m}, ef_construction={args.hnsw_ef_construction}, ef={args.hnsw_ef}")

    def probe(label: str) -> dict[int, tuple[float, float]]:
        say()
        say(f"probes ({label}):")
        say()
        say("| threads | stream read GB/s | sgemm GFLOP/s (best of) |")
        say("|---:|---:|---:|")
        found = {}
        for t in ths:
            bw = probe_bandwidth(t, probe_gib)
            peak, who = probe_sgemm(t, gemm)
            found[t] = (bw, peak)
            say(f"| {t} | {bw / 1e9:.1f} | {peak / 1e9:.0f} ({who}) |")
        return found

    # Probed before and after the peers; the bound uses the better of the two readings, so
    # a probe slowed by other work cannot flatter the percentages.
    first = probe("before")

    peers: list[Peer] = []
    for name in wanted:
        if name == "ours":
            ours = Ours()
            peers.append(ours)
            if ours.note:
                say(f"\nnote: {ours.note}")
        elif name == "ours-topk":
            peers.append(OursTopk())
        elif name == "ours-f16":
            peers.append(OursF16())
        elif name == "numpy":
            peers.append(Numpy())
        elif name == "faiss":
            try:
                import faiss  # noqa: F401

                peers.append(Faiss())
            except ImportError:
                say("\nnote: faiss-cpu not installed, skipped (pip install faiss-cpu)")
        elif name == "hnswlib":
            try:
                import hnswlib  # noqa: F401

                peers.append(Hnsw(args.hnsw_m, args.hnsw_ef_construction, args.hnsw_ef))
            except ImportError:
                say("\nnote: hnswlib not installed, skipped")
        else:
            ap.error(f"unknown peer {name!r}")

    rows: list[dict] = []
    for n in ns:
        for d in ds:
            centers = np.random.default_rng(1).standard_normal((1024, d)).astype(np.float32)
            keys = make_vectors(n, d, seed=2, centers=centers)
            queries = make_vectors(max(qs), d, seed=3, centers=centers)
            truth = _native.topk(queries, keys, K, threads=max(ths))[1]
            active = [p for p in peers if not (isinstance(p, Hnsw) and n > args.hnsw_max_n)]
            for peer in active:
                build_s = peer.build(keys, max(ths))
                if build_s > 1.0:
                    progress(f"{peer.name} build for N={n} d={d}: {build_s:.1f} s")
            for t in ths:
                for q in qs:
                    qq = np.ascontiguousarray(queries[:q])
                    max_reps = 50 if q == 1 else 10
                    times = interleaved(active, qq, t, args.budget * len(active), max_reps)
                    for peer in active:
                        wall_s, cpu_s, found = times[peer.name]
                        # single-threaded rows are judged on CPU time (see `clock`)
                        secs = cpu_s if t == 1 and np.isfinite(cpu_s) else wall_s
                        row = {"n": n, "d": d, "q": q, "t": t, "peer": peer.name, "secs": secs}
                        row["wall"], row["cpu"] = wall_s, cpu_s
                        row["recall"] = recall(found, truth[:q])
                        row["bytes"] = peer.bytes_per_value
                        rows.append(row)
                        progress(f"N={n} d={d} Q={q} threads={t} {peer.name}: {secs * 1e3:.1f} ms")
            for peer in active:
                peer.close()
            gc.collect()
            del keys, queries
            gc.collect()

    second = probe("after")
    bound = {t: (max(first[t][0], second[t][0]), max(first[t][1], second[t][1])) for t in ths}
    ours_secs = {(r["n"], r["d"], r["q"], r["t"]): r["secs"] for r in rows if r["peer"] == "ours"}
    say()
    say("ms: CPU time for 1 thread, wall time for more (see the header); QPS, % of bound and")
    say("the ratio use it. wall ms is shown beside it.")
    say()
    say("| N | d | Q | thr | peer | ms | wall ms | QPS | recall@10 | % of bound | ours faster by |")
    say("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n, d, q, t = r["n"], r["d"], r["q"], r["t"]
        bw, peak = bound[t]
        t_bound = max(n * d * r["bytes"] / bw, 2.0 * n * d * q / peak)
        r["pct"] = 100.0 * t_bound / r["secs"]
        ours_s = ours_secs.get((n, d, q, t))
        ratio = f"{r['secs'] / ours_s:.2f}x" if ours_s and r["peer"] != "ours" else ""
        say(
            f"| {n} | {d} | {q} | {t} | {r['peer']} | {r['secs'] * 1e3:.1f} | "
            f"{r['wall'] * 1e3:.1f} | "
            f"{q / r['secs']:.0f} | {r['recall']:.3f} | {r['pct']:.0f}% | {ratio} |"
        )

    summarize(rows, say)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


def summarize(rows: list[dict], say: Callable[[str], None]) -> None:
    """The targets of the top-k issue, checked on this run's rows."""
    by = {(r["n"], r["d"], r["q"], r["t"], r["peer"]): r for r in rows}
    say()
    say("## targets")
    for (n, d, q, t, peer), r in sorted(by.items()):
        if peer != "ours":
            continue
        exact = {
            p: by[(n, d, q, t, p)]["secs"] for p in ("numpy", "faiss") if (n, d, q, t, p) in by
        }
        best = min(exact.values()) if exact else None
        checks = []
        if q == 1:
            checks.append(f"{r['pct']:.0f}% of bound (target >= 85%)")
        if q == 64:
            for p, goal in (("numpy", 3.0), ("faiss", 5.0)):
                if p in exact:
                    checks.append(f"{exact[p] / r['secs']:.1f}x {p} (target >= {goal:g}x)")
        if q >= 1024 and "faiss" in exact:
            checks.append(f"{exact['faiss'] / r['secs']:.2f}x faiss (target >= 1.1x)")
        if best is not None:
            checks.append(f"{best / r['secs']:.2f}x best exact peer (target >= 1x)")
        say(f"- N={n} d={d} Q={q} threads={t}: " + "; ".join(checks))


if __name__ == "__main__":
    sys.exit(main())
