"""Embedder.encode throughput against sentence_transformers.SentenceTransformer.encode.

Both encode the same real, mixed-length texts (passages, tool descriptions, dialogue turns,
demonstrations and queries from ../shared/data) with the same model (the packaged
all-MiniLM-L6-v2), batch size and max length, in one process, alternating rounds so that both
see the same machine load. Prints a Markdown table with texts/s and the ratio ours / peer
(target >= 1.0x, from token-length bucketing), and checks the two give the same vectors.

    python benches/bench_encode.py               # 2000 texts, batch 32, 3 rounds
    python benches/bench_encode.py --quick       # 300 texts, 1 round
    python benches/bench_encode.py --device cuda --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_embedder.embedder import Embedder, default_model_path  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOURCES = ["qa/xquad/corpus.jsonl", "tool/gorilla/corpus.jsonl", "chat/locomo/corpus.jsonl",
           "icl/fewshot5/corpus.jsonl", "qa/xquad/queries.test.jsonl",
           "tool/gorilla/queries.test.jsonl", "chat/locomo/queries.test.jsonl",
           "icl/fewshot5/queries.test.jsonl"]


def load_texts(data: Path, n: int, seed: int) -> List[str]:
    """``n`` texts drawn evenly from every corpus and query file, then shuffled."""
    per_file: List[List[str]] = []
    for name in SOURCES:
        path = data / name
        if not path.is_file():
            sys.exit(f"{path} not found: pass --data pointing at the shared data folder")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        per_file.append([f"{r['title']}: {r['text']}" if r.get("title") else r["text"]
                         for r in rows if str(r.get("text", "")).strip()])
    rng = random.Random(seed)
    texts: List[str] = []
    share = -(-n // len(per_file))
    for rows in per_file:
        texts.extend(rng.sample(rows, min(share, len(rows))))
    while len(texts) < n:  # a small file gave fewer than its share
        texts.append(rng.choice(rng.choice(per_file)))
    rng.shuffle(texts)
    return texts[:n]


def timed(fn: Callable[[], np.ndarray], device: str) -> tuple[float, np.ndarray]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of texts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per system")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="300 texts, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 300, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        sys.exit("the peer needs sentence-transformers: pip install '.[bench]'")

    texts = load_texts(args.data.resolve(), args.n, args.seed)
    ours = Embedder.from_pretrained(device=args.device)
    peer = SentenceTransformer(str(default_model_path()), device=args.device)
    peer.max_seq_length = args.max_length

    def run_ours() -> np.ndarray:
        return ours.encode(texts, side=None, batch_size=args.batch_size,
                           max_length=args.max_length, show_progress_bar=False)

    def run_peer() -> np.ndarray:
        return peer.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                           show_progress_bar=False, convert_to_numpy=True)

    warm = texts[: 4 * args.batch_size]
    ours.encode(warm, side=None, batch_size=args.batch_size, max_length=args.max_length)
    peer.encode(warm, batch_size=args.batch_size)

    times = {"llm_embedder.Embedder.encode": [], "SentenceTransformer.encode": []}
    outputs = {}
    for _ in range(args.rounds):  # alternate so both see the same background load
        for name, fn in (("llm_embedder.Embedder.encode", run_ours),
                         ("SentenceTransformer.encode", run_peer)):
            seconds, outputs[name] = timed(fn, args.device)
            times[name].append(seconds)
    diff = float(np.abs(outputs["llm_embedder.Embedder.encode"]
                        - outputs["SentenceTransformer.encode"]).max())

    lengths = [len(ids) for ids in ours.tokenizer(texts, truncation=True,
                                                  max_length=args.max_length)["input_ids"]]
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} torch threads")
    print(f"# encode throughput: {args.n} real mixed-length texts from {len(SOURCES)} files of "
          f"../shared/data (tokens min/median/max {min(lengths)}/"
          f"{int(statistics.median(lengths))}/{max(lengths)}), all-MiniLM-L6-v2, "
          f"batch {args.batch_size}, max_length {args.max_length}, device {args.device} "
          f"({device_name}), median of {args.rounds} round(s), torch {torch.__version__}, "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    print("| system | median s | texts/s | ratio vs peer |")
    print("|---|---:|---:|---:|")
    peer_rate = args.n / statistics.median(times["SentenceTransformer.encode"])
    for name, values in times.items():
        rate = args.n / statistics.median(values)
        print(f"| {name} | {statistics.median(values):.2f} | {rate:.1f} | "
              f"{rate / peer_rate:.2f}x |")
    print()
    print(f"max |ours - peer| over all vectors: {diff:.2e}")


if __name__ == "__main__":
    main()
