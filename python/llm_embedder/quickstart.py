"""``llm-embedder quickstart``: the whole method on real data, end to end, on a laptop CPU.

Stages (each writes its outputs atomically and is skipped when they already exist, so a killed
run continues where it stopped):

1. ``prepare`` — pick the training queries from the bundled slices: a subset per task is
   labelled by the frozen LLM within a token budget; the remaining queries that have human
   positives are labelled from those positives alone (as the reference recipe does for tools),
   so training sees enough data. In-context examples have no positives: LLM labels only.
2. ``label`` — LLM likelihood and rank-aware rewards for the first subset; 1/0 rewards from
   the positives for the rest; both merged into one labelled file per task.
3. ``train`` — graded distillation on qa/tool/icl, KL distillation on chat, homogeneous batches,
   self-paced per-task learning rates, from the packaged MiniLM. The model lands in ``DIR/model``.
4. ``evaluate`` — base (with and without instructions) vs trained vs BM25 vs random on the
   held-out test slices, retrieval and downstream metrics (``DIR/results.json``).
5. ``index`` — the trained model indexes the knowledge corpus (``DIR/index``).
6. ``examples`` — one test query per task, its top results and what the LLM makes of them.
7. ``report`` — the table (stdout and ``DIR/results.md``) and a bar chart (``DIR/results.png``).

Example:
    >>> from llm_embedder.quickstart import run_quickstart
    >>> results = run_quickstart("quickstart_out")
    >>> results["tool"]["trained"]["ndcg@5"] > results["tool"]["base"]["ndcg@5"]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np

from .config import Config, ConfigError, check
from .data import (
    BUNDLED_TASK_DIRS,
    Passage,
    Query,
    bundled_labels_file,
    bundled_task_files,
    candidate_pool,
    iter_jsonl,
    load_corpus,
    load_queries,
)
from .evaluate import (
    SYSTEMS,
    EvalConfig,
    evaluate,
    full_table,
    primary_metric,
    primary_table,
    results_markdown,
)
from .io import atomic_directory, atomic_file, atomic_write_json, atomic_write_text
from .memory import peak_rss_mb, release_freed_memory, reset_peak_rss
from .tasks import get_task

if TYPE_CHECKING:  # label imports the LLM stack; loaded only when a stage labels
    from .label import LabelConfig

#: The tasks with bundled data, in the order the report shows them.
TASK_ORDER = tuple(BUNDLED_TASK_DIRS)
#: How the report names each loss.
_LOSS_TEXT = {"graded": "graded distillation", "kl": "KL", "contrastive": "contrastive"}
# Rough characters per SmolLM2 token on these texts (timestamps, code and labels tokenise
# densely); only used to split the LLM budget between queries, deterministically.
CHARS_PER_TOKEN = 3.0


@dataclass
class QuickstartConfig(Config):
    """Sizes of one quickstart run (see :meth:`default`, :meth:`full`, :meth:`tiny`).

    ``label_token_budget``: LLM tokens per task spent on LLM labelling; the number of
    LLM-labelled queries follows from it (estimated from text lengths, so it is deterministic).
    ``max_label_only``: cap on the label-only queries per task (None: all remaining queries
    with positives). ``max_llm_queries``: test queries per task the downstream LLM step sees.
    ``max_test_queries`` / ``max_pool``: shrink the test split and each query's candidate pool
    (smoke tests only; None keeps the real evaluation). ``index_task``: the task whose corpus
    the trained model indexes (``DIR/index``) and whose example query searches that index.
    ``relabel``: label with the frozen LLM here, within ``label_token_budget``, instead of
    training from the project's LLM labels of the bundled queries (``bundled/labels``, made by
    ``scripts/label_bundled.py`` with N=8 samples; used whenever a task has them).

    Example:
        >>> run_quickstart("qs_out", config=QuickstartConfig(max_steps=10, tasks=("qa", "tool")))
    """

    tasks: Tuple[str, ...] = TASK_ORDER
    label_token_budget: Dict[str, int] = field(default_factory=lambda: {
        "qa": 6_000, "tool": 6_000, "chat": 8_000, "icl": 75_000})
    max_llm_label_queries: Optional[int] = None
    max_label_only: Optional[int] = None
    num_samples: int = 4
    num_negatives: int = 7
    max_steps: int = 44
    batch_size: int = 24
    group_size: int = 3
    lr: float = 1e-4
    # tau of s = cos / tau. The reference's 0.01 suits BERT-base retrievers; the packaged MiniLM was
    # trained at scale 20 (tau 0.05), and a 40-step tool run reached R@5 0.34 at 0.05 vs 0.28
    # at 0.01 (0.36 with lr 1e-4).
    score_temperature: float = 0.05
    # Task draws ~ remaining batches^(1/T): 2 lets the small icl set train within a short run.
    task_temperature: float = 2.0
    query_max_length: int = 64
    key_max_length: int = 128
    max_test_queries: Optional[int] = None
    max_pool: Optional[int] = None
    # icl's metric is an accuracy: its standard error is about ±0.05 at 100 queries (±0.08 at
    # 40, ±0.035 at 200). Each query costs ~1,400 LLM tokens (4 demos for each of 5 systems),
    # ~3.6 s on 2 cores: 200 queries took 12 min of a 29-min run, so the default takes 100
    # and --full all of them.
    max_llm_queries: Dict[str, int] = field(default_factory=lambda: {
        "qa": 8, "chat": 24, "icl": 100})
    # Greedy answers for qa's exact match: 0 for every system with a 135M LLM (it rarely
    # reproduces the SQuAD span), and about a minute of a CPU run; --full turns it on.
    exact_match_answers: bool = False
    downstream_systems: Optional[Tuple[str, ...]] = None  # None: every system
    # Texts per encoder pass in the evaluation: on a CPU 32 encodes as fast as 64 and holds
    # ~250 MB less (the tool corpus: peak +523 vs +770 MB over the loaded model).
    eval_batch_size: int = 32
    index_task: str = "qa"
    relabel: bool = False
    # Which of the labels' rewards the training distils (a name in label.REWARDS; both are in
    # every labelled file, so changing it needs no relabelling). The likelihood reward: the
    # best variant of the 3-seed ablation in this setting (README "Ablations": mean average
    # 0.577 vs 0.570 for the rank-aware reward, within the test set's noise).
    reward: str = "likelihood"
    # How the annotated positives enter the rewards (TrainConfig.human_positives): "reward"
    # (the LLM's reward alone), "anchor" (positives first, the LLM grades the rest) or "agree".
    # Anchor: the best LLM-feedback variant of the all-labelled 3-seed ablation (README:
    # mean average 0.568 vs 0.561 for the LLM's reward alone and 0.550 for agree, 2 seeds).
    human_positives: str = "anchor"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "QuickstartConfig":
        """Like :meth:`Config.from_dict`, also reading a saved ``config.json`` of an earlier
        version (``temperature`` is now ``score_temperature``; JSON lists become tuples).

        Example:
            >>> QuickstartConfig.from_dict({"tasks": ["qa"], "temperature": 0.05}).tasks
            ('qa',)
        """
        if isinstance(values, Mapping):
            values = dict(values)
            if "temperature" in values and "score_temperature" not in values:
                values["score_temperature"] = values.pop("temperature")
            for key in ("tasks", "downstream_systems"):
                if isinstance(values.get(key), list):
                    values[key] = tuple(values[key])
        return super().from_dict(values)

    def check(self) -> None:
        """Value ranges and choices; a :class:`ConfigError` names the key."""
        unknown = [t for t in self.tasks if t not in TASK_ORDER]
        check(not unknown, "tasks", f"the quickstart has bundled data for {list(TASK_ORDER)}, "
                                    f"not {unknown}")
        for key in ("max_steps", "batch_size", "group_size", "num_samples"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        from .label import REWARDS  # registered rewards, custom ones included

        check(self.reward in REWARDS, "reward",
              f"must be a registered reward {sorted(REWARDS)}, got {self.reward!r}")
        from .train import HUMAN_POSITIVES

        check(self.human_positives in HUMAN_POSITIVES, "human_positives",
              f"must be one of {list(HUMAN_POSITIVES)}, got {self.human_positives!r}")

    @classmethod
    def default(cls) -> "QuickstartConfig":
        """About 20 minutes on a 2-core CPU (15–31 measured: it follows the host's CPU share)."""
        return cls()

    @classmethod
    def full(cls) -> "QuickstartConfig":
        """All bundled data, more steps, every downstream query (meant for a GPU)."""
        return cls(label_token_budget={t: 10**9 for t in TASK_ORDER}, num_samples=8,
                   max_steps=600, batch_size=32, group_size=8, lr=5e-5, query_max_length=128,
                   key_max_length=256, max_llm_queries={},  # {}: every test query
                   downstream_systems=None, exact_match_answers=True)

    @classmethod
    def tiny(cls) -> "QuickstartConfig":
        """A smoke-test run: 1 LLM-labelled (not for tools) + 6 label-only queries per task,
        two training steps, 8 test queries over small pools (a few minutes on 2 cores)."""
        # tools: label-only (their long API-call outputs make LLM labelling the slowest)
        return cls(label_token_budget={"qa": 10**9, "tool": 0, "chat": 10**9, "icl": 10**9},
                   max_llm_label_queries=1,
                   max_label_only=6, num_samples=2, num_negatives=2, max_steps=2, batch_size=4,
                   group_size=3, query_max_length=32, key_max_length=64, max_test_queries=8,
                   max_pool=16, max_llm_queries={"qa": 1, "chat": 1, "icl": 1},
                   downstream_systems=("bm25", "trained"), exact_match_answers=True)


# ----------------------------------------------------------------------------- helpers


def _reward_text(cfg: QuickstartConfig) -> str:
    reward = {"rank": "rank-aware"}.get(cfg.reward, cfg.reward)
    return reward + {"anchor": " (human positives ranked first)",
                     "agree": " (queries where it agrees with the human positives)"}.get(
                         cfg.human_positives, "")


def _say(message: str) -> None:
    print(message, flush=True)


class _Stages:
    """Runs named stages once; records their wall time in ``timings.json``."""

    def __init__(self, out: Path, llm_tokens: Callable[[], int] = lambda: 0):
        self.out = out
        self.llm_tokens = llm_tokens
        self.path = out / "timings.json"
        self.timings: Dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() \
            else {}

    def run(self, name: str, done: Callable[[], bool], body: Callable[[], Any]) -> Any:
        if done():
            _say(f"== {name}: already done ({self.timings.get(name, {}).get('seconds', '?')} s "
                 f"in an earlier run), skipped")
            self.timings.setdefault(name, {})["skipped"] = True
            return None
        _say(f"== {name}")
        release_freed_memory()
        stage_peak = reset_peak_rss()
        start, cpu, tokens = time.perf_counter(), time.process_time(), self.llm_tokens()
        value = body()
        seconds = round(time.perf_counter() - start, 1)
        # CPU seconds of this process (all its threads): on a busy machine wall time says
        # little, CPU time says what the stage costs.
        cpu_seconds = round(time.process_time() - cpu, 1)
        # Tokens through the frozen LLM: what the stage costs independent of the machine.
        # Peak resident memory: of this stage alone where the OS lets us reset the high-water
        # mark (Linux), else of the process so far (the stage where it jumps needs it).
        peak_mb = peak_rss_mb()
        self.timings[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds,
                              "llm_tokens": self.llm_tokens() - tokens, "skipped": False,
                              "peak_rss_mb": peak_mb,
                              "peak_rss_scope": "stage" if stage_peak else "process"}
        atomic_write_json(self.path, self.timings)
        scope = "peak memory" if stage_peak else "peak memory so far"
        _say(f"   {name} took {seconds:.1f} s ({cpu_seconds:.1f} CPU s), {scope} {peak_mb} MB")
        return value


def _raw_lines(path: Path) -> Dict[str, Dict[str, Any]]:
    """id -> the original JSON object, so written slices keep every field."""
    return {str(obj["id"]): obj for _, obj in iter_jsonl(path)}


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def stratified_order(queries: Sequence[Query], seed: int) -> List[Query]:
    """A seeded order that cycles through conversations/sub-tasks, so any prefix covers them."""
    rng = np.random.default_rng(seed)
    strata: Dict[str, List[Query]] = {}
    for q in queries:
        strata.setdefault(str(q.subset or q.group or ""), []).append(q)
    queues = []
    for key in sorted(strata):
        members = list(strata[key])
        rng.shuffle(members)  # type: ignore[arg-type]
        queues.append(members)
    out: List[Query] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def estimate_label_tokens(task: str, query: Query, mean_key_chars: float,
                          num_negatives: int, num_samples: int, answer_chars: float) -> float:
    """LLM tokens the labeller spends on ``query``: every candidate's prompt once (its cache is
    reused across outputs), the desired output and each sample under every candidate, and the
    sampling itself. A character-based estimate: it only splits a budget between queries."""
    t = get_task(task)
    candidates = 1 + max(1, len(query.positive_ids)) + num_negatives
    template = len(t.prompt_template) + len(query.text)
    empty = len(t.empty_template) + len(query.text)
    prompt = (candidates - 1) * (template + mean_key_chars) + empty
    outputs = candidates * (num_samples + 1) * (answer_chars + 2)
    sampling = num_samples * (answer_chars + 2) + len(query.text)
    return (prompt + outputs + sampling) / CHARS_PER_TOKEN


def _pick_training_queries(task: str, train: List[Query], corpus: List[Passage],
                           cfg: QuickstartConfig, seed: int
                           ) -> Tuple[List[Query], List[Query], float]:
    """(LLM-labelled queries, label-only queries, estimated LLM tokens)."""
    order = stratified_order([q for q in train if any(a.strip() for a in q.answers)], seed)
    mean_key = float(np.mean([len(p.full_text) for p in corpus]))
    budget = cfg.label_token_budget.get(task, 0)
    llm: List[Query] = []
    spent = 0.0
    for q in order:
        if cfg.max_llm_label_queries is not None and len(llm) >= cfg.max_llm_label_queries:
            break
        cost = estimate_label_tokens(task, q, mean_key, cfg.num_negatives, cfg.num_samples,
                                     float(np.mean([len(a) for a in q.answers])))
        if spent + cost > budget:
            break
        llm.append(q)
        spent += cost
    chosen = {q.id for q in llm}
    rest = [q for q in order if q.id not in chosen and q.positive_ids]
    if cfg.max_label_only is not None:
        rest = rest[:cfg.max_label_only]
    return llm, rest, spent


def _bundled_training_queries(bundled: Path, train: List[Query], cfg: QuickstartConfig,
                              seed: int) -> Tuple[List[Query], List[Query]]:
    """(queries with the project's LLM labels, label-only queries): the labelled ones in their
    file's order (capped by ``max_llm_label_queries``), the rest with positives as ever."""
    by_id = {q.id: q for q in train}
    llm = [by_id[str(obj["query_id"])] for _, obj in iter_jsonl(bundled)
           if str(obj.get("query_id")) in by_id]
    if cfg.max_llm_label_queries is not None:
        llm = llm[:cfg.max_llm_label_queries]
    chosen = {q.id for q in llm}
    rest = [q for q in stratified_order(train, seed) if q.id not in chosen and q.positive_ids]
    if cfg.max_label_only is not None:
        rest = rest[:cfg.max_label_only]
    return llm, rest


def _shrink_pools(corpus: List[Passage], queries: List[Query], max_pool: int) -> List[Passage]:
    """Keep, within every pool the queries use, their positives and the first entries up to
    ``max_pool`` (smoke tests: a small but real retrieval problem)."""
    keep = set()
    for q in queries:
        pool = candidate_pool(q, corpus)
        keep.update(j for j in pool if corpus[j].id in set(q.positive_ids))
        keep.update(pool[:max_pool])
    return [p for j, p in enumerate(corpus) if j in keep]


# ----------------------------------------------------------------------------- stages


def _prepare(out: Path, cfg: QuickstartConfig, seed: int) -> Dict[str, Dict[str, Any]]:
    """Write the per-task query files the later stages read; return the data plan."""
    plan: Dict[str, Dict[str, Any]] = {}
    for task in cfg.tasks:
        files = bundled_task_files(task)
        folder = out / "data" / task
        corpus = load_corpus(files["corpus"])
        train = load_queries(files["train"])
        test = load_queries(files["test"])
        bundled = None if cfg.relabel else bundled_labels_file(task)
        if bundled is not None:
            llm, rest = _bundled_training_queries(bundled, train, cfg, seed)
            tokens = 0.0  # labelled already: no LLM work here
        else:
            llm, rest, tokens = _pick_training_queries(task, train, corpus, cfg, seed)
        raw_train = _raw_lines(files["train"])
        _write_jsonl(folder / "train.llm.jsonl", [raw_train[q.id] for q in llm])
        if rest:
            _write_jsonl(folder / "train.labels.jsonl", [raw_train[q.id] for q in rest])
        corpus_path, test_path = files["corpus"], files["test"]
        if cfg.max_test_queries is not None or cfg.max_pool is not None:
            test = test[:cfg.max_test_queries]
            raw_test = _raw_lines(files["test"])
            test_path = folder / "test.jsonl"
            _write_jsonl(test_path, [raw_test[q.id] for q in test])
            if cfg.max_pool is not None:
                small = _shrink_pools(corpus, test + llm + rest, cfg.max_pool)
                raw_corpus = _raw_lines(files["corpus"])
                corpus_path = folder / "corpus.jsonl"
                _write_jsonl(corpus_path, [raw_corpus[p.id] for p in small])
        plan[task] = {"corpus": str(corpus_path), "test": str(test_path),
                      "llm_labels": "bundled" if bundled is not None else "here",
                      "llm_queries": len(llm), "label_only_queries": len(rest),
                      "estimated_llm_tokens": int(tokens), "test_queries": len(test)}
        source = ("bundled LLM labels" if bundled is not None
                  else f"~{int(tokens):,} LLM tokens")
        _say(f"   {task:5s} LLM-labelled {len(llm):4d} queries ({source}), "
             f"label-only {len(rest):4d}, test {len(test)}")
    atomic_write_json(out / "data" / "plan.json", plan)
    return plan


def human_label_config(cfg: QuickstartConfig, seed: int,
                       device: Optional[str]) -> "LabelConfig":
    """How the quickstart labels queries from their human positives (1/0 rewards, its BM25
    negatives and seed); the ablation's ``label_only`` variant labels the same way."""
    from .label import LabelConfig

    return LabelConfig(method="labels", num_negatives=cfg.num_negatives, negatives="bm25",
                       seed=seed, device=device)


def _label(out: Path, cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]],
           get_llm: Callable[[], Any], seed: int, device: Optional[str]) -> Dict[str, Any]:
    from .label import LabelConfig, expand_labelled, label, reward_report

    # The LLM-labelled subset and the label-only rest share the negatives and the seed.
    by_llm = LabelConfig(method="llm", num_samples=cfg.num_samples,
                         num_negatives=cfg.num_negatives, negatives="bm25", seed=seed,
                         device=device)
    by_hand = human_label_config(cfg, seed, device)
    summaries: Dict[str, Any] = {}
    for task in cfg.tasks:
        folder = out / "data" / task
        labels = out / "labels"
        merged = labels / f"{task}.jsonl"
        if merged.is_file():
            continue
        parts = []
        start = time.perf_counter()
        if plan[task]["llm_queries"] and plan[task].get("llm_labels") == "bundled":
            path = labels / f"{task}.llm.jsonl"
            files = bundled_task_files(task)
            ids = [str(obj["id"]) for _, obj in iter_jsonl(folder / "train.llm.jsonl")]
            count = expand_labelled(bundled_labels_file(task), files["train"], files["corpus"],
                                    path, query_ids=ids)
            summaries[f"{task}/llm"] = {"source": "bundled/labels", "queries": count,
                                        **reward_report(path)}
            parts.append(path)
        elif plan[task]["llm_queries"]:
            path = labels / f"{task}.llm.jsonl"
            summary = label(task, folder / "train.llm.jsonl", plan[task]["corpus"], path,
                            llm=get_llm(), config=by_llm)
            summaries[f"{task}/llm"] = _summary_dict(summary)
            parts.append(path)
        if plan[task]["label_only_queries"]:
            path = labels / f"{task}.labels.jsonl"
            summary = label(task, folder / "train.labels.jsonl", plan[task]["corpus"], path,
                            config=by_hand)
            summaries[f"{task}/labels"] = _summary_dict(summary)
            parts.append(path)
        text = "".join(p.read_text(encoding="utf-8") for p in parts)
        atomic_write_text(merged, text)
        _say(f"   {task:5s} labelled in {time.perf_counter() - start:.1f} s -> {merged}")
    if summaries:
        previous = {}
        path = labels / "summary.json"
        if path.is_file():
            previous = json.loads(path.read_text())
        atomic_write_json(path, {**previous, **summaries})
    return summaries


