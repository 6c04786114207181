"""Train the embedder on the SciFact train claims and measure it on held-out claims, in one command.

Stages (each skipped when its output exists, so a killed run continues where it stopped):

1. split   ``OUT/split``: ``scripts/scifact_split.py`` (dev = 148 claims by a stable hash);
2. label   ``OUT/labels/qa.labels.jsonl``: label-only records of the train claims (reward 1 for
           the cited abstracts, 0 for 7 BM25 hard negatives), ``llm-embedder label --method
           labels``. With ``--llm-labels FILE`` (a labelled file with LLM rewards for some
           claims, full or compact) ``OUT/labels/qa.<FILE stem>.jsonl`` holds its records of
           train claims (dev claims are dropped, counted) and label-only ones for the rest;
3. train   ``OUT/runs/NAME``: ``config.json`` (the TrainConfig), ``train/`` (checkpoints, log,
           model), ``train.json`` (minutes); NAME is ``--name`` or made from the settings;
4. eval    full-corpus nDCG@10 / Recall@100 on dev (``llm_embedder.beir``, as ``llm-embedder
           eval --beir OUT/split --split dev`` computes them): BM25 and the base encoder with
           and without the qa instructions with ``--dense-baselines`` (``OUT/eval/
           baselines.json``), each run's model with the instructions (``trained``, what ``eval
           --beir --model`` reports) and, with ``--eval-noinstr``, without them
           (``trained_noinstr``), in ``OUT/runs/NAME/eval.json``; ``--also-eval NAME=DIR``
           scores other models the same way (``OUT/eval/NAME.json``). On a busy 2-core CPU one
           corpus encoding takes minutes: the dense variants are asked for, not default;
5. table   ``OUT/results.md`` and ``OUT/results.json``: every run under ``OUT/runs`` and every
           evaluated model, one row each.

SciFact is CC BY-NC: OUT must lie outside the package. Several settings share one OUT (the
split, labels and baselines are made once). The run measured so far (then the table has a row
per run), and a model trained without SciFact scored with and without its instructions:

    python scripts/scifact_train.py ../shared/data/qa/scifact runs/scifact \\
        --lr 5e-5 --epochs 1 --loss graded --group-size 4 --key-max-length 128 --threads 1
    python scripts/scifact_train.py ../shared/data/qa/scifact runs/scifact --no-train \\
        --also-eval qs1=quickstart_out/model --eval-noinstr --threads 1

Cost on a 2-core CPU shared with other jobs: a step of 32 claims x 4 candidates of 128 tokens
about 55 s (20 steps an epoch); one model's dev evaluation (5,183 abstracts at 256 tokens)
9-11 min.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from llm_embedder.data import iter_jsonl, load_queries
from llm_embedder.io import atomic_write_json, atomic_write_text

SCRIPTS = Path(__file__).resolve().parent
PACKAGE_DIR = SCRIPTS.parent / "python"
TASK = "qa"


def _say(message: str) -> None:
    print(message, flush=True)


def _run_name(args: argparse.Namespace) -> str:
    """A run folder name that tells the settings apart, e.g. ``graded-lr3e-05-ep1-b32-g8``."""
    if args.name:
        return args.name
    parts = [args.loss, f"lr{args.lr:g}", f"ep{args.epochs:g}", f"b{args.batch_size}",
             f"g{args.group_size}"]
    if args.score_temperature is not None:
        parts.append(f"tau{args.score_temperature:g}")
    if (args.query_max_length, args.key_max_length) != (64, 256):
        parts.append(f"q{args.query_max_length}k{args.key_max_length}")
    if args.seed:
        parts.append(f"s{args.seed}")
    if args.llm_labels is not None:
        parts.append(f"llm-{args.llm_labels.stem}")
    if args.reward is not None:
        parts.append(f"r{args.reward}")
    if args.human_positives is not None:
        parts.append(f"hp{args.human_positives}")
    if args.no_instructions:
        parts.append("noinstr")
    return "-".join(parts)


# ----------------------------------------------------------------------------- stages


def make_split(source: Path, split: Path) -> None:
    """Stage 1: the deterministic train/dev split, unless ``split`` holds it already."""
    if all((split / name).is_file() for name in
           ("corpus.jsonl", "queries.train.jsonl", "queries.dev.jsonl")):
        return
    subprocess.run([sys.executable, str(SCRIPTS / "scifact_split.py"), str(source), str(split)],
                   check=True)


def label_only(split: Path, out: Path, num_negatives: int) -> None:
    """Stage 2a: 1/0 rewards from the cited abstracts and BM25 hard negatives."""
    if out.is_file():
        return
    from llm_embedder.label import LabelConfig, label

    partial = out.with_name(out.name + ".partial")  # the labeller appends: finish, then rename
    config = LabelConfig(method="labels", num_negatives=num_negatives, negatives="bm25", seed=0)
    label(TASK, split / "queries.train.jsonl", split / "corpus.jsonl", partial, config=config)
    partial.replace(out)


def merge_llm_labels(llm_file: Path, label_file: Path, split: Path, out: Path
                     ) -> Dict[str, int]:
    """Stage 2b: the LLM-labelled records of train claims, then label-only records of the rest.

    A compact file (``candidate_ids``) is expanded from the split's texts first. Claims of the
    dev split are dropped: training on them would leak into the measurement.
    """
    from llm_embedder.label import expand_labelled

    train_ids = {q.id for q in load_queries(split / "queries.train.jsonl")}
    first = next((obj for _, obj in iter_jsonl(llm_file)), None)
    if first is None:
        raise ValueError(f"{llm_file}: no labelled records")
    full = llm_file
    dropped = 0
    if "candidate_ids" in first:
        dropped = sum(1 for _, obj in iter_jsonl(llm_file)
                      if str(obj.get("query_id")) not in train_ids)
        full = out.with_name(out.stem + ".expanded.jsonl")
        expand_labelled(llm_file, split / "queries.train.jsonl", split / "corpus.jsonl", full,
                        query_ids=train_ids)
    llm_lines: List[str] = []
    llm_ids = set()
    for number, obj in iter_jsonl(full):
        qid = str(obj.get("query_id"))
        if qid not in train_ids:
            dropped += 1
            continue
        if qid in llm_ids:
            raise ValueError(f"{full}:{number}: query_id {qid!r} is labelled twice")
        llm_ids.add(qid)
        llm_lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    rest = [json.dumps(obj, ensure_ascii=False) + "\n" for _, obj in iter_jsonl(label_file)
            if str(obj.get("query_id")) not in llm_ids]
    atomic_write_text(out, "".join(llm_lines + rest))
    counts = {"llm_labelled": len(llm_lines), "label_only": len(rest),
              "dropped_not_train": dropped}
    atomic_write_json(out.with_name(out.stem + ".counts.json"), counts)
    _say(f"labels: {out}: {counts}")
    return counts


#: ``--no-instructions`` trains this copy of qa with empty instructions on both sides: on
#: SciFact the base encoder scores higher without qa's instructions than with them.
PLAIN_TASK = "qa_noinstr"


def plain_labels(labels: Path, out: Path) -> Path:
    """``labels`` with every record's task renamed to :data:`PLAIN_TASK` (a training file
    names its task), and that task registered in this process; ``out`` is remade when
    ``labels`` is newer."""
    import dataclasses

    from llm_embedder.tasks import TASKS, get_task, register_task

    if PLAIN_TASK not in TASKS:
        register_task(dataclasses.replace(get_task(TASK), name=PLAIN_TASK, query_instruction="",
                                          key_instruction=""))
    if not out.is_file() or out.stat().st_mtime < labels.stat().st_mtime:
        lines = []
        for number, obj in iter_jsonl(labels):
            if obj.get("task") != TASK:
                raise ValueError(f"{labels}:{number}: task {obj.get('task')!r}, expected "
                                 f"{TASK!r}")
            lines.append(json.dumps({**obj, "task": PLAIN_TASK}, ensure_ascii=False) + "\n")
        atomic_write_text(out, "".join(lines))
    return out


def train_config(args: argparse.Namespace, labels: Path, run_dir: Path) -> Dict[str, Any]:
    """The TrainConfig of one run (written to ``run_dir/config.json``)."""
    task = PLAIN_TASK if args.no_instructions else TASK
    config: Dict[str, Any] = {
        "model": args.model, "tasks": {task: {"file": str(labels), "loss": args.loss}},
        "output_dir": str(run_dir / "train"), "epochs": args.epochs,
        "batch_size": args.batch_size, "group_size": args.group_size, "lr": args.lr,
        "query_max_length": args.query_max_length, "key_max_length": args.key_max_length,
        "seed": args.seed, "resume": True, "save_steps": args.save_steps,
        "log_every": 5, "progress_bar": False,
    }
    if args.score_temperature is not None:
        config["score_temperature"] = args.score_temperature
    if args.reward is not None:
        config["reward"] = args.reward
    if args.human_positives is not None:
        config["human_positives"] = args.human_positives
    return config


def run_training(config: Mapping[str, Any], run_dir: Path) -> Dict[str, Any]:
    """Stage 3: train (resuming a checkpoint); ``train.json`` marks the run done."""
    done = run_dir / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    from llm_embedder.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", dict(config))
    start = time.perf_counter()
    model = train(dict(config))
    log = [obj for _, obj in iter_jsonl(Path(config["output_dir"]) / "log.jsonl")]
    # minutes of this process: a resumed run counts its last leg only
    info = {"model": str(model), "train_minutes": (time.perf_counter() - start) / 60,
            "steps": max((int(obj.get("step", 0)) for obj in log), default=0)}
    atomic_write_json(done, info)
    return info


def evaluate(data: Any, model: Optional[str], out: Path, systems: List[str]) -> Dict[str, Any]:
    """Stage 4: dev nDCG@10 / Recall@100 of ``systems`` (``model`` is their encoder; None: the
    packaged one), added to ``out``; systems ``out`` holds already are not scored again.
    ``trained_noinstr``: ``model`` without instructions."""
    results: Dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    missing = [s for s in systems if s not in results.get("systems", {})]
    if not missing:
        return results
    from llm_embedder.beir import evaluate_beir

    needs_model = any(s.startswith("trained") for s in missing)
    for system in missing:  # one at a time: each finished system survives a kill
        got = evaluate_beir(data, model=model if needs_model else None, systems=[system],
                            task=TASK)
        for key in ("systems", "per_query"):
            got[key] = {**results.get(key, {}), **got[key]}
        results = got
        atomic_write_json(out, results)  # each finished system survives a kill
    return results


# ----------------------------------------------------------------------------- table


def _metrics(results: Mapping[str, Any], system: str) -> Tuple[Optional[float], Optional[float]]:
    got = results.get("systems", {}).get(system)
    return (got["ndcg@10"], got["recall@100"]) if got else (None, None)


def results_table(out: Path) -> Tuple[str, List[Dict[str, Any]]]:
    """Stage 5: one row per baseline, evaluated model and run, as Markdown and records."""
    rows: List[Dict[str, Any]] = []
    baselines = out / "eval" / "baselines.json"
    if baselines.is_file():
        results = json.loads(baselines.read_text())
        for system in ("bm25", "base_noinstr", "base"):
            ndcg, recall = _metrics(results, system)
            if ndcg is not None:
                rows.append({"name": system, "instructions": system == "base",
                             "ndcg@10": ndcg, "recall@100": recall})
    for path in sorted((out / "eval").glob("*.json")):
        if path.name == "baselines.json":
            continue
        results = json.loads(path.read_text())
        for system, instr in (("trained", True), ("trained_noinstr", False)):
            ndcg, recall = _metrics(results, system)
            if ndcg is not None:
                rows.append({"name": path.stem, "instructions": instr,
                             "ndcg@10": ndcg, "recall@100": recall})
    for run_dir in sorted(p for p in (out / "runs").glob("*") if (p / "eval.json").is_file()):
        results = json.loads((run_dir / "eval.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        info = json.loads((run_dir / "train.json").read_text())
        for system, instr in (("trained", True), ("trained_noinstr", False)):
            ndcg, recall = _metrics(results, system)
            if ndcg is not None:
                rows.append({"name": run_dir.name, "instructions": instr, "ndcg@10": ndcg,
                             "recall@100": recall, "train_minutes": info["train_minutes"],
                             # qa, or its copy without instructions: one task a run
                             "labels": Path(next(iter(config["tasks"].values()))["file"]).name})
    queries = json.loads(baselines.read_text())["queries"] if baselines.is_file() else "?"
    lines = [f"# SciFact dev ({queries} held-out claims, full corpus)", "",
             "| system / run | instructions | nDCG@10 | Recall@100 | train min | labels |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        minutes = row.get("train_minutes")
        lines.append(f"| {row['name']} | {'yes' if row['instructions'] else 'no'} | "
                     f"{row['ndcg@10']:.4f} | {row['recall@100']:.4f} | "
                     f"{'' if minutes is None else f'{minutes:.1f}'} | "
                     f"{row.get('labels', '')} |")
    return "\n".join(lines) + "\n", rows


# ----------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    """Split, label, train, evaluate and tabulate; returns 0.

    Example:
        >>> main(["../shared/data/qa/scifact", "runs/scifact", "--lr", "3e-5"])
        0
    """
    # the choices are the library's own lists, so a bad name fails before any stage runs
    from llm_embedder.label import REWARDS
    from llm_embedder.losses import LOSSES
    from llm_embedder.train import HUMAN_POSITIVES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with corpus.jsonl, queries.train.jsonl")
    parser.add_argument("out", type=Path, help="folder to write (outside the package)")
    parser.add_argument("--llm-labels", type=Path, default=None, metavar="FILE",
                        help="labelled file (full or compact) with LLM rewards for some train "
                             "claims; they replace those claims' label-only records")
    parser.add_argument("--name", default=None, help="run folder name (default: from settings)")
    parser.add_argument("--model", default=None, help="encoder to start from (default: "
                                                      "the packaged MiniLM)")
    parser.add_argument("--loss", default="graded", choices=sorted(LOSSES))
    parser.add_argument("--reward", default=None, choices=sorted(REWARDS),
                        help="which reward of LLM-labelled records to train on (default: "
                             "TrainConfig's); label-only records have 1/0 in every reward")
    parser.add_argument("--human-positives", default=None, choices=HUMAN_POSITIVES,
                        help="the cited abstracts beside an LLM reward (see TrainConfig; "
                             "default: TrainConfig's, the reward alone)")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--score-temperature", type=float, default=None,
                        help="tau of the student's scores (default: TrainConfig's)")
    parser.add_argument("--query-max-length", type=int, default=64)
    parser.add_argument("--key-max-length", type=int, default=256)
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a CPU "
                             "shared with other jobs, where threads wait on each other)")
    parser.add_argument("--no-train", action="store_true",
                        help="only the split, labels, baselines, --also-eval and the table")
    parser.add_argument("--also-eval", action="append", default=[], metavar="NAME=DIR",
                        help="score another model folder on dev too (repeatable)")
    parser.add_argument("--dense-baselines", action="store_true",
                        help="also score the base encoder with and without instructions "
                             "(two corpus encodings; BM25 is always scored)")
    parser.add_argument("--eval-noinstr", action="store_true",
                        help="also score each model without instructions (one more corpus "
                             "encoding per model)")
    parser.add_argument("--no-instructions", action="store_true",
                        help="train without instructions on either side (the run is then "
                             "scored without them only)")
    args = parser.parse_args(argv)
    if args.out.resolve().is_relative_to(PACKAGE_DIR):
        parser.error(f"{args.out} is inside the package: SciFact (CC BY-NC) must not ship")
    also = []
    for item in args.also_eval:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder or not Path(folder).is_dir():
            parser.error(f"--also-eval {item!r}: expected NAME=DIR with an existing DIR")
        also.append((name, folder))
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))

    split = args.out / "split"
    make_split(args.source, split)
    labels_dir = args.out / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    labels = labels_dir / f"{TASK}.labels.jsonl"
    label_only(split, labels, args.num_negatives)
    if args.llm_labels is not None:
        merged = labels_dir / f"{TASK}.{args.llm_labels.stem}.jsonl"
        # Made again when the LLM file changed (more claims labelled since).
        if not merged.is_file() or merged.stat().st_mtime < args.llm_labels.stat().st_mtime:
            merge_llm_labels(args.llm_labels, labels, split, merged)
        labels = merged

    from llm_embedder.beir import load_beir

    data = load_beir(split, "dev")
    (args.out / "eval").mkdir(exist_ok=True)
    evaluate(data, None, args.out / "eval" / "baselines.json",
             ["bm25", "base_noinstr", "base"] if args.dense_baselines else ["bm25"])
    variants = ["trained", "trained_noinstr"] if args.eval_noinstr else ["trained"]
    for name, folder in also:
        evaluate(data, folder, args.out / "eval" / f"{name}.json", variants)
    if not args.no_train:
        run_dir = args.out / "runs" / _run_name(args)
        if args.no_instructions:
            labels = plain_labels(labels, labels.with_name(f"{PLAIN_TASK}.{labels.name}"))
        config = train_config(args, labels, run_dir)
        info = run_training(config, run_dir)
        evaluate(data, info["model"], run_dir / "eval.json",
                 ["trained_noinstr"] if args.no_instructions else variants)
    markdown, rows = results_table(args.out)
    atomic_write_text(args.out / "results.md", markdown)
    atomic_write_json(args.out / "results.json", {"rows": rows})
    _say(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
