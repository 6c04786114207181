"""``llm-embedder`` command line: label | train | eval | index | search | merge | quickstart.

Every subcommand is a thin wrapper over the Python API. ``label``, ``train`` and ``eval`` build
their :class:`~llm_embedder.config.Config` the same way: a ``--config`` YAML/JSON file (or, for
``train``, the positional one), then the options given on the command line on top. Heavy
imports happen inside the handlers so ``llm-embedder --help`` answers instantly.

Errors of ours (bad input, missing files, refused writes, a locked output) print one line
``llm-embedder: error: ...`` and exit with status 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar

from .tasks import TASKS

C = TypeVar("C")
#: The package's folder: an error raised by code in it is one of ours.
_PACKAGE_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- configs


def _knob(parser: argparse.ArgumentParser, flag: str, config_class: type, key: str,
          help: str, **kwargs: Any) -> None:
    """An option setting config field ``key``; absent from the namespace unless given, so a
    ``--config`` file's value stands when the option is left out."""
    if kwargs.get("action") not in ("store_true", "store_false"):  # a flag's help says it all
        help = f"{help} (default: {getattr(config_class, key)})"
    parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=help, **kwargs)


def _given(args: argparse.Namespace, config_class: type) -> Dict[str, Any]:
    """The config fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if hasattr(args, f.name)}


def build_config(config_class: Type[C], path: Optional[str], overrides: Mapping[str, Any]) -> C:
    """``config_class`` from the file at ``path`` (or its defaults) with ``overrides`` on top,
    validated: how every subcommand builds its configuration.

    Example:
        >>> build_config(LabelConfig, "label.yaml", {"num_samples": 4}).num_samples
        4
    """
    base = config_class.load(path) if path else config_class()  # type: ignore[attr-defined]
    return config_class.load({**base.to_dict_shallow(), **overrides})  # type: ignore


# ----------------------------------------------------------------------------- label


def _add_label(sub: argparse._SubParsersAction) -> None:
    from .label import LabelConfig

    p = sub.add_parser("label", help="score candidates of each query with the frozen LLM",
                       description="Label queries with likelihood and rank-aware rewards from a "
                                   "frozen LLM (docs/method.md). Resumable: re-run to continue.")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--queries", required=True, help="queries JSONL (id, text, answers, ...)")
    p.add_argument("--corpus", required=True, help="corpus JSONL (id, text, ...)")
    p.add_argument("--out", required=True, help="labelled JSONL to write (appended, resumable)")
    p.add_argument("--config", default=None, help="YAML or JSON file of LabelConfig fields; "
                                                  "options given here win over it")
    _knob(p, "--num-samples", LabelConfig, "num_samples", "N sampled outputs per query",
          type=int)
    _knob(p, "--num-negatives", LabelConfig, "num_negatives", "mined negatives per query",
          type=int)
    _knob(p, "--negatives", LabelConfig, "negatives", "where negatives are mined",
          choices=["bm25", "embedder", "both"])
    p.add_argument("--embedder", default=None, help="encoder for --negatives embedder|both")
    _knob(p, "--method", LabelConfig, "method",
          "llm: rewards from the frozen LLM; labels: 1 for positives, 0 otherwise",
          choices=["llm", "labels"])
    _knob(p, "--keep-answer-negatives", LabelConfig, "skip_answer_negatives",
          "--method labels: keep mined negatives that contain the answer (by default they are "
          "passed over as likely unlabelled positives)", action="store_false")
    _knob(p, "--limit", LabelConfig, "limit", "label at most this many queries", type=int)
    _knob(p, "--shard", LabelConfig, "shard", "this process's shard", type=int)
    _knob(p, "--num-shards", LabelConfig, "num_shards", "shards in all", type=int)
    p.add_argument("--llm", default=None, help="local HF causal-LM folder, .gguf file or hub id "
                                               "(default: packaged SmolLM2-135M-Instruct)")
    _knob(p, "--device", LabelConfig, "device", "cpu, cuda, cuda:1, ...")
    _knob(p, "--seed", LabelConfig, "seed", "random seed", type=int)
    p.set_defaults(handler=_run_label)


def _run_label(args: argparse.Namespace) -> int:
    from .label import LabelConfig, label

    config = build_config(LabelConfig, args.config, _given(args, LabelConfig))
    embedder = None
    if config.negatives in ("embedder", "both"):
        from .embedder import Embedder

        embedder = Embedder.from_pretrained(args.embedder, device=config.device)
    label(args.task, args.queries, args.corpus, args.out, llm=args.llm, embedder=embedder,
          config=config)
    return 0


# ----------------------------------------------------------------------------- merge, train


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
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue from output_dir/checkpoint")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    model_dir = train(build_config(TrainConfig, args.config, _given(args, TrainConfig)))
    print(f"model written to {model_dir}")
    return 0


# ----------------------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .evaluate import SYSTEMS, EvalConfig

    p = sub.add_parser("eval", help="retrieval and downstream metrics with baselines")
    p.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    p.add_argument("--config", default=None, help="YAML or JSON file of EvalConfig fields; "
                                                  "options given here win over it")
    _knob(p, "--tasks", EvalConfig, "tasks", "tasks to evaluate (None: all bundled)",
          nargs="+", choices=sorted(TASKS))
    _knob(p, "--data", EvalConfig, "data",
          "folder laid out like the bundled data (<task dir>/corpus.jsonl, queries.test.jsonl);"
          " None: the bundled slices")
    _knob(p, "--systems", EvalConfig, "systems", "systems to compare (None: all)", nargs="+",
          choices=list(SYSTEMS))
    _knob(p, "--no-downstream", EvalConfig, "downstream", "skip the LLM metrics",
          action="store_false")
    _knob(p, "--max-llm-queries", EvalConfig, "max_llm_queries",
          "test queries per task the LLM sees", type=int)
    p.add_argument("--llm", default=None, help="frozen LLM of the downstream metrics (default: "
                                               "packaged SmolLM2-135M-Instruct)")
    _knob(p, "--device", EvalConfig, "device", "cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None,
                   help="write the results: NAME.json gets JSON and NAME.md Markdown beside it; "
                        "NAME.md gets Markdown and NAME.json JSON beside it")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, main_eval

    config = build_config(EvalConfig, args.config, _given(args, EvalConfig))
    return main_eval(model=args.model, out=args.out, config=config, llm=args.llm)


# ----------------------------------------------------------------------------- index, search


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="encode a corpus and save a searchable index")
    p.add_argument("--corpus", required=True, help="corpus JSONL")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a non-empty folder that is not an index")
    p.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    p.add_argument("--backend", default="exact", choices=["exact", "hnsw"])
    p.add_argument("--device", default=None)
    p.set_defaults(handler=_run_index)


def _build_index(corpus_path: str, task: str, model: Optional[str], backend: str,
                 device: Optional[str]) -> Any:
    from .data import load_corpus
    from .embedder import Embedder
    from .index import Index

    corpus = load_corpus(corpus_path)
    embedder = Embedder.from_pretrained(model, device=device)
    vectors = embedder.encode_keys([p.full_text for p in corpus], task=task)
    index = Index(vectors.shape[1], backend=backend)
    index.add(vectors, [p.id for p in corpus])
    return index, embedder, {p.id: p for p in corpus}


def _model_source(model: Optional[str]) -> str:
    """What ``source.json`` records as the model: an absolute resolved folder (the packaged
    encoder's when ``model`` is None); a hub id as given."""
    if model is None:
        from .embedder import default_model_path

        return str(default_model_path().resolve())
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def _run_index(args: argparse.Namespace) -> int:
    from .index import is_saved_index, write_source
    from .io import check_replaceable

    # Before encoding (minutes on a large corpus): never replace a folder of the user's files.
    check_replaceable(args.out, is_saved_index, "index", args.overwrite)
    index, _, _ = _build_index(args.corpus, args.task, args.model, args.backend, args.device)
    index.save(args.out, overwrite=args.overwrite)
    write_source(args.out, args.task, _model_source(args.model), args.corpus)
    print(f"indexed {len(index)} entries of {args.corpus} into {args.out}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve import add_arguments  # stdlib only: `llm-embedder --help` stays instant

    p = sub.add_parser("serve", help="serve embeddings and search over HTTP (extra [serve])",
                       description="OpenAI /v1/embeddings, TEI /embed, /search, /health and "
                                   "/metrics on FastAPI + uvicorn; 127.0.0.1:8080 by default.")
    add_arguments(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import run_from_args

    return run_from_args(args)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index (or a bundled corpus) with queries",
                       description="Without --index, searches the bundled corpus of --task.")
    p.add_argument("queries", nargs="+", help="query texts")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="task whose query instruction to use (default: the index's, else qa)")
    p.add_argument("--index", default=None, help="index folder written by `llm-embedder index`")
    p.add_argument("--corpus", default=None, help="corpus JSONL to show texts from / to index")
    p.add_argument("--model", default=None,
                   help="model folder (default: the one in the index's source.json; without "
                        "--index the packaged MiniLM)")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--device", default=None)
    p.set_defaults(handler=_run_search)


def _index_source(folder: str, model: Optional[str]) -> Dict[str, Any]:
    """The index's ``source.json`` with ``model`` (when given) winning; a ValueError when no
    model is known, since another model's vectors would give silently wrong results."""
    from .index import SOURCE_FILE, read_source

    source = Path(folder) / SOURCE_FILE
    try:
        meta = read_source(folder)
    except ValueError as exc:
        raise ValueError(f"{exc}; pass --model and --corpus instead") from None
    if not source.is_file() and model is None:
        raise ValueError(f"{source} not found, so the model that encoded {folder} is unknown: "
                         f"pass --model FOLDER (the model that built the index)")
    if model is not None:
        meta["model"] = model
    return meta


def _run_search(args: argparse.Namespace) -> int:
    from .data import bundled_task_files, load_corpus

    if args.index is None:
        task = args.task or "qa"
        corpus_path = args.corpus or str(bundled_task_files(task)["corpus"])
        index, embedder, passages = _build_index(corpus_path, task, args.model, "exact",
                                                 args.device)
    else:
        from .embedder import Embedder
        from .index import Index

        index = Index.load(args.index)
        meta = _index_source(args.index, args.model)
        task = args.task or meta.get("task") or "qa"
        corpus_path = args.corpus or meta.get("corpus")
        passages = {p.id: p for p in load_corpus(corpus_path)} if corpus_path else {}
        model = meta.get("model")
        print(f"searching {args.index} with model "
              f"{model or 'the packaged MiniLM'} (task {task})", file=sys.stderr)
        embedder = Embedder.from_pretrained(model, device=args.device)
    vectors = embedder.encode_queries(list(args.queries), task=task)
    ids, scores = index.search(vectors, k=min(args.k, len(index)))
    for query, row_ids, row_scores in zip(args.queries, ids, scores):
        print(f"\n> {query}")
        for rank, (pid, score) in enumerate(zip(row_ids, row_scores), start=1):
            text = passages[pid].full_text if pid in passages else ""
            text = text if len(text) <= 160 else text[:157] + "..."
            print(f"  {rank}. [{score:.3f}] {pid}  {text}")
    return 0


# ----------------------------------------------------------------------------- quickstart


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="label -> train -> evaluate -> index -> search, on "
                                          "the bundled data and default models",
                       description="The main job. Default: fits in ~20 minutes on a 2-core CPU. "
                                   "Resumable: re-run to continue where it stopped.")
    p.add_argument("--out", default="quickstart_out", help="output folder")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true",
                       help="all bundled data and more steps (uses a GPU when there is one)")
    sizes.add_argument("--config", default=None,
                       help="YAML or JSON file of QuickstartConfig fields (sizes of the run)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig.load(args.config) if args.config else None
    run_quickstart(out_dir=args.out, full=args.full, device=args.device, seed=args.seed,
                   config=config)
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-embedder`` argument parser (every subcommand).

    Example:
        >>> build_parser().parse_args(["eval", "--tasks", "qa"]).tasks
        ['qa']
    """
    parser = argparse.ArgumentParser(
        prog="llm-embedder",
        description="One embedder for every retrieval need of an LLM, trained from a frozen "
                    "LLM's rank-aware feedback.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"llm-embedder {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quickstart, _add_label, _add_merge, _add_train, _add_eval, _add_index,
                _add_search, _add_serve):
        add(sub)
    return parser


def _ours(err: BaseException) -> bool:
    """Whether ``err`` is one of our errors (a message for the user) rather than a bug: bad
    values and files (ValueError, OSError) anywhere, other errors only when our code raised
    them (a RuntimeError from inside torch is a bug to report with its traceback)."""
    if isinstance(err, (ValueError, OSError)):
        return True
    if not isinstance(err, (RuntimeError, ImportError)):
        return False
    if type(err).__module__.startswith("llm_embedder"):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``llm-embedder`` with ``argv`` (default: the process's); returns the exit status.

    Example:
        >>> main(["eval", "--tasks", "tool", "--no-downstream"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error argparse has printed
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("llm-embedder: interrupted; re-run to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not _ours(err):
            raise
        if args.debug:
            traceback.print_exc()
        # An actionable message; a traceback would only bury it (--debug shows it).
        print(f"llm-embedder: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _entry(argv: Optional[List[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    _entry()
