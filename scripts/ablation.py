"""Ablations of the method on the same labelled data and seed, evaluated on the test slices.

Variants (each changes one thing from the full method, which is ``rank+graded+homog+paced``):

| variant | reward | loss | batches | lr |
|---|---|---|---|---|
| full | rank-aware | graded (qa/tool/icl), KL (chat) | homogeneous | self-paced |
| likelihood | likelihood | as full | homogeneous | self-paced |
| kl | rank-aware | KL for every task | homogeneous | self-paced |
| contrastive | rank-aware (top = positive) | contrastive, all tasks | homogeneous | self-paced |
| mixed | rank-aware | as full | mixed tasks per batch | self-paced |
| fixed_lr | rank-aware | as full | homogeneous | fixed |
| rank_sharp | rank-aware, teacher T 0.02 (not 0.1) | as full | homogeneous | self-paced |

The labelled files come from a quickstart run (``--from quickstart_out``: its ``labels/``), so
run the quickstart first; ``--llm-only`` trains on the LLM-labelled queries alone (the only ones
where likelihood and rank-aware rewards differ: label-only queries carry 1/0 rewards either
way). Every variant trains with the quickstart's sizes and seed unless ``--steps`` says
otherwise, is evaluated with the same test queries (downstream LLM metrics included unless
``--no-downstream``), and one table is printed and written to ``OUT/ablation.md`` (+ JSON).
Resumable: finished variants are skipped.

The default quickstart LLM-labels only a few queries per task on a CPU, too few for the reward
variants to differ. ``--label-budget qa=150000 chat=200000 ...`` (LLM tokens per task) first
labels a larger set into ``OUT/source`` with the quickstart's query choice (same seed, so the
quickstart's LLM labels from ``--from`` are copied in and not paid for twice); the variants then
train on that.

Any registered loss or reward is a variant too: ``--variants loss=NAME reward=NAME`` (names
in ``llm_embedder.losses.LOSSES`` / ``llm_embedder.label.REWARDS``, e.g. one added with
``register_loss`` / ``register_reward``) trains the full method with that one thing changed.

Usage:
    python scripts/ablation.py --from quickstart_out --out ablation_out [--steps 60]
        [--variants full likelihood kl loss=NAME reward=NAME ...] [--llm-only]
        [--no-downstream] [--device cpu] [--label-budget TASK=TOKENS ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from llm_embedder.evaluate import RETRIEVAL_METRICS, EvalConfig, evaluate, primary_metric
from llm_embedder.io import atomic_write_json, atomic_write_text
from llm_embedder.label import REWARDS
from llm_embedder.losses import LOSSES
from llm_embedder.quickstart import QuickstartConfig, label_training_data, train_config
from llm_embedder.train import TrainConfig

VARIANTS: Dict[str, Dict[str, Any]] = {
    "full": {},
    "likelihood": {"reward": "likelihood"},
    "kl": {"loss": "kl"},
    "contrastive": {"loss": "contrastive"},
    "mixed": {"batching": "mixed"},
    "fixed_lr": {"self_paced": False},
    # Not a §7 variant: the rank-aware reward's within-query spread is ~1/5 of the likelihood
    # reward's on the bundled LLM labels (std 0.11-0.29 vs 0.5-1.7, every task), so at the
    # shared T = 0.1 its teacher is far flatter. This gives it a teacher of similar sharpness.
    "rank_sharp": {"teacher_temperature": 0.02},
}
DESCRIPTIONS = {
    "full": "rank-aware reward, graded/KL, homogeneous, self-paced",
    "likelihood": "likelihood reward instead of rank-aware",
    "kl": "KL distillation for every task instead of graded",
    "contrastive": "contrastive (top-rewarded candidate as positive) instead of graded",
    "mixed": "mixed-task batches instead of homogeneous",
    "fixed_lr": "fixed lr instead of self-paced",
    "rank_sharp": "rank-aware reward with teacher temperature 0.02 instead of 0.1",
}


#: ``--variants KIND=NAME``: which registry holds NAME for each kind.
REGISTRIES: Dict[str, Mapping[str, Any]] = {"loss": LOSSES, "reward": REWARDS}


def variant_change(name: str) -> Dict[str, Any]:
    """The one setting variant ``name`` changes: a named variant, or ``loss=NAME`` /
    ``reward=NAME`` for any registered loss or reward.

    Example:
        >>> variant_change("loss=kl")
        {'loss': 'kl'}
    """
    if name in VARIANTS:
        return dict(VARIANTS[name])
    kind, sep, value = name.partition("=")
    if not sep or kind not in REGISTRIES:
        raise SystemExit(f"unknown variant {name!r}: one of {list(VARIANTS)}, or "
                         f"loss=NAME / reward=NAME")
    if value not in REGISTRIES[kind]:
        raise SystemExit(f"variant {name!r}: no {kind} {value!r} is registered; registered: "
                         f"{sorted(REGISTRIES[kind])}")
    return {kind: value}


def describe(name: str) -> str:
    """One line saying what variant ``name`` changes."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    ((kind, value),) = variant_change(name).items()
    return f"{kind} {value!r} instead of the full method's"


