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
| label_only | none: 1/0 from human positives for every query | as full | homogeneous | self-paced |
| anchor | likelihood; a human positive raised above every other candidate | as full | homogeneous | self-paced |
| agree | likelihood; only queries whose top-rewarded candidate is a human positive | as full | homogeneous | self-paced |
| anchor_PART | anchor with one more part changed: ``rank`` (rank-aware reward), ``kl``, ``contrastive``, ``mixed``, ``fixed_lr`` | | | |

``label_only`` takes the LLM's feedback away: the LLM-labelled queries are labelled from their
human positives instead (as the label-only rest already is); a query without positives (every
icl query) then has no training signal, so icl does not train in that variant, and its share
of the steps goes to the other tasks. ``label_only_keep`` is label-only where a query has
human positives and keeps icl's LLM labels (likelihood reward): every task trains for the
steps it gets in the LLM variants.

The labelled files come from a quickstart run (``--from quickstart_out``: its ``labels/``), so
run the quickstart first; ``--llm-only`` trains on the LLM-labelled queries alone (the only ones
where likelihood and rank-aware rewards differ: label-only queries carry 1/0 rewards either
way). Every variant trains with the quickstart's sizes and seed unless ``--steps`` says
otherwise, is evaluated with the same test queries (downstream LLM metrics included unless
``--no-downstream``), and one table is printed and written to ``OUT/ablation.md`` (+ JSON).
Resumable: finished runs are skipped. ``--report`` trains and evaluates nothing: it writes the
table and verdicts of the runs finished so far (while an ablation runs elsewhere, say).

