"""``llm-embedder`` command line: label | train | eval | index | search | serve | merge | convert
| quickstart.

Every subcommand is a thin wrapper over the Python API. ``label``, ``train`` and ``eval`` build
their :class:`~llm_embedder.config.Config` the same way: a ``--config`` YAML/JSON file (or, for
``train``, the positional one), then the options given on the command line on top. Heavy
imports happen inside the handlers so ``llm-embedder --help`` answers instantly.

Errors of ours (bad input, missing files, refused writes, a locked output) print one line
``llm-embedder: error: ...`` and exit with status 2; ``--debug`` adds the traceback.

``--tasks-file FILE`` (before or after the subcommand) registers custom tasks for the run: it is
read before the parser is built, so the tasks are valid ``--task`` choices everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from .tasks import TASKS, Task

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


_TASKS_FILE_HELP = ("YAML or JSON file of custom tasks to register for this run (repeatable): "
                    "tasks: {NAME: {query_instruction, key_instruction, prompt_template, "
                    "empty_template, loss, ...}} (every Task field; 'base: qa' starts from a "
                    "registered task)")


def _add_tasks_file(parser: argparse.ArgumentParser) -> None:
    """``--tasks-file``: read by :func:`main` before parsing (see :func:`_tasks_files`); declared
    here for ``--help`` and for argparse to accept it."""
    parser.add_argument("--tasks-file", dest="tasks_files", action="append", metavar="FILE",
                        default=argparse.SUPPRESS, help=_TASKS_FILE_HELP)


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

    p = sub.add_parser(
        "label", help="score candidates of each query with the frozen LLM",
        description="Label queries with likelihood and rank-aware rewards from a frozen LLM "
                    "(docs/method.md). Resumable: re-run to continue. Under torchrun (or any "
                    "launcher setting RANK and WORLD_SIZE > 1) without --shard/--num-shards, "
                    "rank r labels shard r into OUT.rank{r}-of-{W} (on cuda:LOCAL_RANK when "
                    "--device is unset or 'cuda' and there is a GPU), marks it done in "
                    "OUT.rank{r}-of-{W}.done, and the last rank to finish merges the shards "
                    "into OUT, equal to a one-process run. A killed run resumes when started "
                    "again; shard files stay beside OUT (a re-run skips their queries). Ranks "
                    "on several machines need OUT on a shared filesystem (or copy the shards "
                    "and run `llm-embedder merge`).",
        epilog="example: torchrun --nproc_per_node 4 -m llm_embedder.cli label --task qa "
               "--queries q.jsonl --corpus c.jsonl --out qa.labels.jsonl")
    _add_tasks_file(p)
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

    given = _given(args, LabelConfig)
    config = build_config(LabelConfig, args.config, given)
    explicit = "shard" in given or "num_shards" in given or config.num_shards != 1
    world = None if explicit else _launcher_world()
    if world is not None:
        config = dataclasses.replace(config, device=_rank_device(config.device))
    embedder = None
    if config.negatives in ("embedder", "both"):
        from .embedder import Embedder

        embedder = Embedder.from_pretrained(args.embedder, device=config.device)
    if world is None:
        label(args.task, args.queries, args.corpus, args.out, llm=args.llm, embedder=embedder,
              config=config)
    else:
        _label_as_rank(args, config, embedder, *world)
    return 0


# ----------------------------------------------------------------------------- label, by rank


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by "
                         f"torchrun or your launcher)") from None


def _launcher_world() -> Optional[Tuple[int, int]]:
    """``(rank, world_size)`` from a launcher's RANK / WORLD_SIZE when there is more than one
    process; None otherwise."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    rank = _env_int("RANK")
    if rank is None or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE={world} needs RANK in 0..{world - 1}, got "
                         f"{os.environ.get('RANK')!r}")
    return rank, world


def _rank_device(device: Any) -> Any:
    """``cuda:LOCAL_RANK`` for an unset or plain ``cuda`` device when there is a GPU, so ranks
    on one machine use one GPU each; any other device as given."""
    local = _env_int("LOCAL_RANK")
    if local is None or device not in (None, "cuda"):
        return device
    import torch

    return f"cuda:{local}" if torch.cuda.is_available() else device


