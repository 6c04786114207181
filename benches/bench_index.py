"""Index add, save and load times against faiss (exact) and raw hnswlib (hnsw), one run.

Exact backend at 1M x 384 by default: ``Index.add`` in chunks (normalising, checking NaN and
duplicate ids, amortised buffer growth), ``Index.save`` (temporary folder, fsync, rename) and
``Index.load``, against faiss ``IndexFlatIP`` with ``normalize_L2`` + ``add`` / ``write_index`` /
``read_index`` (and write + fsync, as durable as ours).
HNSW backend (smaller default: a 1M graph takes hours on 2 cores) against raw hnswlib with the
same M / ef_construction. Prints a Markdown table; ratio = peer seconds / our seconds (> 1: we
are faster). One query's top-10 latency is shown for information.

    python benches/bench_index.py                # exact 1M x 384, hnsw 100k x 384
    python benches/bench_index.py --quick        # exact 100k, hnsw 10k
    python benches/bench_index.py --n 200000 --hnsw-n 0
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from llm_embedder import Index


def random_unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        block = rng.standard_normal((min(step, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block
    return out


def clock(fn: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


Row = Tuple[str, str, Optional[float], float, str]  # backend, op, ours s, peer s, peer name


def bench_exact(vectors: np.ndarray, ids: List[str], chunk: int, work: Path) -> List[Row]:
    rows: List[Row] = []
    index = Index(vectors.shape[1])

    def add_ours() -> None:
        for start in range(0, len(vectors), chunk):
            index.add(vectors[start:start + chunk], ids[start:start + chunk])

    t_add, _ = clock(add_ours)
    t_search, _ = clock(lambda: index.search(vectors[12345 % len(vectors)], k=10))
    t_save, _ = clock(lambda: index.save(work / "ours"))
    size = dir_size(work / "ours")
    index = None  # free it before loading
    gc.collect()
    t_load, loaded = clock(lambda: Index.load(work / "ours"))
    assert len(loaded) == len(vectors)  # type: ignore[arg-type]
    del loaded
    gc.collect()

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        flat = faiss.IndexFlatIP(vectors.shape[1])

        def add_faiss() -> None:
            for start in range(0, len(vectors), chunk):
                block = np.array(vectors[start:start + chunk])
                faiss.normalize_L2(block)
                flat.add(block)

        f_add, _ = clock(add_faiss)
        f_save, _ = clock(lambda: faiss.write_index(flat, str(work / "faiss.index")))
        del flat
        gc.collect()
        f_load, flat2 = clock(lambda: faiss.read_index(str(work / "faiss.index")))
        del flat2
        gc.collect()
        rows += [("exact", "add", t_add, f_add, "faiss IndexFlatIP (normalize_L2 + add)"),
                 ("exact", "save", t_save, f_save, "faiss write_index (no fsync, no ids)"),
                 ("exact", "load", t_load, f_load, "faiss read_index")]

        def write_faiss_durably() -> None:
            flat3 = faiss.read_index(str(work / "faiss.index"))
            clock_start = time.perf_counter()
            faiss.write_index(flat3, str(work / "faiss2.index"))
            fd = os.open(work / "faiss2.index", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            timings["faiss_fsync"] = time.perf_counter() - clock_start

        timings: Dict[str, float] = {}
        write_faiss_durably()
        gc.collect()
        rows.append(("exact", "save", t_save, timings["faiss_fsync"],
                     "faiss write_index + fsync"))
    rows.append(("exact", "search 1 query, k=10", t_search, float("nan"), "-"))
    print(f"exact index on disk: {size / 1e9:.2f} GB")
    return rows


def bench_hnsw(vectors: np.ndarray, ids: List[str], chunk: int, work: Path, m: int,
               ef_construction: int) -> List[Row]:
    import hnswlib

    index = Index(vectors.shape[1], backend="hnsw", hnsw_m=m, ef_construction=ef_construction)

    def add_ours() -> None:
        for start in range(0, len(vectors), chunk):
            index.add(vectors[start:start + chunk], ids[start:start + chunk])

    t_add, _ = clock(add_ours)
    t_save, _ = clock(lambda: index.save(work / "ours_hnsw"))
    index = None  # free it before loading
    gc.collect()
    t_load, _ = clock(lambda: Index.load(work / "ours_hnsw"))

    graph = hnswlib.Index(space="ip", dim=vectors.shape[1])

    def add_raw() -> None:
        graph.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=m)
        for start in range(0, len(vectors), chunk):
            block = vectors[start:start + chunk]
            block = block / np.linalg.norm(block, axis=1, keepdims=True)
            graph.add_items(block, np.arange(start, start + len(block)))

    h_add, _ = clock(add_raw)
    h_save, _ = clock(lambda: graph.save_index(str(work / "raw_hnsw.bin")))

    def load_raw() -> object:
        other = hnswlib.Index(space="ip", dim=vectors.shape[1])
        other.load_index(str(work / "raw_hnsw.bin"), max_elements=len(vectors))
        return other

    h_load, _ = clock(load_raw)
    return [("hnsw", "add", t_add, h_add, "hnswlib add_items (preallocated, no ids)"),
            ("hnsw", "save", t_save, h_save, "hnswlib save_index (no fsync, no ids)"),
            ("hnsw", "load", t_load, h_load, "hnswlib load_index")]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the exact index")
    parser.add_argument("--hnsw-n", type=int, default=100_000,
                        help="vectors in the hnsw index (0 skips it)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per add call")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the indexes (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="exact 100k, hnsw 10k")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.hnsw_n = 100_000, min(args.hnsw_n, 10_000)

    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.dir))
    try:
        rows: List[Row] = []
        vectors = random_unit_rows(args.n, args.dim, seed=0)
        ids = [f"doc-{i}" for i in range(args.n)]
        rows += bench_exact(vectors, ids, args.chunk, work)
        if args.hnsw_n:
            rows += bench_hnsw(vectors[:args.hnsw_n], ids[:args.hnsw_n], args.chunk, work,
                               args.hnsw_m, args.ef_construction)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes: Dict[str, str] = {"exact": f"{args.n:,} x {args.dim}",
                             "hnsw": f"{args.hnsw_n:,} x {args.dim} (M={args.hnsw_m}, "
                                     f"efC={args.ef_construction})"}
    print(f"# Index add/save/load: float32 vectors, str ids, add in chunks of {args.chunk:,}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
          f"{os.getloadavg()[0]:.1f}; disk under {work.parent}")
    print()
    print("| backend | size | operation | ours s | peer | peer s | ratio (peer/ours) |")
    print("|---|---|---|---:|---|---:|---:|")
    for backend, op, ours, peer, peer_name in rows:
        ratio = "-" if not np.isfinite(peer) else f"{peer / ours:.2f}x"
        peer_s = "-" if not np.isfinite(peer) else f"{peer:.3f}"
        ours_s = f"{ours:.3f}" if op != "search 1 query, k=10" else f"{ours * 1e3:.1f} ms"
        print(f"| {backend} | {sizes[backend]} | {op} | {ours_s} | {peer_name} | {peer_s} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