``--seeds 0 1 2`` trains every variant once per seed (the training seed: batch order, groups,
dropout; the data and test queries stay the quickstart's) and the table shows mean ± sd over
the seeds, with the retrieval metrics, the downstream LLM metrics (qa answer log-likelihood,
chat answer perplexity, icl accuracy) and, with ``--beir DIR``, nDCG@10 on a BEIR folder
(e.g. ../shared/data/qa/scifact, ``--beir-split test``), each trained model with qa's
instructions and without, as the base (runs finished without ``--beir``, or on another folder
or split, are measured then, from their saved model; nothing is trained again). It ends with
the verdicts the method is judged by: rank-aware vs likelihood reward, graded vs
contrastive-only, and the best variant by mean average.

The quickstart trains from the project's LLM labels of every bundled training query; with
``--relabel`` it LLM-labels only a few queries per task on a CPU, too few for the reward
variants to differ. For such a run ``--label-budget qa=150000 chat=200000 ...`` (LLM tokens
per task) first labels a larger set into ``OUT/source`` with the quickstart's query choice (same seed, so the
quickstart's LLM labels from ``--from`` are copied in and not paid for twice); the variants then
train on that.

``anchor`` and ``agree`` put the LLM's reward and the annotation together
(``TrainConfig.human_positives``), on the likelihood reward, the best LLM-feedback variant.

Any registered loss or reward is a variant too: ``--variants loss=NAME reward=NAME`` (names
in ``llm_embedder.losses.LOSSES`` / ``llm_embedder.label.REWARDS``, e.g. one added with
``register_loss`` / ``register_reward``) trains the full method with that one thing changed;
``human_positives=anchor|agree`` too, and ``KIND=NAME,KIND=NAME`` changes several.

``--no-instructions qa`` trains and evaluates the named tasks with empty instructions on both
sides, every run and reference row of ``OUT`` (the base encoder scores higher on qa without
its instruction). ``OUT`` records the setting and refuses runs made with another one.

Usage:
    python scripts/ablation.py --from quickstart_out --out ablation_out [--steps 60]
        [--variants full likelihood kl loss=NAME reward=NAME ...] [--llm-only]
        [--seeds 0 1 2] [--beir DIR [--beir-split test]]
        [--no-downstream] [--max-llm-queries N|TASK=N ...] [--device cpu]
        [--label-budget TASK=TOKENS ...] [--no-instructions TASK ...] [--report]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from llm_embedder.evaluate import RETRIEVAL_METRICS, EvalConfig, evaluate, primary_metric
from llm_embedder.io import atomic_write_json, atomic_write_text
from llm_embedder.label import REWARDS, label
from llm_embedder.losses import LOSSES
from llm_embedder.quickstart import (QuickstartConfig, human_label_config, label_training_data,
                                     train_config)
from llm_embedder.train import HUMAN_POSITIVES, TrainConfig

VARIANTS: Dict[str, Dict[str, Any]] = {
    # The method as designed, pinned: the quickstart's own defaults follow the ablation's
    # evidence and may differ from it.
    "full": {"reward": "rank", "human_positives": "reward", "batching": "homogeneous",
             "self_paced": True},
    "likelihood": {"reward": "likelihood"},
    "kl": {"loss": "kl"},
    "contrastive": {"loss": "contrastive"},
    "mixed": {"batching": "mixed"},
    "fixed_lr": {"self_paced": False},
    # Not a §7 variant: the rank-aware reward's within-query spread is ~1/5 of the likelihood
    # reward's on the bundled LLM labels (std 0.11-0.29 vs 0.5-1.7, every task), so at the
    # shared T = 0.1 its teacher is far flatter. This gives it a teacher of similar sharpness.
    "rank_sharp": {"teacher_temperature": 0.02},
    # Not §7 variants: the LLM's reward and the annotation together, on the likelihood reward
    # (the best LLM-feedback variant, the quickstart's default) — two changes from full.
    "anchor": {"reward": "likelihood", "human_positives": "anchor"},
    "agree": {"reward": "likelihood", "human_positives": "agree"},
}
# The quickstart's default (anchor) with one more part of the method changed: whether the
# parts the §7 variants test still matter once the default follows the evidence.
VARIANTS.update({f"anchor_{part}": {**VARIANTS["anchor"], **VARIANTS[part]}
                 for part in ("kl", "contrastive", "mixed", "fixed_lr")})
# The rank-aware reward in the default's place: anchor is "likelihood" plus one change.
VARIANTS["anchor_rank"] = {**VARIANTS["anchor"], "reward": "rank"}
#: Trains on human positives only (1/0 rewards), the LLM-labelled queries included: not a
#: setting of the trainer but of its data, so it is not in VARIANTS.
LABEL_ONLY = "label_only"
#: As LABEL_ONLY where a query has human positives; a task without any (icl) keeps its LLM
#: labels (likelihood reward), so every task keeps the step share it has in the LLM variants
#: (LABEL_ONLY drops icl, and its 13 of 44 steps go to the other tasks).
LABEL_ONLY_KEEP = "label_only_keep"
HUMAN_VARIANTS = (LABEL_ONLY, LABEL_ONLY_KEEP)
DESCRIPTIONS = {
    "full": "rank-aware reward, graded/KL, homogeneous, self-paced",
    "likelihood": "likelihood reward instead of rank-aware",
    "kl": "KL distillation for every task instead of graded",
    "contrastive": "contrastive (top-rewarded candidate as positive) instead of graded",
    "mixed": "mixed-task batches instead of homogeneous",
    "fixed_lr": "fixed lr instead of self-paced",
    "rank_sharp": "rank-aware reward with teacher temperature 0.02 instead of 0.1",
    "anchor": "likelihood reward, human positives ranked first, the LLM grading the rest",
    "agree": "likelihood reward, only queries whose top-rewarded candidate is a human positive",
    "anchor_kl": "anchor, with KL distillation for every task instead of graded",
    "anchor_contrastive": "anchor, with contrastive (top-rewarded as positive) instead of graded",
    "anchor_rank": "anchor, with the rank-aware reward instead of likelihood",
    "anchor_mixed": "anchor, with mixed-task batches instead of homogeneous",
    "anchor_fixed_lr": "anchor, with a fixed lr instead of self-paced",
    LABEL_ONLY: "1/0 rewards from human positives for every query instead of LLM rewards",
    LABEL_ONLY_KEEP: "1/0 rewards from human positives; icl (none) keeps its LLM labels",
}
#: Downstream LLM metrics shown beside the primary ones: (task, metric, column title).
DOWNSTREAM_COLUMNS = (("qa", "answer_ll", "qa answer ll"), ("chat", "answer_ppl", "chat ppl"))


#: ``--variants KIND=NAME``: which registry holds NAME for each kind.
REGISTRIES: Dict[str, Mapping[str, Any]] = {
    "loss": LOSSES, "reward": REWARDS,
    "human_positives": {name: name for name in HUMAN_POSITIVES}}


def variant_change(name: str) -> Dict[str, Any]:
    """The settings variant ``name`` changes: a named variant, or ``KIND=NAME`` for any
    registered loss or reward (or ``human_positives`` policy), several joined by commas.

    Example:
        >>> variant_change("loss=kl")
        {'loss': 'kl'}
        >>> variant_change("reward=likelihood,human_positives=anchor")
        {'reward': 'likelihood', 'human_positives': 'anchor'}
    """
    if name in VARIANTS:
        return dict(VARIANTS[name])
    if name == LABEL_ONLY:
        return {}  # the trainer's settings are the full method's; its data differ
    if name == LABEL_ONLY_KEEP:
        return {"reward": "likelihood"}  # icl's kept LLM labels; 1/0 labels read the same
    change: Dict[str, Any] = {}
    for part in name.split(","):
        kind, sep, value = part.partition("=")
        if not sep or kind not in REGISTRIES:
            raise SystemExit(f"unknown variant {name!r}: one of {list(VARIANTS)}, or "
                             f"KIND=NAME[,KIND=NAME] with KIND one of {list(REGISTRIES)}")
        if value not in REGISTRIES[kind]:
            raise SystemExit(f"variant {name!r}: no {kind} {value!r} is registered; "
                             f"registered: {sorted(REGISTRIES[kind])}")
        if kind in change:
            raise SystemExit(f"variant {name!r} sets {kind} twice")
        change[kind] = value
    return change


def describe(name: str) -> str:
    """One line saying what variant ``name`` changes."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    changes = ", ".join(f"{kind} {value!r}" for kind, value in variant_change(name).items())
    return f"{changes} instead of the full method's"


def variant_config(source: Path, run_dir: Path, name: str, cfg: QuickstartConfig, seed: int,
                   device: Optional[str], steps: Optional[int], llm_only: bool,
                   human: Optional[Path] = None) -> Dict[str, Any]:
    """The quickstart's training config with the variant's one change, trained with ``seed``
    into ``run_dir/train``. ``human``: the folder of :func:`human_labels` (``label_only``)."""
    config = train_config(source, cfg, seed, device)
    config["output_dir"] = str(run_dir / "train")
    config["resume"] = True
    config["plot"] = False
    if steps is not None:
        config["max_steps"] = steps
    for task, spec in list(config["tasks"].items()):
        if llm_only:
            llm_file = source / "labels" / f"{task}.llm.jsonl"
            if not llm_file.is_file():
                raise SystemExit(f"--llm-only: {llm_file} not found (no LLM labels for {task})")
            spec["file"] = str(llm_file)
        if name in HUMAN_VARIANTS:
            if human is None:
                raise ValueError(f"variant {name!r} needs the human_labels folder")
            human_file = human / f"{task}.jsonl"
            if human_file.is_file():
                spec["file"] = str(human_file)
            elif name == LABEL_ONLY:  # no query with a positive: nothing to train on
                del config["tasks"][task]
                continue
        if not Path(spec["file"]).is_file():
            raise SystemExit(f"{spec['file']} not found: run the quickstart first "
                             f"(llm-embedder quickstart --out {source})")
    if not config["tasks"]:
        raise SystemExit(f"variant {name!r}: no task has training queries")
    config.update(VARIANTS["full"])  # each variant changes one thing of the method as designed
    config.update(variant_change(name))
    return config


#: ``OUT``'s record of ``--no-instructions``: runs made with one setting are never tabled
#: beside runs made with another.
INSTRUCTIONS_RECORD = "no_instructions.json"


def use_no_instructions(out: Path, tasks: Sequence[str], record: bool = True) -> List[str]:
    """Empty both instructions of ``tasks`` in this process's task registry (training, the
    saved model and evaluation all read them there), once ``out``'s earlier runs are known to
    have used the same setting; ``record``: write the setting into ``out`` if it is new.
    Returns the tasks, sorted. A folder of runs without a record used every instruction.

    Example:
        >>> use_no_instructions(Path("ablation_qa_plain"), ["qa"])
        ['qa']
    """
    from llm_embedder.tasks import get_task, register_task

    wanted = sorted(set(tasks))
    for task in wanted:
        try:
            get_task(task)
        except ValueError as error:  # before anything is written or trained
            raise SystemExit(f"--no-instructions: {error}") from None
    path = out / INSTRUCTIONS_RECORD
    if path.is_file():
        made = json.loads(path.read_text())["tasks"]
    elif (out / "baselines.json").is_file() or any(out.glob("*/seed*/results.json")):
        made = []
    else:
        made = None
    if made is not None and made != wanted:
        before, now = " ".join(made) or "(none)", " ".join(wanted) or "(none)"
        raise SystemExit(f"{out} holds runs made with --no-instructions {before}; this run "
                         f"asks for {now}: use another --out")
    if record and not path.is_file():
        atomic_write_json(path, {"tasks": wanted})
    for task in wanted:
        register_task(dataclasses.replace(get_task(task), query_instruction="",
                                          key_instruction=""), overwrite=True)
    return wanted


def human_labels(source: Path, out: Path, cfg: QuickstartConfig, seed: int, llm_only: bool,
                 device: Optional[str]) -> Path:
    """``OUT/human``: per task, the training queries labelled from their human positives alone
    (the LLM-labelled ones too; with ``llm_only`` only those), with the quickstart's negatives
    and seed. A task none of whose queries has a positive gets no file."""
    folder = out / "human"
    plan = json.loads((source / "data" / "plan.json").read_text())
    by_hand = human_label_config(cfg, seed, device)  # as the quickstart's label-only queries
    for task in cfg.tasks:
        merged = folder / f"{task}.jsonl"
        if merged.is_file() or (folder / f"{task}.none").is_file():
            continue
        parts = []
        queries = source / "data" / task / "train.llm.jsonl"
        if queries.is_file() and plan[task]["llm_queries"]:
            relabelled = folder / f"{task}.llm_queries.jsonl"
            label(task, queries, plan[task]["corpus"], relabelled, config=by_hand)
            parts.append(relabelled)
        rest = source / "labels" / f"{task}.labels.jsonl"
        if not llm_only and rest.is_file():
            parts.append(rest)
        text = "".join(p.read_text(encoding="utf-8") for p in parts)
        if text.strip():
            atomic_write_text(merged, text)
        else:  # remembered, so a resumed run does not label it again
            atomic_write_text(folder / f"{task}.none", "no training query has a positive\n")
    return folder


def _count(text: str) -> int:
    """``"2e5"`` -> 200000; -1 for what is not a count (``inf`` and ``nan`` included)."""
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return -1


def parse_budgets(items: List[str],
                  usage: str = "--label-budget wants TASK=TOKENS (e.g. chat=200000)"
                  ) -> Dict[str, int]:
    """``["qa=150000", "chat=2e5"]`` -> ``{"qa": 150000, "chat": 200000}``; ``usage`` starts
    the error for a malformed item."""
    budgets: Dict[str, int] = {}
    for item in items:
        task, sep, value = item.partition("=")
        tokens = _count(value)
        if not sep or not task or tokens < 0:
            raise SystemExit(f"{usage}, got {item!r}")
        budgets[task] = tokens
    return budgets


MAX_LLM_QUERIES_USAGE = "--max-llm-queries wants a count or TASK=N (e.g. 200, icl=200)"


def llm_query_budget(items: Optional[List[str]], default: Any, tasks: Sequence[str]) -> Any:
    """``--max-llm-queries``: one number for every task (``200``), or per-task overrides of
    the quickstart's budget ``default`` (``icl=200``: icl's accuracy on 200 test queries, the
    other ``tasks`` as the quickstart has them)."""
    if not items:
        return default
    if len(items) == 1 and "=" not in items[0]:
        count = _count(items[0])
        if count < 0:
            raise SystemExit(f"{MAX_LLM_QUERIES_USAGE}, got {items[0]!r}")
        return count
    # A task missing from a mapping means "every query", so a single-number default is
    # spelled out per task before the overrides go in.
    merged = dict(default) if isinstance(default, Mapping) else {t: default for t in tasks}
    merged.update(parse_budgets(items, MAX_LLM_QUERIES_USAGE))
    return merged


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


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Example:
        >>> mean_sd([0.5, 0.7])  # (0.6, 0.1414...)
    """
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def metric_values(row: Mapping[str, Any], task: str, metric: str) -> List[float]:
    """One value per run of ``row`` (its seeds), runs without the metric left out."""
    system = row.get("system", "trained")
    values = [run.get(task, {}).get(system, {}).get(metric) for run in row["runs"]]
    return [float(v) for v in values if v is not None]


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    digits = 1 if abs(mean) >= 10 else 3
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")