def variant_config(source: Path, out: Path, name: str, cfg: QuickstartConfig, seed: int,
                   device: Optional[str], steps: Optional[int], llm_only: bool) -> Dict[str, Any]:
    """The quickstart's training config with the variant's one change."""
    config = train_config(source, cfg, seed, device)
    config["output_dir"] = str(out / name / "train")
    config["resume"] = True
    config["plot"] = False
    if steps is not None:
        config["max_steps"] = steps
    for task, spec in config["tasks"].items():
        if llm_only:
            llm_file = source / "labels" / f"{task}.llm.jsonl"
            if not llm_file.is_file():
                raise SystemExit(f"--llm-only: {llm_file} not found (no LLM labels for {task})")
            spec["file"] = str(llm_file)
        if not Path(spec["file"]).is_file():
            raise SystemExit(f"{spec['file']} not found: run the quickstart first "
                             f"(llm-embedder quickstart --out {source})")
    config.update(variant_change(name))
    return config


def parse_budgets(items: List[str]) -> Dict[str, int]:
    """``["qa=150000", "chat=2e5"]`` -> ``{"qa": 150000, "chat": 200000}``."""
    budgets: Dict[str, int] = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            tokens = int(float(value))
        except ValueError:
            tokens = -1
        if not sep or not task or tokens < 0:
            raise SystemExit(f"--label-budget wants TASK=TOKENS (e.g. chat=200000), got {item!r}")
        budgets[task] = tokens
    return budgets


def labelled_source(source: Path, out: Path, cfg: QuickstartConfig, seed: int,
                    budgets: Mapping[str, int], device: Optional[str]) -> Path:
    """``OUT/source``: the quickstart's data with ``budgets`` LLM tokens per task, labelled."""
    unknown = sorted(set(budgets) - set(cfg.tasks))
    if unknown:
        raise SystemExit(f"--label-budget: unknown task(s) {unknown}; tasks: {list(cfg.tasks)}")
    bigger = dataclasses.replace(cfg, label_token_budget={**cfg.label_token_budget, **budgets})
    target = out / "source"
    labels = target / "labels"
    if not (labels / "summary.json").is_file():
        # Same seed, same stratified order: the quickstart's LLM-labelled queries are a prefix
        # of the larger set, so its labels are reused (the labeller skips ids already there).
        labels.mkdir(parents=True, exist_ok=True)
        for task in cfg.tasks:
            done, mine = source / "labels" / f"{task}.llm.jsonl", labels / f"{task}.llm.jsonl"
            if done.is_file() and not mine.exists():
                shutil.copyfile(done, mine)
    label_training_data(target, bigger, seed=seed, device=device)
    return target