def _summary_dict(summary: Any) -> Dict[str, Any]:
    if summary is None:
        return {}
    if hasattr(summary, "__dataclass_fields__"):
        return {k: v for k, v in asdict(summary).items()
                if isinstance(v, (int, float, str, bool)) or v is None}
    if isinstance(summary, Mapping):
        return dict(summary)
    return {"summary": str(summary)}


def train_config(out: Path, cfg: QuickstartConfig, seed: int,
                 device: Optional[str]) -> Dict[str, Any]:
    """The training configuration the quickstart uses (also the ablation's starting point)."""
    tasks = {task: {"file": str(out / "labels" / f"{task}.jsonl"), "loss": get_task(task).loss}
             for task in cfg.tasks}
    config: Dict[str, Any] = {
        "model": None, "tasks": tasks, "output_dir": str(out / "train"),
        "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "group_size": cfg.group_size,
        "lr": cfg.lr, "seed": seed, "resume": True, "reward": cfg.reward,
        "human_positives": cfg.human_positives,
        "batching": "homogeneous", "self_paced": True, "score_temperature": cfg.score_temperature,
        "task_temperature": cfg.task_temperature,
        "query_max_length": cfg.query_max_length, "key_max_length": cfg.key_max_length,
        # checkpoints a killed run resumes from (three per run)
        "save_steps": max(1, cfg.max_steps // 3),
    }
    if device is not None:
        config["device"] = device
    return config


def _train(out: Path, cfg: QuickstartConfig, seed: int, device: Optional[str]) -> Path:
    from .train import train

    final = Path(train(train_config(out, cfg, seed, device)))
    target = out / "model"
    # Built aside and swapped in whole: a kill mid-copy never leaves a model folder that the
    # next run would take for a finished stage.
    with atomic_directory(target) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
    return target


def _evaluate(out: Path, cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]],
              get_llm: Callable[[], Any], seed: int, device: Optional[str]) -> Dict[str, Any]:
    data = {task: {"corpus": plan[task]["corpus"], "test": plan[task]["test"]}
            for task in cfg.tasks}
    # systems=None: evaluate's default systems (the opt-in ones left out).
    config = EvalConfig(tasks=list(cfg.tasks), data=data, systems=None,
                        downstream=True, max_llm_queries=cfg.max_llm_queries,
                        exact_match_answers=cfg.exact_match_answers,
                        downstream_systems=(None if cfg.downstream_systems is None
                                            else list(cfg.downstream_systems)),
                        device=device, batch_size=cfg.eval_batch_size, seed=seed)
    vectors: Dict[str, Dict[str, Any]] = {}
    # get_llm, not the LLM: evaluate loads it once its encoders are gone (a lower peak).
    results = evaluate(out / "model", config=config, llm=get_llm, keep_vectors=vectors)
    # The trained model's key vectors: the index and the examples reuse them instead of
    # encoding the corpora again (the tool corpus alone is ~270k tokens).
    for task, stored in vectors.items():
        _save_vectors(out / "vectors" / f"{task}.npz", stored["ids"], stored["vectors"])
    _write_card(out, cfg, plan, results)
    atomic_write_json(out / "results.json", results)  # last: it marks the stage done
    return results