def table(rows: Mapping[str, Mapping[str, Any]], tasks: List[str], markdown: bool) -> str:
    """One line per variant (or baseline): mean ± sd over its runs of each task's primary
    metric, their average, the downstream LLM metrics, the BEIR nDCG@10 and training time."""
    extra = [(t, m, title) for t, m, title in DOWNSTREAM_COLUMNS  # those measured
             if t in tasks and any(metric_values(row, t, m) for row in rows.values())]
    with_beir = any(values for row in rows.values() for values in row.get("beir", {}).values())
    header = ["variant", *[f"{t} ({primary_metric(t)})" for t in tasks], "average",
              *[title for _, _, title in extra],
              *([f"BEIR ndcg@10 ({title})" for title in BEIR_TITLES.values()] if with_beir
                else []),
              "runs", "train s"]
    lines = []
    for name, row in rows.items():
        cells = [name, *[_cell(metric_values(row, t, primary_metric(t))) for t in tasks],
                 _cell(metric_values(row, "average", "primary")),
                 *[_cell(metric_values(row, t, m)) for t, m, _ in extra]]
        if with_beir:
            cells += [_cell(row.get("beir", {}).get(system, [])) for system in BEIR_TITLES]
        cells.append(str(len(row["runs"])))
        seconds = row.get("train_seconds", [])
        cells.append(f"{sum(seconds) / len(seconds):.0f}" if seconds else "-")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


