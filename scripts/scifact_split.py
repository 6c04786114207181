"""Deterministic held-out split of the SciFact train claims: train on one part, measure on dev.

A claim goes to dev when the SHA-256 of its id, read as a fraction of 2**64, is below
``--dev-fraction`` (default 0.2): the same claims on every machine and Python version, and a
claim keeps its side when others are added. Writes ``corpus.jsonl`` (a copy of the source's),
``queries.train.jsonl`` and ``queries.dev.jsonl`` to OUT, the project's layout, so

    llm-embedder label --task qa --queries OUT/queries.train.jsonl --corpus OUT/corpus.jsonl ...
    llm-embedder eval --beir OUT --split dev

train and evaluate on disjoint claims. SciFact is CC BY-NC: OUT must lie outside the package.

Example:
    python scripts/scifact_split.py ../shared/data/qa/scifact runs/scifact_split
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import List, Optional

from llm_embedder.data import iter_jsonl, load_queries
from llm_embedder.io import atomic_write_bytes, write_jsonl

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "python"


def is_dev(query_id: str, fraction: float) -> bool:
    """Whether claim ``query_id`` is held out: its id's SHA-256 as a fraction below ``fraction``.

    Example:
        >>> is_dev("scifact-2", 0.0)
        False
    """
    digest = hashlib.sha256(query_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def main(argv: Optional[List[str]] = None) -> int:
    """Split SOURCE/queries.train.jsonl into OUT/queries.{train,dev}.jsonl beside the corpus.

    Example:
        >>> main(["../shared/data/qa/scifact", "runs/scifact_split"])
        0
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with corpus.jsonl, queries.train.jsonl")
    parser.add_argument("out", type=Path, help="folder to write (outside the package)")
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    if not 0 < args.dev_fraction < 1:
        parser.error(f"--dev-fraction must lie in (0, 1), got {args.dev_fraction}")
    if args.out.resolve().is_relative_to(PACKAGE_DIR):
        parser.error(f"{args.out} is inside the package: SciFact (CC BY-NC) must not ship")
    queries = args.source / "queries.train.jsonl"
    load_queries(queries)  # a DataError names the file, line and field of a bad record
    records = [obj for _, obj in iter_jsonl(queries)]
    dev = [r for r in records if is_dev(r["id"], args.dev_fraction)]
    train = [r for r in records if not is_dev(r["id"], args.dev_fraction)]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "corpus.jsonl", (args.source / "corpus.jsonl").read_bytes())
    write_jsonl(args.out / "queries.train.jsonl", train)
    write_jsonl(args.out / "queries.dev.jsonl", dev)
    print(f"{args.out}: {len(train)} train and {len(dev)} dev claims "
          f"(dev fraction {args.dev_fraction})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
