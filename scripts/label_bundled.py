"""Label the bundled training queries with the packaged SmolLM2 and keep the labels compact.

This makes the project's versioned reward artefact, ``python/llm_embedder/bundled/labels/``:
one compact labelled file per task (ids, rewards, samples and likelihoods; the texts come back
from the bundled queries and corpus, see ``label.expand_labelled``) and a ``README.md`` saying
how they were made (command, LLM, N, CPU time). The quickstart trains from them unless it is run
with ``--relabel``.

Hours of CPU in all, so it works in rounds: each round labels the next ``--step`` queries of
every task (in the quickstart's stratified order, so any prefix covers every conversation and
sub-task), then rewrites the compact files. Kill it at any time; run it again and it resumes
(the full labelled files in ``--work`` are appended to query by query; a SIGTERM or Ctrl-C
writes the artefact and the CPU time of the queries labelled so far before it exits, and
``--sync`` rewrites the artefact from ``--work`` without the LLM). On a new checkout,
where ``--work`` is empty, it first expands the committed compact files into ``--work`` and
takes the CPU time spent so far from ``labels/state.json``, so the artefact grows across
machines and sessions.

    nohup python scripts/label_bundled.py --work work/labels > work/label.log 2>&1 &

One run per core, each on its own tasks, works too (on a CPU one thread each is faster than
two threads shared): each writes only its tasks' rows of ``state.json``, merged under a lock.

    OMP_NUM_THREADS=1 nohup python scripts/label_bundled.py --tasks qa > work/qa.log 2>&1 &
    OMP_NUM_THREADS=1 nohup python scripts/label_bundled.py --tasks tool > work/tool.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

from llm_embedder.data import bundled_data_dir, bundled_task_files, iter_jsonl, load_queries
from llm_embedder.io import atomic_write_json, atomic_write_text
from llm_embedder.label import (LabelConfig, compact_labelled, expand_labelled, label,
                                 reward_report)
from llm_embedder.llm import LLM_GGUF_NAME, FrozenLLM
from llm_embedder.quickstart import TASK_ORDER, stratified_order

#: The labelling settings of the artefact (the quickstart's --relabel uses the same).
SETTINGS = {"num_samples": 8, "num_negatives": 7, "negatives": "bm25", "seed": 0,
            "sample_contexts": 2, "oversample": 2.0}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ordered_queries(task: str, work: Path) -> Path:
    """The task's training queries with answers, in the quickstart's stratified order."""
    files = bundled_task_files(task)
    queries = [q for q in load_queries(files["train"]) if any(a.strip() for a in q.answers)]
    raw = {str(obj["id"]): obj for _, obj in iter_jsonl(files["train"])}
    path = work / f"{task}.queries.jsonl"
    atomic_write_text(path, "".join(json.dumps(raw[q.id], ensure_ascii=False) + "\n"
                                    for q in stratified_order(queries, SETTINGS["seed"])))
    return path


def _finite(value: float) -> float | None:
    # JSON has no NaN (strict parsers refuse it): a task without human positives has no share.
    return value if math.isfinite(value) else None


def _sync(task: str, out: Path, target: Path, row: Dict, total: int) -> Dict[str, Any]:
    """Rewrite ``task``'s compact file and its ``row`` of the state from the full file ``out``;
    returns its :func:`reward_report` (``queries``: the LLM-labelled queries)."""
    report = reward_report(out)
    row.update(labelled=report["queries"], total=total, distinct_ranks=report["distinct_ranks"],
               samples=report["samples"],
               rank_top=_finite(report["rank"]["positive_on_top"]),
               likelihood_top=_finite(report["likelihood"]["positive_on_top"]),
               rank_spread=report["rank"]["spread"],
               likelihood_spread=report["likelihood"]["spread"])
    target.mkdir(exist_ok=True)
    compact_labelled(out, target / f"{task}.jsonl")
    return report


def _save(state_path: Path, state: Dict, target: Path, llm_name: str,
          tasks: List[str]) -> None:
    """Write this run's rows (``tasks``) into the state on disk and rewrite the README from it:
    runs labelling other tasks at the same time (one per core) keep their own rows."""
    with _locked(state_path):
        merged = json.loads(state_path.read_text()) if state_path.is_file() else {}
        merged.update({task: state[task] for task in tasks if task in state})
        atomic_write_json(state_path, merged)
        _write_readme(target, merged, llm_name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Read-merge-write of the state is one critical section across processes (POSIX only;
    # elsewhere one run at a time).
    try:
        import fcntl
    except ImportError:
        yield
        return
    # The lock is the artefact's folder itself: no lock file lands in the package.
    handle = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _share(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_readme(target: Path, state: Dict[str, Dict[str, float]], llm_name: str) -> None:
    lines = [
        "# LLM labels of the bundled training queries",
        "",
        "Made by `python scripts/label_bundled.py` (rounds of `llm_embedder.label` with "
        f"`{json.dumps(SETTINGS)}`), i.e. per task:",
        "",
        "    llm-embedder label --task TASK --queries <bundled train, stratified order> "
        "--corpus <bundled corpus> --out TASK.jsonl --num-samples 8 --num-negatives 7",
        "",
        f"LLM: {llm_name}, float32 on CPU. Compact records (ids, rewards, samples, likelihoods);",
        "`llm_embedder.label.expand_labelled` restores the texts from the bundled data.",
        "",
        "Per query, averaged over the task's labelled queries: the distinct ranks of the desired",
        "output among the samples, the samples kept, each reward's spread (standard deviation",
        "over the query's candidates) and how often a human positive gets the top reward.",
        "",
        "| task | labelled queries | of | CPU hours | distinct ranks/query | samples/query | "
        "spread (rank) | (likelihood) | positive on top (rank) | (likelihood) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, row in state.items():
        lines.append(f"| {task} | {int(row['labelled'])} | {int(row['total'])} | "
                     f"{row['cpu_seconds'] / 3600:.2f} | {row.get('distinct_ranks', 0):.2f} | "
                     f"{row.get('samples', 0):.2f} | {_share(row.get('rank_spread'))} | "
                     f"{_share(row.get('likelihood_spread'))} | {_share(row.get('rank_top'))} | "
                     f"{_share(row.get('likelihood_top'))} |")
    atomic_write_text(target / "README.md", "\n".join(lines) + "\n")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work/labels", help="full labelled files (resumable)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_ORDER))
    parser.add_argument("--step", type=int, default=25, help="queries per task and round")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--sync", action="store_true",
                        help="only rewrite the artefact from --work (no LLM, nothing labelled)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target = bundled_data_dir() / "labels"
    # The state (CPU time, counts) lives with the artefact: it must survive a lost --work.
    state_path = target / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ordered = {task: _ordered_queries(task, work) for task in args.tasks}
    for task in args.tasks:
        full, compact = work / f"{task}.jsonl", target / f"{task}.jsonl"
        if not full.is_file() and compact.is_file():
            restored = expand_labelled(compact, ordered[task], bundled_task_files(task)["corpus"],
                                       full)
            print(f"{task}: {restored} labelled queries restored from {compact.name}", flush=True)
    totals = {task: sum(1 for _ in iter_jsonl(path)) for task, path in ordered.items()}
    if args.sync:
        for task in args.tasks:
            if (work / f"{task}.jsonl").is_file():
                row = state.setdefault(task, {"cpu_seconds": 0.0})
                _sync(task, work / f"{task}.jsonl", target, row, totals[task])
        # The artefact is made with the packaged LLM only (FrozenLLM.load()'s default).
        _save(state_path, state, target, Path(LLM_GGUF_NAME).stem, args.tasks)
        return 0
    llm = FrozenLLM.load()
    config = LabelConfig(show_progress=False, **SETTINGS)
    signal.signal(signal.SIGTERM, _stop)
    for round_ in range(1, args.rounds + 1):
        busy = False
        for task in args.tasks:
            out = work / f"{task}.jsonl"
            row = state.setdefault(task, {"cpu_seconds": 0.0})
            if row.get("labelled", 0) >= totals[task]:
                continue
            busy = True
            cpu, start = _cpu_seconds(), time.time()
            # Step from what is there, so a resumed run does not redo no-op rounds.
            limit = max(round_ * args.step, int(row.get("labelled", 0)) + args.step)
            try:
                summary = label(task, ordered[task], bundled_task_files(task)["corpus"], out,
                                llm=llm, config=config, limit=limit)
            except KeyboardInterrupt:
                # The queries written before the stop are kept: count their CPU time too.
                row["cpu_seconds"] += _cpu_seconds() - cpu
                report = _sync(task, out, target, row, totals[task])
                _save(state_path, state, target, llm.name, args.tasks)
                print(f"stopped in round {round_} {task}: {report['queries']}/{totals[task]} "
                      f"queries kept", flush=True)
                return 130
            row["cpu_seconds"] += _cpu_seconds() - cpu
            report = _sync(task, out, target, row, totals[task])
            _save(state_path, state, target, llm.name, args.tasks)
            print(f"round {round_} {task}: {summary.queries}/{totals[task]} queries, "
                  f"{time.time() - start:.0f} s, {json.dumps(report)}", flush=True)
        if not busy:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
