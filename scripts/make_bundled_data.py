"""Cut the real-data slices shipped inside the package (python/llm_embedder/bundled/).

Deterministic: no randomness except one seeded shuffle for tools, so re-running on the same
source gives byte-identical files. The source is ../shared/data (see its PROVENANCE.md); the
source's train/test split is kept: test articles (qa) and test conversations (chat) stay unseen
in the training slices, and no training query is a test query.

What is kept and why (sizes in PROVENANCE.md next to the slices):
- qa/xquad: everything (190 passages, 784 train and 179 test questions; 0.35 MB).
- tool/gorilla: the whole API corpus (retrieval over fewer tools would be easier than the real
  task), 600 of 1330 training queries (seeded shuffle), all 332 test queries.
- chat/locomo: whole conversations only, so a query's `group` always holds its full history.
  Training: the three smallest training conversations (locomo30, locomo26, locomo42: 1417 turns,
  429 questions); test: both test conversations (locomo48, locomo49) and all their 344 questions.
- icl/fewshot5: per sub-task the first 300 demonstrations (the source already shuffled them), the
  first 100 training queries and the first 60 test queries (cb has 188, 62 and 56 in all).

Usage: python scripts/make_bundled_data.py [--source ../shared/data] [--check]
(--check verifies the packaged files equal what this script would write).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "python" / "llm_embedder" / "bundled"

TOOL_TRAIN = 600
CHAT_TRAIN_GROUPS = ("locomo30", "locomo26", "locomo42")
CHAT_TEST_GROUPS = ("locomo48", "locomo49")
ICL_DEMOS, ICL_TRAIN, ICL_TEST = 300, 100, 60


def read(path: Path) -> List[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dump(rows: List[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def per_subset(rows: List[dict], n: int, key: str = "task") -> List[dict]:
    """The first ``n`` rows of every subset, in source order."""
    seen: Dict[str, int] = defaultdict(int)
    out = []
    for row in rows:
        if seen[row[key]] < n:
            seen[row[key]] += 1
            out.append(row)
    return out


def slices(src: Path) -> Dict[str, str]:
    """Relative path under DEST -> file content."""
    out: Dict[str, str] = {}

    qa = src / "qa" / "xquad"
    for name in ("corpus", "queries.train", "queries.test"):
        out[f"qa/xquad/{name}.jsonl"] = dump(read(qa / f"{name}.jsonl"))

    tool = src / "tool" / "gorilla"
    train = read(tool / "queries.train.jsonl")
    random.Random(0).shuffle(train)
    out["tool/gorilla/corpus.jsonl"] = dump(read(tool / "corpus.jsonl"))
    out["tool/gorilla/queries.train.jsonl"] = dump(train[:TOOL_TRAIN])
    out["tool/gorilla/queries.test.jsonl"] = dump(read(tool / "queries.test.jsonl"))

    chat = src / "chat" / "locomo"
    groups = set(CHAT_TRAIN_GROUPS) | set(CHAT_TEST_GROUPS)
    corpus = [r for r in read(chat / "corpus.jsonl") if r["group"] in groups]
    train = [r for r in read(chat / "queries.train.jsonl") if r["group"] in CHAT_TRAIN_GROUPS]
    test = [r for r in read(chat / "queries.test.jsonl") if r["group"] in CHAT_TEST_GROUPS]
    if {r["group"] for r in test} & set(CHAT_TRAIN_GROUPS):
        raise SystemExit("chat: a test conversation is also a training conversation")
    out["chat/locomo/corpus.jsonl"] = dump(corpus)
    out["chat/locomo/queries.train.jsonl"] = dump(train)
    out["chat/locomo/queries.test.jsonl"] = dump(test)

    icl = src / "icl" / "fewshot5"
    out["icl/fewshot5/corpus.jsonl"] = dump(per_subset(read(icl / "corpus.jsonl"), ICL_DEMOS))
    out["icl/fewshot5/queries.train.jsonl"] = dump(
        per_subset(read(icl / "queries.train.jsonl"), ICL_TRAIN))
    out["icl/fewshot5/queries.test.jsonl"] = dump(
        per_subset(read(icl / "queries.test.jsonl"), ICL_TEST))
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--check", action="store_true",
                        help="only verify the packaged slices equal what would be written")
    args = parser.parse_args(argv)
    if not (args.source / "qa" / "xquad" / "corpus.jsonl").is_file():
        parser.error(f"no source data under {args.source}")
    files = slices(args.source)
    stale = []
    for rel, text in sorted(files.items()):
        path = DEST / rel
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{rel:36s} {text.count(chr(10)):6d} lines {len(text.encode()) / 1e6:6.3f} MB")
    if stale:
        print("stale bundled files:", ", ".join(stale), file=sys.stderr)
        return 1
    total = sum(len(t.encode()) for t in files.values()) / 1e6
    print(f"total {total:.2f} MB" + (" (up to date)" if args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