def table(rows: Mapping[str, Mapping[str, Any]], tasks: List[str], markdown: bool) -> str:
    header = ["variant", *[f"{t} ({primary_metric(t)})" for t in tasks], "average",
              "train s"]
    lines = []
    for name, row in rows.items():
        system = row.get("system", "trained")
        cells = [name]
        for t in tasks:
            value = row["results"].get(t, {}).get(system, {}).get(primary_metric(t))
            cells.append("-" if value is None else f"{value:.3f}")
        avg = row["results"].get("average", {}).get(system, {}).get("primary")
        cells.append("-" if avg is None else f"{avg:.3f}")
        cells.append(f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="quickstart_out",
                        help="a finished quickstart folder (its labels/ and data/ are reused)")
    parser.add_argument("--out", default="ablation_out")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help=f"among {list(VARIANTS)}, or loss=NAME / reward=NAME of any "
                             f"registered loss or reward")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant")
    parser.add_argument("--llm-only", action="store_true",
                        help="train on the LLM-labelled queries only")
    parser.add_argument("--no-downstream", action="store_true", help="skip the LLM metrics "
                        "(icl then has no metric)")
    parser.add_argument("--max-llm-queries", type=int, default=None,
                        help="downstream queries per task (default: the quickstart's)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="leave out the BM25 and base-encoder reference rows")
    parser.add_argument("--label-budget", nargs="+", default=None, metavar="TASK=TOKENS",
                        help="first LLM-label a larger set (tokens per task) into OUT/source")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    for name in args.variants:
        variant_change(name)  # an unknown name fails now, not after hours of training

    from llm_embedder.train import train

    source, out = Path(args.source), Path(args.out)
    saved = source / "config.json"
    if not saved.is_file():
        parser.error(f"{saved} not found: run `llm-embedder quickstart --out {source}` first")
    fingerprint = json.loads(saved.read_text())
    cfg = QuickstartConfig.load(fingerprint["config"])
    seed = int(fingerprint["seed"])
    if args.label_budget:
        source = labelled_source(source, out, cfg, seed, parse_budgets(args.label_budget),
                                 args.device)
        fingerprint = json.loads((source / "config.json").read_text())
        cfg = QuickstartConfig.load(fingerprint["config"])
    plan = json.loads((source / "data" / "plan.json").read_text())
    tasks = [t for t in cfg.tasks if t in plan]
    if args.no_downstream:  # a task judged by the LLM (icl) has no metric without it
        tasks = [t for t in tasks if primary_metric(t) in RETRIEVAL_METRICS]
    data = {t: {"corpus": plan[t]["corpus"], "test": plan[t]["test"]} for t in tasks}
    budget: Any = args.max_llm_queries if args.max_llm_queries is not None \
        else cfg.max_llm_queries
    eval_config = EvalConfig.load({"tasks": tasks, "data": data,
                                   "downstream": not args.no_downstream,
                                   "max_llm_queries": budget, "device": args.device,
                                   "seed": seed})

    llm = None
    if not args.no_downstream:
        from llm_embedder.llm import FrozenLLM

        llm = FrozenLLM.load(None, device=args.device)

    rows: Dict[str, Dict[str, Any]] = {}
    if not args.no_baselines:
        done = out / "baselines.json"
        if done.is_file():
            baseline = json.loads(done.read_text())
        else:
            print("== baselines: BM25 and the base encoder with and without instructions")
            baseline = evaluate(None, config=eval_config, llm=llm,
                                systems=["bm25", "base", "base_noinstr"])
            atomic_write_json(done, baseline)
        for system, label in (("bm25", "(BM25)"), ("base", "(base, instr.)"),
                              ("base_noinstr", "(base, no instr.)")):
            rows[label] = {"system": system, "results": baseline}
    for name in args.variants:
        done = out / name / "results.json"
        if done.is_file():
            rows[name] = json.loads(done.read_text())
            print(f"== {name}: done earlier, skipped")
            continue
        print(f"== {name}: {describe(name)}", flush=True)
        config = variant_config(source, out, name, cfg, seed, args.device, args.steps,
                                args.llm_only)
        start = time.perf_counter()
        model_dir = train(TrainConfig.load(config))
        train_seconds = time.perf_counter() - start
        results = evaluate(model_dir, config=eval_config, llm=llm, systems=["trained"])
        rows[name] = {"variant": name, "description": describe(name), "config": config,
                      "train_seconds": train_seconds, "results": results}
        atomic_write_json(done, rows[name])
    print()
    print(table(rows, tasks, markdown=False))
    counts = ", ".join(f"{t} {plan[t]['llm_queries']} LLM-labelled"
                       + ("" if args.llm_only else f" + {plan[t]['label_only_queries']} label-only")
                       for t in cfg.tasks if t in plan)
    steps = args.steps if args.steps is not None else cfg.max_steps
    md = ["# Ablations", "",
          f"Training queries: {counts}"
          f" (from `{source}`); {steps} steps of batch {cfg.batch_size}; seed {seed}; primary "
          "metric of each task for the trained model.",
          "", table(rows, tasks, markdown=True), "",
          *[f"- **{n}**: {describe(n)}" for n in rows if "variant" in rows[n]], ""]
    atomic_write_text(out / "ablation.md", "\n".join(md))
    atomic_write_json(out / "ablation.json", rows)
    print(f"\nwritten {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
