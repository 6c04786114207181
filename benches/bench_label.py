"""LLM feedback throughput: labelling with and without prefix reuse, and pairs scored per
second, KV reuse vs naive.

One run, one process, the same inputs for every method:

1. ``label`` labels ``--queries`` real queries end to end (BM25 negatives, N sampled outputs,
   rewards) with the packaged SmolLM2-135M: queries/s and LLM tokens/s of the whole pipeline.
2. The (candidate prompt, output) pairs of those labelled queries are scored again by
   - ``score_grouped``: each candidate prompt once, its KV cache expanded over the outputs
     (what ``label`` uses), one call per query;
   - ``score(batch_size=16)``: full prompt+output sequences, padded batches (no reuse);
   - ``score(batch_size=1)``: the naive reference, one pair per forward pass.
   The methods alternate query by query (so a change in machine load hits all alike). The
   table shows wall and CPU (process) seconds, pairs/s, pair-tokens/s (prompt+output tokens
   the pairs stand for) and the speed-up over the naive loop (target >= 5x on CPU); all
   methods must agree within 1e-4.
3. Prefix reuse, end to end: ``--reuse-queries`` queries that share ``--reuse-passages``
   positive passages (default 10 over 2: 5 questions per passage, as in qa's training split,
   5.2 on average, 5 for 85 of its 150 passages) are labelled twice with the
   labelling settings of ``scripts/label_bundled.py`` (N=8, samples with and without the top 2
   candidates as context, oversample 2), with ``reuse_prefixes=False`` (each prompt run in
   full: the labeller before prefix reuse) and ``True`` (each candidate's passage run once
   into the LLM's prefix cache, emptied first, and reused by sampling and scoring across the
   queries; ``query_batch`` queries labelled together, their samples decoded in one batch).
   The two alternate every ``query_batch`` queries. LLM tokens/s counts the same work for both:
   the tokens the labeller without reuse runs for these labels; target >= 2x. Both must write
   the same samples and rewards within 1e-4.

    python benches/bench_label.py                      # qa, 2 queries, 7 negatives, N=8
    python benches/bench_label.py --queries 4 --write  # also write benches/results_label.md
    python benches/bench_label.py --task chat --device cuda
    python benches/bench_label.py --reuse-queries 0    # skip part 3
    python benches/bench_label.py --reuse-only         # part 3 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from llm_embedder.label import LabelConfig, _key_prefix, label  # noqa: E402
from llm_embedder.llm import FrozenLLM  # noqa: E402
from llm_embedder.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
FOLDERS = {"qa": "qa/xquad", "tool": "tool/gorilla", "chat": "chat/locomo", "icl": "icl/fewshot5"}


def pairs_of(llm: FrozenLLM, records: List[dict], task_name: str, max_key_tokens: int
             ) -> List[Tuple[List[str], List[str], List[Optional[str]]]]:
    """Per query: the candidate prompts, the outputs scored under each and the prompts'
    cacheable prefixes, as ``label`` built them (keys cut to ``max_key_tokens``, the task's
    answer prefix before each output)."""
    task = get_task(task_name)
    groups = []
    for record in records:
        keys = llm.truncate([c["text"] for c in record["candidates"] if c["id"]], max_key_tokens)
        prompts = [task.format_prompt(record["query"], k) for k in keys]
        prompts.append(task.format_prompt(record["query"], None))
        prefixes = [_key_prefix(task, k) for k in keys] + [None]
        outputs = [task.answer_prefix + o for o in [record["answer"], *record["samples"]]]
        groups.append((prompts, outputs, prefixes))
    return groups


#: The labelling settings of scripts/label_bundled.py (the project's label artefact).
BUNDLED_SETTINGS = {"num_samples": 8, "num_negatives": 7, "negatives": "bm25", "seed": 0,
                    "sample_contexts": 2, "oversample": 2.0}


def shared_passage_queries(path: Path, n_queries: int, n_passages: int) -> List[str]:
    """Lines of ``path``: ``n_queries`` queries, as evenly as possible over the first
    ``n_passages`` positive passages (in file order) that have enough queries."""
    per = -(-n_queries // n_passages)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_passage: Dict[str, List[str]] = {}
    for line in lines:
        record = json.loads(line)
        if record.get("positive_ids") and any(a.strip() for a in record.get("answers", [])):
            by_passage.setdefault(record["positive_ids"][0], []).append(line)
    chosen: List[str] = []
    for group in by_passage.values():
        if len(group) >= per and len(chosen) < n_queries:
            chosen += group[:min(per, n_queries - len(chosen))]
    if len(chosen) < n_queries:
        sys.exit(f"{path}: fewer than {n_queries} queries over {n_passages} shared passages")
    return chosen


def reuse_comparison(llm: FrozenLLM, task: str, folder: Path, n_queries: int,
                     n_passages: int, max_key_tokens: int) -> Tuple[List[str], bool]:
    """Part 3: label the same queries without and with prefix reuse, alternating query by
    query; returns the report lines and whether both arms wrote the same labels."""
    with tempfile.TemporaryDirectory() as tmp:
        queries = Path(tmp) / "queries.jsonl"
        chosen = shared_passage_queries(folder / "queries.train.jsonl", n_queries, n_passages)
        queries.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        passages = len({json.loads(line)["positive_ids"][0] for line in chosen})
        if llm.prefix_cache is not None:
            llm.prefix_cache.clear()  # cold: hits come from these queries only
        stats0 = dict(llm.prefix_cache.stats) if llm.prefix_cache is not None else {}
        arms = {"reuse off (each prompt run in full)": False,
                "reuse on (prefix cache, joint sampling)": True}
        outs = {name: Path(tmp) / f"{reuse}.jsonl" for name, reuse in arms.items()}
        wall = dict.fromkeys(arms, 0.0)
        cpu = dict.fromkeys(arms, 0.0)
        work = dict.fromkeys(arms, 0)
        ran = dict.fromkeys(arms, 0)
        step = LabelConfig().query_batch
        for k in range(min(step, len(chosen)), len(chosen) + step, step):
            k = min(k, len(chosen))
            for name, reuse in arms.items():
                forward0 = llm.stats["forward_tokens"]
                c0 = time.process_time()
                summary = label(task, queries, folder / "corpus.jsonl", outs[name], llm=llm,
                                limit=k, max_key_tokens=max_key_tokens, show_progress=False,
                                reuse_prefixes=reuse, **BUNDLED_SETTINGS)
                cpu[name] += time.process_time() - c0
                wall[name] += summary.seconds - summary.setup_seconds
                work[name] += summary.llm_tokens
                ran[name] += llm.stats["forward_tokens"] - forward0
            print(f"  reuse: query {k}/{len(chosen)}: "
                  + ", ".join(f"{name.split(' (')[0]} {wall[name]:.1f} s" for name in arms),
                  flush=True)
        records = {name: [json.loads(line) for line in path.read_text().splitlines()]
                   for name, path in outs.items()}
    off, on = (records[name] for name in arms)
    same_samples = [a["samples"] for a in off] == [b["samples"] for b in on]
    diff = max(float(np.max(np.abs(np.asarray(a[f], dtype=np.float64)
                                   - np.asarray(b[f], dtype=np.float64))))
               for a, b in zip(off, on)
               for f in ("likelihood_rewards", "rank_rewards", "sample_likelihoods"))
    names = list(arms)
    # The same work for both: the tokens the labeller without reuse runs for these labels
    # (the reuse arm's own count, run + saved, must equal it).
    rate = {name: work[names[0]] / max(wall[name], 1e-9) for name in names}
    lines = [
        (f"Prefix reuse, end to end (`label`, settings of scripts/label_bundled.py: "
         f"{json.dumps(BUNDLED_SETTINGS)}): {len(chosen)} {task} queries over {passages} "
         f"shared positive passages, the two arms alternating every "
         f"{LabelConfig().query_batch} queries (query_batch), prefix cache "
         f"emptied first."),
        "",
        ("| labelling | wall s | CPU s | LLM tokens (work) | model tokens run | LLM tokens/s "
         "| speed-up (wall) | (CPU) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        lines.append(f"| {name} | {wall[name]:.1f} | {cpu[name]:.1f} | {work[name]} | "
                     f"{ran[name]} | {rate[name]:.0f} | {wall[names[0]] / wall[name]:.2f}x | "
                     f"{cpu[names[0]] / cpu[name]:.2f}x |")
    stats = ({k: v - stats0[k] for k, v in llm.prefix_cache.stats.items()}
             if llm.prefix_cache is not None else {})
    size = llm.prefix_cache.bytes / 2**20 if llm.prefix_cache is not None else 0.0
    lines += [
        "",
        (f"Same samples in both: {'yes' if same_samples else 'NO'}; rewards and likelihoods "
         f"differ by at most {diff:.1e}. Prefix cache in this part: {stats}, "
         f"{size:.0f} MiB held at the end."),
    ]
    return lines, same_samples and diff <= 1e-4


def scoring_parts(llm: FrozenLLM, args: argparse.Namespace, folder: Path, load: float
                  ) -> Tuple[List[str], float]:
    """Parts 1 and 2: the report lines and the largest disagreement of a method with the
    naive scores."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "labels.jsonl"
        config = LabelConfig(num_samples=args.num_samples, num_negatives=args.num_negatives,
                             max_key_tokens=args.max_key_tokens, limit=args.queries,
                             show_progress=False)
        summary = label(args.task, folder / "queries.train.jsonl", folder / "corpus.jsonl", out,
                        llm=llm, config=config)
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    print(summary, flush=True)

    groups = pairs_of(llm, records, args.task, args.max_key_tokens)
    flat_p = [p for prompts, outputs, _ in groups for p in prompts for _ in outputs]
    flat_o = [o for prompts, outputs, _ in groups for _ in prompts for o in outputs]
    n_pairs = len(flat_p)
    pair_tokens = sum(len(p) + len(o) for p, o in llm.encode_pairs(flat_p, flat_o))

    # Methods alternate query by query, so a change in machine load hits them alike; CPU time
    # (process time) is reported beside wall time because other jobs may share the cores.
    # The prefix cache starts empty: the first query's passages are run, later ones reused.
    if llm.prefix_cache is not None:
        llm.prefix_cache.clear()
    methods = {
        "score_grouped + prefix cache (as label)":
            lambda prompts, outputs, prefixes: np.concatenate(llm.score_grouped(
                prompts, [outputs] * len(prompts), prefixes=prefixes)),
        "score_grouped (KV reuse within a query)":
            lambda prompts, outputs, prefixes: np.concatenate(
                llm.score_grouped(prompts, [outputs] * len(prompts))),
        "score, batch 16 (no reuse)":
            lambda prompts, outputs, prefixes: llm.score(
                [p for p in prompts for _ in outputs], outputs * len(prompts), batch_size=16),
        "score, batch 1 (naive)":
            lambda prompts, outputs, prefixes: llm.score(
                [p for p in prompts for _ in outputs], outputs * len(prompts), batch_size=1),
    }
    parts = {name: [] for name in methods}
    wall = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    ran = dict.fromkeys(methods, 0)
    for q, (prompts, outputs, prefixes) in enumerate(groups):
        for name, fn in methods.items():
            tokens0 = llm.stats["forward_tokens"]
            w0, c0 = time.perf_counter(), time.process_time()
            parts[name].append(fn(prompts, outputs, prefixes))
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
            ran[name] += llm.stats["forward_tokens"] - tokens0
            print(f"  query {q}: {name}: {wall[name]:.1f} s so far", flush=True)
    results = {name: (np.concatenate(parts[name]), wall[name], cpu[name], ran[name])
               for name in methods}

    naive_scores, naive_s, naive_cpu, _ = results["score, batch 1 (naive)"]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        (f"### bench_label: {args.task}, {len(records)} queries, "
         f"{summary.candidates_per_query:.0f} candidates/query (incl. empty), "
         f"N={args.num_samples} requested ({summary.samples_per_query:.1f} distinct kept), "
         f"keys <= {args.max_key_tokens} tokens"),
        "",
        (f"Machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, device "
         f"{llm.device}, {llm.dtype}; load average {load:.2f} at start, {load_end:.2f} at end "
         f"(other jobs share the CPU when it exceeds the thread count)."),
        "",
        f"{n_pairs} (candidate, output) pairs = {pair_tokens} prompt+output tokens.",
        "",
        ("| method | wall s | CPU s | pairs/s | pair-tokens/s | model tokens run "
         "| speed-up vs naive (wall) | (CPU) | max abs diff vs naive |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (scores, seconds, cpu_s, tokens_run) in results.items():
        diff = float(np.max(np.abs(scores - naive_scores)))
        lines.append(f"| {name} | {seconds:.1f} | {cpu_s:.1f} | {n_pairs / seconds:.2f} | "
                     f"{pair_tokens / seconds:.0f} | {tokens_run} | {naive_s / seconds:.2f}x | "
                     f"{naive_cpu / cpu_s:.2f}x | {diff:.1e} |")
    lines += [
        "",
        (f"End to end (`label`: sampling + scoring + rewards, setup excluded): "
         f"{summary.seconds - summary.setup_seconds:.1f} s for {summary.labelled_now} queries "
         f"= {summary.queries_per_s:.3f} queries/s "
         f"({1 / max(summary.queries_per_s, 1e-9):.1f} s/query), "
         f"{summary.tokens_per_s:.0f} LLM tokens/s, {summary.pairs_per_s:.1f} pairs/s."),
    ]
    worst = max(float(np.max(np.abs(r[0] - naive_scores))) for r in results.values())
    return lines, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="qa", choices=sorted(FOLDERS))
    parser.add_argument("--queries", type=int, default=2, help="queries labelled and re-scored")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--max-key-tokens", type=int, default=192)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reuse-queries", type=int, default=10,
                        help="part 3: queries labelled with and without prefix reuse (0: skip)")
    parser.add_argument("--reuse-passages", type=int, default=2,
                        help="part 3: positive passages those queries share")
    parser.add_argument("--reuse-only", action="store_true",
                        help="run part 3 only (labelling with and without prefix reuse)")
    parser.add_argument("--write", action="store_true", help="write benches/results_label.md")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.data / FOLDERS[args.task]
    if not folder.is_dir():
        sys.exit(f"{folder} not found: pass --data pointing at the shared data folder")
    llm = FrozenLLM.load(device=args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, device {llm.device}, dtype {llm.dtype}, "
          f"load average at start {load:.2f}", flush=True)

    if args.reuse_only:
        lines = [f"### bench_label: {args.task}, prefix reuse only (part 3)", "",
                 (f"Machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                  f"device {llm.device}, {llm.dtype}; load average {load:.2f} at start.")]
        worst = 0.0
        # Parts 1 and 2 warm the model up otherwise: one-off costs (the newline token table,
        # the first forwards) must not land in part 3's first arm.
        llm.sample(["Question: Name a colour.\n\nAnswer:"], 2, max_new_tokens=4, seed=0)
        llm.score_grouped(["Question: Name a colour.\n\nAnswer:"], [[" red", " blue"]])
    else:
        lines, worst = scoring_parts(llm, args, folder, load)
    reuse_ok = True
    if args.reuse_queries > 0:
        reuse_lines, reuse_ok = reuse_comparison(llm, args.task, folder, args.reuse_queries,
                                                 args.reuse_passages, args.max_key_tokens)
        load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines += ["", *reuse_lines, "", f"Load average at the end of the run: {load_end:.2f}."]
    table = "\n".join(lines)
    print()
    print(table)
    if worst > 1e-4:
        print(f"ERROR: methods disagree by {worst:.2e} (> 1e-4)", file=sys.stderr)
        return 1
    if not reuse_ok:
        print("ERROR: labelling with prefix reuse differs from labelling without (samples, or "
              "rewards by > 1e-4)", file=sys.stderr)
        return 1
    if args.write:
        path = ROOT / "benches" / "results_label.md"
        previous = path.read_text(encoding="utf-8") if path.is_file() else \
            "# bench_label results\n\nWritten by `python benches/bench_label.py --write`.\n"
        path.write_text(previous.rstrip("\n") + "\n\n" + table + "\n", encoding="utf-8")
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