def rank_shard_path(out: str, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its shard of ``label --out out``.

    Example:
        >>> rank_shard_path("qa.labels.jsonl", 1, 4)
        PosixPath('qa.labels.jsonl.rank1-of-4')
    """
    return Path(f"{out}.rank{rank}-of-{world}")


def _done_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done")


def _assignments(task: str, queries_path: str, limit: Optional[int], world: int) -> List[str]:
    """A digest of each rank's queries (as label splits them): a completion marker counts only
    for the inputs it was written for."""
    selected = _selected_ids(queries_path, limit)
    return [hashlib.sha256("\n".join([task, *selected[r::world]]).encode()).hexdigest()
            for r in range(world)]


def _selected_ids(queries_path: str, limit: Optional[int]) -> List[str]:
    """The query ids ``label`` works on, in file order (the merge restores this order)."""
    from .data import load_queries

    ids = [q.id for q in load_queries(queries_path)]
    return ids[:limit] if limit is not None else ids


def _check_merge_target(out: Path, task: str) -> None:
    """Refuse, before any labelling, an OUT the merge would replace that is not a labelled file
    of ``task`` (a user's own file must never be overwritten)."""
    from .data import DataError, iter_labelled

    if not out.exists():
        return
    if not out.is_file():
        raise DataError(out, None, "the output is not a regular file: choose another --out")
    for number, _, record in iter_labelled(out):
        if record.task != task:
            raise DataError(out, number, f"field 'task' is {record.task!r} but this run labels "
                                         f"{task!r}: choose another --out")


def _complete(shards: List[Path], digests: List[str]) -> List[int]:
    """The ranks whose shard is marked done, for these inputs, and unchanged since."""
    done = []
    for rank, (shard, digest) in enumerate(zip(shards, digests)):
        try:
            marker = json.loads(_done_path(shard).read_text(encoding="utf-8"))
            ok = (marker.get("assignment") == digest
                  and marker.get("bytes") == shard.stat().st_size)
        except (OSError, ValueError, AttributeError):
            ok = False
        if ok:
            done.append(rank)
    return done


def _label_as_rank(args: argparse.Namespace, config: Any, embedder: Any, rank: int,
                   world: int) -> None:
    """Label this rank's shard, mark it done, and merge all shards into ``args.out`` when every
    rank is done (the last to finish does it). No collective communication: a marker written
    atomically after the shard's last record is what says a shard is complete."""
    from .io import atomic_write_json
    from .label import label, merge_labelled

    out = Path(args.out)
    _check_merge_target(out, args.task)
    shards = [rank_shard_path(args.out, r, world) for r in range(world)]
    digests = _assignments(args.task, args.queries, config.limit, world)
    mine = shards[rank]
    _done_path(mine).unlink(missing_ok=True)  # a re-run may add records: not done until said
    label(args.task, args.queries, args.corpus, mine, llm=args.llm, embedder=embedder,
          config=dataclasses.replace(config, shard=rank, num_shards=world))
    atomic_write_json(_done_path(mine), {"rank": rank, "world_size": world, "task": args.task,
                                         "assignment": digests[rank],
                                         "bytes": mine.stat().st_size})
    done = _complete(shards, digests)
    if len(done) < world:
        waiting = [r for r in range(world) if r not in done]
        print(f"rank {rank}/{world}: shard done ({mine}); ranks {waiting} still labelling: the "
              f"last one to finish merges into {out}", file=sys.stderr)
        return
    count = merge_labelled(shards, out, order=_selected_ids(args.queries, config.limit))
    print(f"rank {rank}/{world}: merged {world} shard(s), {count} record(s), into {out}",
          file=sys.stderr)


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
    _add_tasks_file(p)
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
    _add_tasks_file(p)
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
    _knob(p, "--max-queries", EvalConfig, "max_queries", "keep the first test queries", type=int)
    p.add_argument("--beir", default=None, metavar="DIR",
                   help="full-corpus nDCG@10 / Recall@100 on a BEIR folder (corpus.jsonl, "
                        "queries.jsonl, qrels/SPLIT.tsv) or one in the project's layout")
    p.add_argument("--split", default="test", help="--beir: the split to evaluate")
    p.add_argument("--task", default="qa", choices=sorted(TASKS),
                   help="--beir: the task whose instructions the encoders use")
    p.add_argument("--query-max-length", type=int, default=128,
                   help="--beir: tokens per query, instruction included")
    p.add_argument("--key-max-length", type=int, default=256,
                   help="--beir: tokens per document, instruction included")
    p.add_argument("--out", default=None,
                   help="write the results: NAME.json gets JSON and NAME.md Markdown beside it; "
                        "NAME.md gets Markdown and NAME.json JSON beside it")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, main_eval

    config = build_config(EvalConfig, args.config, _given(args, EvalConfig))
    if args.beir:
        from .beir import main_beir

        return main_beir(args.beir, split=args.split, model=args.model, task=args.task,
                         max_queries=config.max_queries, systems=config.systems,
                         device=config.device, batch_size=config.batch_size,
                         query_max_length=args.query_max_length,
                         key_max_length=args.key_max_length, out=args.out,
                         verbose=config.verbose)
    return main_eval(model=args.model, out=args.out, config=config, llm=args.llm)


# ----------------------------------------------------------------------------- index, search


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="encode a corpus and save a searchable index")
    _add_tasks_file(p)
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
    _add_tasks_file(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import run_from_args

    return run_from_args(args)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index (or a bundled corpus) with queries",
                       description="Without --index, searches the bundled corpus of --task.")
    _add_tasks_file(p)
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


# ----------------------------------------------------------------------------- convert

#: (--from, --to) -> the options that direction needs besides the input file.
_CONVERSIONS = {("flag", "queries"): ("queries", "corpus"), ("flag", "labelled"): ("out",),
                ("labelled", "flag"): ("out",), ("queries", "flag"): ("corpus", "out")}


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="FlagEmbedding fine-tuning data to and from queries/labelled files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Convert FlagEmbedding's fine-tuning JSONL ({"query", "pos": [...], "neg": [...], "pos_scores"?,
"neg_scores"?, "prompt"?, "type"?} and LLM-Embedder's "teacher_scores", "answers", "task",
"history") to and from this package's files:

  --from flag --to queries IN --queries Q --corpus C [--pool shared|query]
      queries + corpus for `label`; texts deduplicated into the corpus (ids: content hashes),
      pos -> positive_ids, neg -> negative_ids (for reference: label mines its own negatives,
      unless --pool query gives each query a pool of exactly its pos + neg)
  --from flag --to labelled IN --out L [--task NAME] [--unscored labels]
      records with teacher scores -> a labelled file for `train` (method "flag")
  --from labelled --to flag IN --out F [--reward rank] [--queries Q]
      a labeller's output -> pos/neg with pos_scores/neg_scores and teacher_scores
  --from queries --to flag IN --corpus C --out F
      queries + corpus -> unscored pos/neg