def _write_card(out: Path, cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]],
                results: Mapping[str, Any]) -> None:
    """The trained model's card, now with its training data and evaluation table."""
    from .embedder import write_model_card

    data = [f"{task}: {BUNDLED_TASK_DIRS[task]} (bundled), {plan[task]['llm_queries']} queries "
            f"with LLM rewards ({plan[task].get('llm_labels', 'here')}), "
            f"{plan[task]['label_only_queries']} with 1/0 rewards from human positives"
            for task in cfg.tasks]
    training = {"method": "llm-embedder quickstart", "reward": _reward_text(cfg),
                "steps": cfg.max_steps, "batch size": cfg.batch_size, "lr": cfg.lr,
                "score temperature": cfg.score_temperature}
    write_model_card(out / "model", {"base_model": "sentence-transformers/all-MiniLM-L6-v2",
                                     "training_data": data, "training": training,
                                     "results": dict(results)})


def _save_vectors(path: Path, ids: Sequence[str], vectors: np.ndarray) -> None:
    with atomic_file(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, ids=np.asarray(ids, dtype=object).astype(str), vectors=vectors)


def _load_vectors(out: Path, task: str) -> Optional[Dict[str, np.ndarray]]:
    path = out / "vectors" / f"{task}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        ids = [str(i) for i in data["ids"]]
        return dict(zip(ids, np.asarray(data["vectors"], dtype=np.float32)))