#: The comparisons the method is judged by: (claim, variant that should win, the other).
CLAIMS = (("rank-aware >= likelihood reward", "full", "likelihood"),
          ("graded >= contrastive-only", "full", "contrastive"),
          ("graded (KL for chat) >= KL for every task", "full", "kl"),
          ("homogeneous >= mixed batches", "full", "mixed"),
          ("self-paced >= fixed lr", "full", "fixed_lr"),
          ("LLM rewards >= human positives alone", "full", LABEL_ONLY),
          ("LLM rewards anchored on human positives >= human positives alone", "anchor",
           LABEL_ONLY),
          ("anchored >= likelihood reward alone", "anchor", "likelihood"),
          ("agreeing queries >= human positives alone", "agree", LABEL_ONLY),
          ("anchored >= human positives, same step shares", "anchor", LABEL_ONLY_KEEP),
          ("anchored: rank-aware >= likelihood reward", "anchor_rank", "anchor"),
          ("anchored: graded >= contrastive-only", "anchor", "anchor_contrastive"),
          ("anchored: graded (KL for chat) >= KL for every task", "anchor", "anchor_kl"),
          ("anchored: homogeneous >= mixed batches", "anchor", "anchor_mixed"),
          ("anchored: self-paced >= fixed lr", "anchor", "anchor_fixed_lr"))