Score your own FlagEmbedding data with the frozen LLM, then train on it with FlagEmbedding:
  llm-embedder convert --from flag --to queries train.jsonl --queries q.jsonl --corpus c.jsonl
  llm-embedder label --task qa --queries q.jsonl --corpus c.jsonl --out qa.labels.jsonl
  llm-embedder convert --from labelled --to flag qa.labels.jsonl --queries q.jsonl \\
      --out train.scored.jsonl""")
    p.add_argument("input", help="the file to convert")
    p.add_argument("--from", dest="source", required=True, choices=["flag", "labelled", "queries"])
    p.add_argument("--to", dest="target", required=True, choices=["flag", "labelled", "queries"])
    p.add_argument("--queries", default=None,
                   help="--to queries: the queries file to write; --from labelled: the queries "
                        "file it was labelled from (restores FlagEmbedding fields, answers)")
    p.add_argument("--corpus", default=None,
                   help="--to queries: the corpus file to write; --from queries: its corpus")
    p.add_argument("--out", default=None, help="the file to write (--to labelled / flag)")
    p.add_argument("--pool", default="shared", choices=["shared", "query"],
                   help="--to queries: one corpus for all queries (shared), or each query's own "
                        "pos + neg as its candidate pool (query)")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="--to labelled: the task of every record (default: each record's "
                        "'task' field)")
    p.add_argument("--unscored", default="error", choices=["error", "labels"],
                   help="--to labelled: a record without teacher scores is an error, or gets "
                        "1.0 for pos and 0.0 for neg (labels)")
    p.add_argument("--reward", default="rank",
                   help="--from labelled: the reward written as scores (default: rank, what "
                        "train uses)")
    _add_tasks_file(p)
    p.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from . import flag

    direction = (args.source, args.target)
    if direction not in _CONVERSIONS:
        known = ", ".join(f"--from {a} --to {b}" for a, b in _CONVERSIONS)
        raise ValueError(f"cannot convert --from {args.source} --to {args.target}; known: "
                         f"{known}")
    missing = [f"--{name}" for name in _CONVERSIONS[direction] if getattr(args, name) is None]
    if missing:
        raise ValueError(f"convert --from {args.source} --to {args.target} needs "
                         f"{' and '.join(missing)}")
    if direction == ("flag", "queries"):
        summary = flag.flag_to_queries(args.input, args.queries, args.corpus, pool=args.pool)
    elif direction == ("flag", "labelled"):
        summary = flag.flag_to_labelled(args.input, args.out, task=args.task,
                                        unscored=args.unscored)
    elif direction == ("labelled", "flag"):
        summary = flag.labelled_to_flag(args.input, args.out, reward=args.reward,
                                        queries=args.queries)
    else:
        summary = flag.queries_to_flag(args.input, args.corpus, args.out)
    print(summary)
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
    p.add_argument("--relabel", action="store_true",
                   help="label with the frozen LLM in this run instead of training from the "
                        "project's LLM labels of the bundled queries (bundled/labels)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig.load(args.config) if args.config else None
    run_quickstart(out_dir=args.out, full=args.full, device=args.device, seed=args.seed,
                   config=config, relabel=args.relabel)
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
    _add_tasks_file(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quickstart, _add_label, _add_merge, _add_train, _add_eval, _add_index,
                _add_search, _add_serve, _add_convert):
        add(sub)
    return parser


def _tasks_files(argv: Sequence[str]) -> List[str]:
    """The values of every ``--tasks-file`` in ``argv`` (global or a subcommand's), found before
    parsing: the parser's ``--task`` choices must already know the tasks they register."""
    files = []
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--tasks-file" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif token.startswith("--tasks-file="):
            files.append(token.split("=", 1)[1])
    return files


def _register_tasks_files(paths: Sequence[str]) -> List[Task]:
    """Register the tasks of every file, all or none; returns them for :func:`main` to remove
    once the command is done (a notebook or test calling ``main`` twice gets a clean slate)."""
    from .tasks import register_tasks_file, unregister_task

    added: List[Task] = []
    try:
        for path in paths:
            added += register_tasks_file(path)
    except BaseException:
        for task in added:
            unregister_task(task.name)
        raise
    return added


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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        added = _register_tasks_files(_tasks_files(argv))
    except Exception as err:
        return _report(err, debug="--debug" in argv)
    try:
        return _run(build_parser(), argv)
    finally:
        from .tasks import unregister_task

        for task in added:
            unregister_task(task.name)


def _run(parser: argparse.ArgumentParser, argv: List[str]) -> int:
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
        return _report(err, debug=args.debug)


def _report(err: Exception, debug: bool) -> int:
    """Print one of our errors as one line and return 2; re-raise a bug (see :func:`_ours`)."""
    if not _ours(err):
        raise err
    if debug:
        traceback.print_exception(err)
    # An actionable message; a traceback would only bury it (--debug shows it).
    print(f"llm-embedder: error: {_one_line(err)}", file=sys.stderr)
    return 2


def _entry(argv: Optional[List[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    _entry()