def _key_vectors(out: Path, model: Any, task: str, passages: Sequence[Passage]) -> np.ndarray:
    """Trained key vectors of ``passages``: saved ones when the evaluate stage left them."""
    saved = _load_vectors(out, task) or {}
    missing = [p for p in passages if p.id not in saved]
    if missing:
        fresh = model.encode_keys([p.full_text for p in missing], task=task,
                                  show_progress_bar=False)
        saved.update(zip([p.id for p in missing], fresh))
    return np.stack([saved[p.id] for p in passages]).astype(np.float32)


def _build_index(out: Path, cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]],
                 device: Optional[str]) -> None:
    from .embedder import Embedder
    from .index import Index, write_source

    task = cfg.index_task
    model = Embedder.from_pretrained(out / "model", device=device)
    corpus = load_corpus(plan[task]["corpus"])
    keys = _key_vectors(out, model, task, corpus)
    index = Index(keys.shape[1])
    index.add(keys, [p.id for p in corpus])
    index.save(out / "index")
    # Written last (atomically): the stage counts as done only once source.json is there, so
    # a kill between the two never leaves an index whose model nobody knows.
    write_source(out / "index", task, str((out / "model").resolve()), plan[task]["corpus"])
    _say(f"   indexed {len(index)} {task} passages -> {out / 'index'}")