def verdicts(rows: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Each claim of :data:`CLAIMS` whose two variants ran, judged on the average over the
    seeds both ran (paired: the same seed gives both the same initialisation and batch order),
    with the mean difference in units of its standard error; then the best variant."""
    lines = []
    for claim, winner, other in CLAIMS:
        if winner not in rows or other not in rows:
            continue
        a, b = _by_seed(rows[winner]), _by_seed(rows[other])
        shared = [seed for seed in a if seed in b]
        if not shared:
            continue
        ma = sum(a[s] for s in shared) / len(shared)
        mb = sum(b[s] for s in shared) / len(shared)
        differences = [a[s] - b[s] for s in shared]
        _, sd = mean_sd(differences)
        se = sd / math.sqrt(len(shared))
        noise = f", {abs(ma - mb) / se:.1f} standard errors" if se > 0 else ""
        lines.append(f"{claim}: {'met' if ma >= mb else 'NOT met'} — {winner} {ma:.3f} vs "
                     f"{other} {mb:.3f} (mean average over seeds {shared}, paired{noise})")
    variants = {n: metric_values(r, "average", "primary") for n, r in rows.items()
                if "variant" in r}
    variants = {n: v for n, v in variants.items() if v}
    if variants:
        best = max(variants, key=lambda n: mean_sd(variants[n])[0])
        lines.append(f"best variant by mean average: {best} ({mean_sd(variants[best])[0]:.3f} "
                     f"over {len(variants[best])} seeds)")
    return lines


def _by_seed(row: Mapping[str, Any]) -> Dict[int, float]:
    """``{seed: average primary metric}`` of a variant's runs (position when seeds are
    unknown)."""
    seeds = row.get("seeds") or range(len(row["runs"]))
    return {seed: float(run["average"]["trained"]["primary"])
            for seed, run in zip(seeds, row["runs"])
            if run.get("average", {}).get("trained", {}).get("primary") is not None}


#: The trained model is measured on BEIR both ways, as the base is: an instruction that helps
#: in-domain can cost out of domain, and a model must beat the best base of the two.
BEIR_TITLES = {"trained": "instr.", "trained_noinstr": "no instr."}
#: The column each reference system fills (BM25 reads no instructions: both).
BEIR_REFERENCE_COLUMNS = {"bm25": ("trained", "trained_noinstr"), "base": ("trained",),
                          "base_noinstr": ("trained_noinstr",)}


def beir_key(folder: Path, split: str) -> str:
    """What a stored BEIR result was measured on: a run or cache measured on another folder
    or split is measured again, never shown as this one."""
    return f"{Path(folder).resolve()}::{split}"


def _beir_ndcg(folder: Path, split: str, model: Any, systems: List[str], device: Optional[str]
               ) -> Dict[str, float]:
    from llm_embedder.beir import evaluate_beir

    found = evaluate_beir(folder, split=split, model=model, systems=systems, task="qa",
                          device=device, verbose=False)
    return {system: float(v["ndcg@10"]) for system, v in found["systems"].items()}


def run_beir(run: MutableMapping[str, Any], done: Path, key: Optional[str],
             folder: Optional[Path], split: str, device: Optional[str], measure: bool
             ) -> Dict[str, float]:
    """The BEIR nDCG@10 of a finished run on ``key`` (``{}`` without ``--beir``), measured
    now, and saved into its ``results.json``, when an earlier ablation ran without ``--beir``
    or on another split (``measure``: False for ``--report``, which measures nothing)."""
    if key is None:
        return {}
    stored = run.setdefault("beir", {})
    if key not in stored and measure:
        model_dir = Path(run["config"]["output_dir"]) / "model"
        if not model_dir.is_dir():
            print(f"   its model {model_dir} is gone: no BEIR nDCG@10 for it")
            return {}
        print(f"   BEIR nDCG@10 on {folder} ({split}) of {model_dir}", flush=True)
        stored[key] = _beir_ndcg(folder, split, model_dir, list(BEIR_TITLES), device)
        atomic_write_json(done, run)
    return dict(stored.get(key, {}))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="quickstart_out",
                        help="a finished quickstart folder (its labels/ and data/ are reused)")
    parser.add_argument("--out", default="ablation_out")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, *HUMAN_VARIANTS],
                        help=f"among {[*VARIANTS, *HUMAN_VARIANTS]}, or loss=NAME / reward=NAME of "
                             f"any registered loss or reward")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="training seeds, one run each (default: the quickstart's seed)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant")
    parser.add_argument("--llm-only", action="store_true",
                        help="train on the LLM-labelled queries only")
    parser.add_argument("--no-downstream", action="store_true", help="skip the LLM metrics "
                        "(icl then has no metric)")
    parser.add_argument("--max-llm-queries", nargs="+", default=None, metavar="N|TASK=N",
                        help="downstream queries per task: one count for all, or per-task "
                             "overrides such as icl=200 (default: the quickstart's)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="leave out the BM25 and base-encoder reference rows")
    parser.add_argument("--beir", type=Path, default=None, metavar="DIR",
                        help="also nDCG@10 on this BEIR folder (qa instructions)")
    parser.add_argument("--beir-split", default="test")
    parser.add_argument("--label-budget", nargs="+", default=None, metavar="TASK=TOKENS",
                        help="first LLM-label a larger set (tokens per task) into OUT/source")
    parser.add_argument("--no-instructions", nargs="+", default=[], metavar="TASK",
                        help="train and evaluate these tasks with empty instructions on both "
                             "sides (every run and reference row; OUT remembers it)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--report", action="store_true",
                        help="train and evaluate nothing: the table of the runs finished so far")
    args = parser.parse_args(argv)
    for name in args.variants:
        variant_change(name)  # an unknown name fails now, not after hours of training
    if args.beir is not None and not args.beir.is_dir():
        parser.error(f"--beir {args.beir}: not a folder")

    from llm_embedder.train import train

    source, out = Path(args.source), Path(args.out)
    saved = source / "config.json"
    if not saved.is_file():
        parser.error(f"{saved} not found: run `llm-embedder quickstart --out {source}` first")
    plain = use_no_instructions(out, args.no_instructions, record=not args.report)
    fingerprint = json.loads(saved.read_text())
    cfg = QuickstartConfig.load(fingerprint["config"])
    seed = int(fingerprint["seed"])
    seeds = args.seeds if args.seeds is not None else [seed]
    if args.label_budget and args.report:
        source = out / "source"  # labelled by an earlier run; nothing is labelled now
        if not (source / "config.json").is_file():
            parser.error(f"--report --label-budget: {source} is not labelled yet")
        cfg = QuickstartConfig.load(json.loads((source / "config.json").read_text())["config"])
    elif args.label_budget:
        source = labelled_source(source, out, cfg, seed, parse_budgets(args.label_budget),
                                 args.device)
        fingerprint = json.loads((source / "config.json").read_text())
        cfg = QuickstartConfig.load(fingerprint["config"])
    plan = json.loads((source / "data" / "plan.json").read_text())
    tasks = [t for t in cfg.tasks if t in plan]
    if args.no_downstream:  # a task judged by the LLM (icl) has no metric without it
        tasks = [t for t in tasks if primary_metric(t) in RETRIEVAL_METRICS]
    data = {t: {"corpus": plan[t]["corpus"], "test": plan[t]["test"]} for t in tasks}
    budget: Any = llm_query_budget(args.max_llm_queries, cfg.max_llm_queries, tasks)
    eval_config = EvalConfig.load({"tasks": tasks, "data": data,
                                   "downstream": not args.no_downstream,
                                   "max_llm_queries": budget,
                                   "exact_match_answers": cfg.exact_match_answers,
                                   "device": args.device, "seed": seed})
    human = (human_labels(source, out, cfg, seed, args.llm_only, args.device)
             if set(HUMAN_VARIANTS) & set(args.variants) and not args.report else None)

    llm = None
    if not args.no_downstream and not args.report:
        from llm_embedder.llm import FrozenLLM

        llm = FrozenLLM.load(None, device=args.device)

    beir_at = beir_key(args.beir, args.beir_split) if args.beir is not None else None
    rows: Dict[str, Dict[str, Any]] = {}
    if not args.no_baselines:
        done = out / "baselines.json"
        if done.is_file():
            baseline = json.loads(done.read_text())
        elif args.report:
            baseline = None
        else:
            print("== baselines: BM25 and the base encoder with and without instructions")
            baseline = evaluate(None, config=eval_config, llm=llm,
                                systems=["bm25", "base", "base_noinstr"])
            atomic_write_json(done, baseline)
        beir: Dict[str, float] = {}
        if beir_at is not None:
            done = out / "baselines_beir.json"
            # keyed by folder and split; a file of an older layout (one flat mapping, split
            # unknown) is measured again
            cached = json.loads(done.read_text()) if done.is_file() else {}
            cached = {k: v for k, v in cached.items() if isinstance(v, dict)}
            if beir_at not in cached and not args.report:
                cached[beir_at] = _beir_ndcg(args.beir, args.beir_split, None,
                                             list(BEIR_REFERENCE_COLUMNS), args.device)
                atomic_write_json(done, cached)
            beir = cached.get(beir_at, {})
        references = (("bm25", "(BM25)"), ("base", "(base, instr.)"),
                      ("base_noinstr", "(base, no instr.)")) if baseline is not None else ()
        for system, title in references:  # none made up when --report finds none measured
            rows[title] = {"system": system, "runs": [baseline],
                           "beir": {column: [beir[system]] if system in beir else []
                                    for column in BEIR_REFERENCE_COLUMNS[system]}}
    for name in args.variants:
        rows[name] = {"variant": name, "description": describe(name), "runs": [], "seeds": [],
                      "train_seconds": [], "beir": {system: [] for system in BEIR_TITLES}}
    # Seed by seed, every variant in each: an interrupted ablation has compared the variants
    # on the same seeds so far, not finished one variant and never started another.
    for run_seed in seeds:
        for name in args.variants:
            row = rows[name]
            run_dir = out / name / f"seed{run_seed}"
            done = run_dir / "results.json"
            if done.is_file():
                run = json.loads(done.read_text())
                print(f"== {name}, seed {run_seed}: done earlier, skipped")
            elif args.report:
                print(f"== {name}, seed {run_seed}: not run yet")
                continue
            else:
                print(f"== {name}, seed {run_seed}: {describe(name)}", flush=True)
                config = variant_config(source, run_dir, name, cfg, run_seed, args.device,
                                        args.steps, args.llm_only, human)
                start = time.perf_counter()
                model_dir = train(TrainConfig.load(config))
                train_seconds = time.perf_counter() - start
                results = evaluate(model_dir, config=eval_config, llm=llm, systems=["trained"])
                run = {"variant": name, "seed": run_seed, "config": config,
                       "train_seconds": train_seconds, "results": results, "beir": {}}
                atomic_write_json(done, run)
                # Done: its resume checkpoint (optimizer state, ~250 MB) is not needed again;
                # the trained model stays in train/model.
                shutil.rmtree(Path(config["output_dir"]) / "checkpoint", ignore_errors=True)
            ndcg = run_beir(run, done, beir_at, args.beir, args.beir_split, args.device,
                            measure=not args.report)
            row["runs"].append(run["results"])
            row["seeds"].append(run_seed)
            row["train_seconds"].append(run["train_seconds"])
            for system, value in ndcg.items():
                row["beir"][system].append(value)
    print()
    print(table(rows, tasks, markdown=False))
    judged = verdicts(rows)
    print("\n" + "\n".join(judged))
    counts = ", ".join(f"{t} {plan[t]['llm_queries']} LLM-labelled"
                       + ("" if args.llm_only else f" + {plan[t]['label_only_queries']} label-only")
                       for t in cfg.tasks if t in plan)
    steps = args.steps if args.steps is not None else cfg.max_steps
    beir_text = (f"; BEIR nDCG@10 on `{args.beir.name}` ({args.beir_split} split)"
                 if args.beir is not None else "")
    plain_text = (f"; {', '.join(plain)} without instructions (train and evaluation)"
                  if plain else "")
    md = ["# Ablations", "",
          f"Training queries: {counts}"
          f" (from `{source}`); {steps} steps of batch {cfg.batch_size}; training seeds "
          f"{seeds} (mean ± sample sd over them); primary metric of each task for the trained "
          f"model, the downstream LLM metrics{beir_text}{plain_text}.",
          "", table(rows, tasks, markdown=True), "",
          *[f"- {line}" for line in judged], "",
          *[f"- **{n}**: {describe(n)}" for n in rows if "variant" in rows[n]], ""]
    atomic_write_text(out / "ablation.md", "\n".join(md))
    atomic_write_json(out / "ablation.json", rows)
    print(f"\nwritten {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
