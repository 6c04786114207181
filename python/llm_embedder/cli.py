"""``llm-embedder`` command line: label | train | eval | index | search | merge | quickstart.

Every subcommand is a thin wrapper over the Python API; heavy imports happen inside the
handlers so ``llm-embedder --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .tasks import TASKS


def _add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="score candidates of each query with the frozen LLM",
                       description="Label queries with likelihood and rank-aware rewards from a "
                                   "frozen LLM (DESIGN.md §3). Resumable: re-run to continue.")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--queries", required=True, help="queries JSONL (id, text, answers, ...)")
    p.add_argument("--corpus", required=True, help="corpus JSONL (id, text, ...)")
    p.add_argument("--out", required=True, help="labelled JSONL to write (appended, resumable)")
    p.add_argument("--num-samples", type=int, default=8, help="N sampled outputs per query")
    p.add_argument("--num-negatives", type=int, default=7, help="mined negatives per query")
    p.add_argument("--negatives", default="bm25", choices=["bm25", "embedder", "both"])
    p.add_argument("--embedder", default=None, help="encoder for --negatives embedder|both")
    p.add_argument("--method", default="llm", choices=["llm", "labels"],
                   help="llm: rewards from the frozen LLM; labels: 1 for positives, 0 otherwise")
    p.add_argument("--keep-answer-negatives", action="store_true",
                   help="--method labels: keep mined negatives that contain the answer (by "
                        "default they are passed over as likely unlabelled positives)")
    p.add_argument("--limit", type=int, default=None, help="label at most this many queries")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--llm", default=None, help="local HF causal-LM folder, .gguf file or hub id "
                                               "(default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_label)


def _run_label(args: argparse.Namespace) -> int:
    from .label import label

    embedder = None
    if args.negatives in ("embedder", "both"):
        from .embedder import Embedder

        embedder = Embedder.from_pretrained(args.embedder, device=args.device)
    label(args.task, args.queries, args.corpus, args.out, llm=args.llm, embedder=embedder,
          num_samples=args.num_samples, num_negatives=args.num_negatives,
          negatives=args.negatives, limit=args.limit, shard=args.shard,
          num_shards=args.num_shards, method=args.method, seed=args.seed, device=args.device,
          skip_answer_negatives=not args.keep_answer_negatives)
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge labelled shard files into one")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .label import merge_labelled

    merge_labelled(args.shards, args.out)
    print(f"merged {len(args.shards)} shard(s) into {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the embedder from labelled files (YAML/JSON config)",
                       description="Graded distillation with homogeneous batches and self-paced "
                                   "per-task learning rates. Works under torchrun.")
    p.add_argument("config", help="YAML or JSON config (model, tasks, output_dir, max_steps, ...)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    config = load_config(args.config)
    if args.resume:
        config.resume = True
    model_dir = train(config)
    print(f"model written to {model_dir}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="retrieval and downstream metrics with baselines")
    p.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to evaluate (default: all "
                                                            "bundled)")
    p.add_argument("--data", default=None,
                   help="folder laid out like the bundled data (<task dir>/corpus.jsonl, "
                        "queries.test.jsonl); default: the bundled slices")
    p.add_argument("--no-downstream", action="store_true", help="skip the LLM metrics")
    p.add_argument("--llm", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import main_eval

    return main_eval(model=args.model, tasks=args.tasks, data=args.data,
                     downstream=not args.no_downstream, llm=args.llm, device=args.device,
                     out=args.out)


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="encode a corpus and save a searchable index")
    p.add_argument("--corpus", required=True, help="corpus JSONL")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    p.add_argument("--backend", default="exact", choices=["exact", "hnsw"])
    p.add_argument("--device", default=None)
    p.set_defaults(handler=_run_index)


def _build_index(corpus_path: str, task: str, model: Optional[str], backend: str,
                 device: Optional[str]):
    from .data import load_corpus
    from .embedder import Embedder
    from .index import Index

    corpus = load_corpus(corpus_path)
    embedder = Embedder.from_pretrained(model, device=device)
    vectors = embedder.encode_keys([p.full_text for p in corpus], task=task)
    index = Index(vectors.shape[1], backend=backend)
    index.add(vectors, [p.id for p in corpus])
    return index, embedder, {p.id: p for p in corpus}


def _run_index(args: argparse.Namespace) -> int:
    index, _, _ = _build_index(args.corpus, args.task, args.model, args.backend, args.device)
    index.save(args.out)
    meta = {"task": args.task, "model": args.model, "corpus": str(Path(args.corpus).resolve())}
    (Path(args.out) / "source.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"indexed {len(index)} entries of {args.corpus} into {args.out}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index (or a bundled corpus) with queries",
                       description="Without --index, searches the bundled corpus of --task.")
    p.add_argument("queries", nargs="+", help="query texts")
    p.add_argument("--task", default="qa", choices=sorted(TASKS))
    p.add_argument("--index", default=None, help="index folder written by `llm-embedder index`")
    p.add_argument("--corpus", default=None, help="corpus JSONL to show texts from / to index")
    p.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--device", default=None)
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from .data import bundled_task_files, load_corpus

    if args.index is None:
        corpus_path = args.corpus or str(bundled_task_files(args.task)["corpus"])
        index, embedder, passages = _build_index(corpus_path, args.task, args.model, "exact",
                                                 args.device)
    else:
        from .embedder import Embedder
        from .index import Index

        index = Index.load(args.index)
        source = Path(args.index) / "source.json"
        meta = json.loads(source.read_text()) if source.is_file() else {}
        corpus_path = args.corpus or meta.get("corpus")
        passages = {p.id: p for p in load_corpus(corpus_path)} if corpus_path else {}
        embedder = Embedder.from_pretrained(args.model or meta.get("model"), device=args.device)
    vectors = embedder.encode_queries(list(args.queries), task=args.task)
    ids, scores = index.search(vectors, k=min(args.k, len(index)))
    for query, row_ids, row_scores in zip(args.queries, ids, scores):
        print(f"\n> {query}")
        for rank, (pid, score) in enumerate(zip(row_ids, row_scores), start=1):
            text = passages[pid].full_text if pid in passages else ""
            text = text if len(text) <= 160 else text[:157] + "..."
            print(f"  {rank}. [{score:.3f}] {pid}  {text}")
    return 0


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="label -> train -> evaluate -> index -> search, on "
                                          "the bundled data and default models",
                       description="The main job. Default: fits in ~20 minutes on a 2-core CPU. "
                                   "Resumable: re-run to continue where it stopped.")
    p.add_argument("--out", default="quickstart_out", help="output folder")
    p.add_argument("--full", action="store_true",
                   help="all bundled data and more steps (uses a GPU when there is one)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(out_dir=args.out, full=args.full, device=args.device, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-embedder",
        description="One embedder for every retrieval need of an LLM, trained from a frozen "
                    "LLM's rank-aware feedback.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"llm-embedder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quickstart, _add_label, _add_merge, _add_train, _add_eval, _add_index,
                _add_search):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Errors of ours carry an actionable message; a traceback would only bury it.
        print(f"llm-embedder {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-embedder {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130


def _entry(argv: Optional[List[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    _entry()