def _examples(out: Path, cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]],
              get_llm: Callable[[], Any], device: Optional[str]) -> List[Dict[str, Any]]:
    """One test query per task: top results of the trained model and the LLM's answer."""
    from .embedder import Embedder
    from .index import Index

    model = Embedder.from_pretrained(out / "model", device=device)
    llm = get_llm()
    shown = []
    for task in cfg.tasks:
        corpus = load_corpus(plan[task]["corpus"])
        query = load_queries(plan[task]["test"])[0]
        t = get_task(task)
        if task == cfg.index_task and (out / "index").is_dir():
            index = Index.load(out / "index")  # the saved index, as a user would reload it
        else:
            pool = [corpus[j] for j in candidate_pool(query, corpus)]
            keys = _key_vectors(out, model, task, pool)
            index = Index(keys.shape[1])
            index.add(keys, [p.id for p in pool])
        by_id = {p.id: p for p in corpus}
        k = min(t.downstream_k, len(index))
        ids, scores = index.search(model.encode_queries([query.text], task=task,
                                                        show_progress_bar=False), k=k)
        hits = [{"id": pid, "score": float(s), "text": by_id[pid].full_text,
                 "positive": pid in query.positive_ids} for pid, s in zip(ids[0], scores[0])]
        context = "\n".join(by_id[h["id"]].full_text for h in
                            sorted(hits, key=lambda h: _corpus_position(corpus, h["id"])))
        entry: Dict[str, Any] = {"task": task, "query": query.text, "gold": query.answers,
                                 "hits": hits}
        if t.downstream == "choice" and query.options:
            prompt = t.format_prompt(query.text, context)
            option_scores = llm.score_grouped([prompt],
                                              [[t.answer_prefix + o for o in query.options]])
            entry["llm_answer"] = query.options[int(np.argmax(np.asarray(option_scores[0])))]
        elif t.downstream in ("answer", "perplexity"):
            entry["llm_answer"] = llm.generate([t.format_prompt(query.text, context)],
                                               max_new_tokens=16)[0]
        shown.append(entry)
    atomic_write_json(out / "examples.json", shown)
    return shown


def _corpus_position(corpus: Sequence[Passage], pid: str) -> int:
    # Same context order as the evaluation: corpus order (chronological for dialogue turns).
    return next(i for i, p in enumerate(corpus) if p.id == pid)


def _print_examples(shown: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for entry in shown:
        lines.append(f"\n[{entry['task']}] {_clip(entry['query'], 200)}")
        for rank, hit in enumerate(entry["hits"], start=1):
            mark = " (gold)" if hit["positive"] else ""
            lines.append(f"   {rank}. [{hit['score']:.3f}] {hit['id']}{mark}: "
                         f"{_clip(hit['text'], 140)}")
        if "llm_answer" in entry:
            lines.append(f"   LLM answer with these: {entry['llm_answer']!r}   "
                         f"gold: {entry['gold'][:1]}")
    text = "\n".join(lines)
    _say(text)
    return text


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- report


def verdict(results: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per task (and the average): trained vs the better of the two base encoders on the
    primary metric, and vs BM25."""
    out: Dict[str, Dict[str, Any]] = {}
    for task, by_system in results.items():
        metric = "primary" if task == "average" else primary_metric(task)
        if not metric or "trained" not in by_system or metric not in by_system["trained"]:
            continue
        bases = {s: by_system[s][metric] for s in ("base", "base_noinstr")
                 if metric in by_system.get(s, {})}
        trained = by_system["trained"][metric]
        entry: Dict[str, Any] = {"metric": metric, "trained": trained}
        if bases:
            best = max(bases, key=bases.get)  # type: ignore[arg-type]
            entry.update(best_base=best, base=bases[best], delta=trained - bases[best],
                         beats_base=trained > bases[best])
        if metric in by_system.get("bm25", {}):
            bm25 = by_system["bm25"][metric]
            entry.update(bm25=bm25, beats_bm25=trained > bm25)
        out[task] = entry
    return out


def verdict_text(v: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for task, e in v.items():
        if "base" not in e:
            continue
        rel = e["delta"] / e["base"] * 100 if e["base"] else float("nan")
        lines.append(f"{task:8s} {e['metric']:10s} trained {e['trained']:.3f} vs best base "
                     f"({e['best_base']}) {e['base']:.3f}: {e['delta']:+.3f} ({rel:+.1f} %) "
                     f"{'better' if e['beats_base'] else 'NOT better'}"
                     + (f"; BM25 {e['bm25']:.3f}" if "bm25" in e else ""))
    return "\n".join(lines)


def plot_results(results: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: each task's primary metric (and the average) per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [t for t in results if t != "average"] + (["average"] if "average" in results
                                                       else [])
    systems = [s for s in SYSTEMS if any(
        s in results[t] and (("primary" if t == "average" else primary_metric(t))
                             in results[t][s]) for t in groups)]
    labels = {"random": "random", "bm25": "BM25", "base": "base (instr.)",
              "base_noinstr": "base (no instr.)", "trained": "trained"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(groups))
    for i, system in enumerate(systems):
        values = []
        for t in groups:
            metric = "primary" if t == "average" else primary_metric(t)
            values.append(results[t].get(system, {}).get(metric, np.nan))
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=labels[system])
    ax.set_xticks(x)
    ax.set_xticklabels([f"{t}\n({'mean' if t == 'average' else primary_metric(t)})"
                        for t in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("primary metric")
    ax.set_title("llm-embedder quickstart: held-out test slices")
    ax.legend(ncol=len(systems), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:  # matplotlib picks the format by suffix
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _budget_text(cfg: QuickstartConfig, plan: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for task in plan:
        if get_task(task).downstream:
            n = plan[task]["test_queries"]
            budget = cfg.max_llm_queries.get(task)
            parts.append(f"{task} {n if budget is None else min(budget, n)} of {n}")
    return ", ".join(parts)


def _losses_text(tasks: Sequence[str]) -> str:
    """Which loss trains which task, e.g. ``graded distillation (qa, tool, icl), KL (chat)``."""
    by_loss: Dict[str, List[str]] = {}
    for task in tasks:
        by_loss.setdefault(get_task(task).loss, []).append(task)
    return ", ".join(f"{_LOSS_TEXT.get(loss, loss)} ({', '.join(names)})"
                     for loss, names in by_loss.items())


def _machine() -> str:
    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{platform.machine()} {platform.processor() or ''} — {os.cpu_count()} CPU cores, "
            f"{device}; Python {platform.python_version()}, torch {torch.__version__}")


def _report(out: Path, cfg: QuickstartConfig, results: Mapping[str, Any],
            plan: Mapping[str, Mapping[str, Any]], timings: Mapping[str, Any],
            examples_text: str, full: bool) -> str:
    v = verdict(results)
    _say("\n" + primary_table(results))
    _say("\n" + verdict_text(v))
    for task in results:
        if task != "average":
            _say(f"\n{task}\n{full_table(results, task)}")
    label_rows = ["| task | LLM-labelled queries | label-only queries "
                  "(human positives) | est. LLM tokens | test queries |",
                  "|---|---:|---:|---:|---:|"]
    for task, p in plan.items():
        label_rows.append(f"| {task} | {p['llm_queries']} | {p['label_only_queries']} | "
                          f"{p['estimated_llm_tokens']:,} | {p['test_queries']} |")
    timing_rows = ["| stage | wall s | CPU s | LLM tokens |", "|---|---:|---:|---:|"]
    for name, t in timings.items():
        timing_rows.append(f"| {name} | {t.get('seconds', '-')} | {t.get('cpu_seconds', '-')} "
                           f"| {t.get('llm_tokens', '-')} |")
    total = sum(t.get("seconds", 0) for t in timings.values())
    total_cpu = sum(t.get("cpu_seconds", 0) for t in timings.values())
    total_tokens = sum(t.get("llm_tokens", 0) for t in timings.values())
    timing_rows.append(f"| total | {total:.1f} | {total_cpu:.1f} | {total_tokens} |")
    md = [results_markdown(results, title="llm-embedder quickstart"
                           + (" (--full)" if full else "")),
          "## Trained vs base (primary metric)", "", "```", verdict_text(v), "```", "",
          "## Training data", "", *label_rows, "",
          f"Training: {cfg.max_steps} steps, batch {cfg.batch_size}, group {cfg.group_size}, "
          f"lr {cfg.lr}, tau {cfg.score_temperature}; {_losses_text(plan)}; "
          f"{_reward_text(cfg)} reward; homogeneous batches; self-paced lr.", "",
          "Downstream LLM metrics use a query budget per task "
          f"({_budget_text(cfg, plan)}): with n queries an accuracy has a standard error of "
          "about sqrt(p(1-p)/n): ±0.035 at n = 200, ±0.05 at 100, ±0.08 at 40.", "",
          "## Stage timings", "", *timing_rows, "", f"Machine: {_machine()}", "",
          "## Example queries", "", "```", examples_text.strip(), "```", ""]
    text = "\n".join(md)
    atomic_write_text(out / "results.md", text)
    try:
        plot_results(results, out / "results.png")
    except ImportError:  # matplotlib is the optional [plot] extra; the table is the result
        _say("results.png skipped: install matplotlib (pip install 'llm-embedder[plot]')")
    return text


# ----------------------------------------------------------------------------- entry point


def _claim_folder(out: Path, cfg: QuickstartConfig, seed: int) -> None:
    """Record the configuration in ``out/config.json``; refuse a folder made with another one
    (its stages would be skipped as done although they answer another question)."""
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads(json.dumps({"config": asdict(cfg), "seed": seed}))
    saved = out / "config.json"
    if saved.is_file():
        if _fingerprint(json.loads(saved.read_text())) != fingerprint:
            raise ValueError(f"{out} holds a quickstart run with another configuration "
                             f"({saved}); pass another --out or delete that folder")
    else:
        atomic_write_json(saved, fingerprint)


def _fingerprint(saved: Mapping[str, Any]) -> Any:
    """A saved ``config.json`` as this version writes it (renamed keys, new fields at their
    defaults), so a run started by an earlier version still resumes."""
    try:
        config = QuickstartConfig.from_dict(saved.get("config", {}))
    except ConfigError:
        return saved  # keys this version does not know: another configuration
    return json.loads(json.dumps({"config": asdict(config), "seed": saved.get("seed")}))


def _lazy_llm(llm: Any, device: Optional[str]) -> Tuple[Callable[[], Any], Callable[[], int]]:
    """(get_llm, tokens so far): the frozen LLM is loaded on first use only."""
    loaded: Dict[str, Any] = {"llm": llm}

    def get_llm() -> Any:
        if loaded["llm"] is None:
            from .llm import FrozenLLM

            start = time.perf_counter()
            loaded["llm"] = FrozenLLM.load(None, device=device)
            _say(f"   frozen LLM {getattr(loaded['llm'], 'name', '')} loaded in "
                 f"{time.perf_counter() - start:.1f} s")
        return loaded["llm"]

    def tokens() -> int:
        current = loaded["llm"]
        return int(getattr(current, "stats", {}).get("forward_tokens", 0)) if current else 0

    return get_llm, tokens


def _prepare_and_label(out: Path, cfg: QuickstartConfig, stages: "_Stages",
                       get_llm: Callable[[], Any], seed: int,
                       device: Optional[str]) -> Dict[str, Any]:
    plan_path = out / "data" / "plan.json"
    stages.run("prepare", plan_path.is_file, lambda: _prepare(out, cfg, seed))
    plan = json.loads(plan_path.read_text())
    stages.run("label", lambda: all((out / "labels" / f"{t}.jsonl").is_file() for t in cfg.tasks),
               lambda: _label(out, cfg, plan, get_llm, seed, device))
    return plan


def label_training_data(out_dir: Union[str, Path],
                        config: Union[QuickstartConfig, Mapping[str, Any], str, Path],
                        seed: int = 0,
                        device: Optional[str] = None, llm: Any = None) -> Dict[str, Any]:
    """Only the quickstart's first two stages (pick queries, label them) into ``out_dir``.

    ``out_dir`` then serves as a labelled source for ``scripts/ablation.py --from``: e.g. a
    larger ``label_token_budget`` gives the ablation enough LLM-labelled queries for the reward
    variants to differ. Resumable like the quickstart; returns the data plan.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out_dir)
    config = QuickstartConfig.load(config)
    _claim_folder(out, config, seed)
    get_llm, tokens = _lazy_llm(llm, device)
    return _prepare_and_label(out, config, _Stages(out, tokens), get_llm, seed, device)


def run_quickstart(out_dir: str = "quickstart_out", full: bool = False,
                   device: Optional[str] = None, seed: int = 0, *, tiny: bool = False,
                   config: Union[None, QuickstartConfig, Mapping[str, Any], str, Path] = None,
                   llm: Any = None, relabel: bool = False) -> Dict[str, Any]:
    """Label → train → evaluate → index → examples → report, on the bundled real data.

    Returns ``{task: {system: {metric: value}}}`` (also ``out_dir/results.json``). Re-running
    with the same ``out_dir`` skips the stages already done. ``full`` uses all bundled data and
    more steps (and the GPU when there is one); ``tiny`` (or ``config``: a QuickstartConfig,
    a mapping or a YAML/JSON file of its fields) is for smoke tests. ``relabel`` labels with the
    frozen LLM here instead of using the project's labels (``QuickstartConfig.relabel``).

    Example:
        >>> results = run_quickstart("quickstart_out")
        >>> results["average"]["trained"]["primary"]
    """
    if sum([full, tiny, config is not None]) > 1:
        raise ValueError("pass at most one of full=True, tiny=True, config=...")
    import torch

    cfg = QuickstartConfig.load(config or (
        QuickstartConfig.full() if full else QuickstartConfig.tiny() if tiny
        else QuickstartConfig.default()))
    if relabel:
        cfg = replace(cfg, relabel=True)
    if cfg.index_task not in cfg.tasks:
        raise ConfigError(f"config key 'index_task': the quickstart indexes the corpus of "
                          f"{cfg.index_task!r}: keep it in tasks {list(cfg.tasks)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out_dir)
    _claim_folder(out, cfg, seed)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    get_llm, llm_tokens = _lazy_llm(llm, device)

    total_start = time.perf_counter()
    kind = "full" if full else "tiny" if tiny else "custom" if config else "default"
    _say(f"llm-embedder quickstart -> {out.resolve()}  ({kind} configuration, device {device})")
    stages = _Stages(out, llm_tokens)
    plan = _prepare_and_label(out, cfg, stages, get_llm, seed, device)
    stages.run("train", lambda: (out / "model" / "config.json").is_file(),
               lambda: _train(out, cfg, seed, device))
    stages.run("evaluate", (out / "results.json").is_file,
               lambda: _evaluate(out, cfg, plan, get_llm, seed, device))
    results = json.loads((out / "results.json").read_text())
    stages.run("index", (out / "index" / "source.json").is_file,
               lambda: _build_index(out, cfg, plan, device))
    stages.run("examples", (out / "examples.json").is_file,
               lambda: _examples(out, cfg, plan, get_llm, device))
    examples_text = _print_examples(json.loads((out / "examples.json").read_text()))
    _report(out, cfg, results, plan, stages.timings, examples_text, full)
    atomic_write_json(out / "summary.json", {"verdict": verdict(results), "plan": plan,
                                             "timings": stages.timings, "machine": _machine()})
    _say(f"\nquickstart finished in {time.perf_counter() - total_start:.1f} s (this run); "
         f"results in {out / 'results.md'}, {out / 'results.png'}, model in {out / 'model'}")
    return results


__all__ = ["QuickstartConfig", "estimate_label_tokens", "label_training_data",
           "plot_results", "run_quickstart",
           "train_config", "verdict"]
