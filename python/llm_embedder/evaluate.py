"""Evaluation on held-out splits: retrieval metrics, downstream LLM metrics and baselines.

Retrieval: Recall@{1,5,10}, MRR@10 and nDCG@{5,10} with binary gains, each
query ranked within its candidate pool (its own conversation for memory, its own sub-task for
in-context examples; :func:`llm_embedder.data.candidate_pool`).

Downstream, with the frozen LLM and a per-task query budget (``max_llm_queries``), as the
task's ``downstream`` kind says (:class:`llm_embedder.tasks.Task`), with its top
``downstream_k`` retrieved entries:

- ``answer`` (knowledge, ``qa``): mean token log-likelihood of the gold answer and SQuAD-style
  exact match of the greedy answer, with the retrieved passages vs none;
- ``perplexity`` (memory, ``chat``): perplexity of the gold answer with the retrieved turns of
  the same conversation vs none;
- ``choice`` (examples, ``icl``): accuracy with the retrieved demonstrations vs random ones vs
  zero-shot; the LLM classifies by scoring every option and picking the most likely;
- ``None`` (tools): the retrieval metrics alone (no LLM step).

The retrieved entries reach the LLM as a set in corpus order (chronological for dialogue turns),
so systems that retrieve the same entries share one scored prompt.

Systems: ``none`` (no retrieval, downstream only), ``random``, ``bm25``, ``base`` (the packaged
encoder with the task instructions), ``base_noinstr`` (the same encoder without instructions,
which is sometimes the stronger baseline: both are reported), ``trained`` and, when asked for,
``trained_noinstr`` (the trained model without instructions).

Each task has one primary metric (``Task.primary_metric``) and the results hold their average
over tasks under the key ``"average"``. Every knob of :func:`evaluate` is a field of
:class:`EvalConfig`.
"""

from __future__ import annotations

import math
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .config import Config, check
from .data import (
    BUNDLED_TASK_DIRS,
    Passage,
    Query,
    bundled_task_files,
    candidate_pool,
    load_corpus,
    load_queries,
)
from .io import atomic_write_json, atomic_write_text
from .memory import release_freed_memory
from .tasks import TASKS, Task, get_task

Results = Dict[str, Dict[str, Dict[str, float]]]

RETRIEVAL_KS = (1, 5, 10)
NDCG_KS = (5, 10)
MRR_K = 10
RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@5", "ndcg@10")
#: The downstream LLM metrics of each downstream kind (:data:`llm_embedder.tasks.Downstream`).
DOWNSTREAM_METRICS = {"answer": ("answer_ll", "answer_ppl", "em"),
                      "perplexity": ("answer_ll", "answer_ppl"), "choice": ("accuracy",)}

# Whether larger is better, for every metric this module reports.
HIGHER_IS_BETTER = {**{m: True for m in RETRIEVAL_METRICS}, "accuracy": True, "answer_ll": True,
                    "em": True, "answer_ppl": False}

SYSTEMS = ("random", "bm25", "base", "base_noinstr", "trained_noinstr", "trained")
#: Evaluated only when asked for (each system costs an encoding and LLM calls).
OPT_IN_SYSTEMS = ("trained_noinstr",)
#: Tasks evaluated when none are named: those with bundled data.
DEFAULT_TASKS = tuple(BUNDLED_TASK_DIRS)


def metrics_of(task: Task) -> Tuple[str, ...]:
    """Every metric evaluation can report for ``task``: retrieval, then its downstream kind's.

    Example:
        >>> metrics_of(get_task("icl"))[-1]
        'accuracy'
    """
    return RETRIEVAL_METRICS + DOWNSTREAM_METRICS.get(task.downstream or "", ())


def primary_metric(task: str) -> Optional[str]:
    """The metric ``task`` is judged by (``Task.primary_metric``); None for an unknown name
    (e.g. a task in results read back from a file after its registration is gone).

    Example:
        >>> primary_metric("tool")
        'ndcg@5'
    """
    registered = TASKS.get(task)
    return registered.primary_metric if registered is not None else None


# ----------------------------------------------------------------------------- metrics

def recall_at_k(ranked: Sequence[str], positives: Iterable[str], k: int) -> float:
    """Share of the positives found in the top ``k`` (the standard, BEIR/pytrec_eval, recall).

    Example:
        >>> recall_at_k(["a", "b", "c"], {"b", "z"}, 2)
        0.5
    """
    positives = set(positives)
    if not positives:
        raise ValueError("recall_at_k: a query without positives has no recall")
    if k < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {k}")
    return len(positives.intersection(ranked[:k])) / len(positives)


def mrr_at_k(ranked: Sequence[str], positives: Iterable[str], k: int = MRR_K) -> float:
    """Reciprocal rank of the first positive in the top ``k`` (0 when none is there).

    Example:
        >>> mrr_at_k(["a", "b", "c"], {"c"}, 10)
        0.3333333333333333
    """
    positives = set(positives)
    if not positives:
        raise ValueError("mrr_at_k: a query without positives has no reciprocal rank")
    for rank, item in enumerate(ranked[:k], start=1):
        if item in positives:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], positives: Iterable[str], k: int) -> float:
    """nDCG@k with binary gains: DCG = sum of 1/log2(rank+1) over positives in the top ``k``,
    divided by the DCG of the ideal ranking (all positives first).

    Example:
        >>> round(ndcg_at_k(["a", "b"], {"b"}, 5), 4)
        0.6309
    """
    positives = set(positives)
    if not positives:
        raise ValueError("ndcg_at_k: a query without positives has no nDCG")
    dcg = sum(1.0 / math.log2(rank + 1)
              for rank, item in enumerate(ranked[:k], start=1) if item in positives)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(positives)) + 1))
    return dcg / ideal


def retrieval_metrics(rankings: Sequence[Sequence[str]],
                      positives: Sequence[Iterable[str]]) -> Dict[str, float]:
    """Mean Recall@{1,5,10}, MRR@10 and nDCG@{5,10} over the queries that have positives.

    ``rankings[i]`` is query i's ranked list of ids (at least 10 long when the pool allows).
    Queries without positives are skipped; with none at all the result is empty.

    Example:
        >>> retrieval_metrics([["a", "b"], ["c", "d"]], [{"a"}, {"d"}])["mrr@10"]
        0.75
    """
    if len(rankings) != len(positives):
        raise ValueError(f"retrieval_metrics: {len(rankings)} rankings for "
                         f"{len(positives)} positive sets")
    sums: Dict[str, float] = defaultdict(float)
    n = 0
    for ranked, pos in zip(rankings, positives):
        pos = set(pos)
        if not pos:
            continue
        n += 1
        ranked = list(ranked)
        for k in RETRIEVAL_KS:
            sums[f"recall@{k}"] += recall_at_k(ranked, pos, k)
        sums[f"mrr@{MRR_K}"] += mrr_at_k(ranked, pos, MRR_K)
        for k in NDCG_KS:
            sums[f"ndcg@{k}"] += ndcg_at_k(ranked, pos, k)
    return {name: sums[name] / n for name in RETRIEVAL_METRICS} if n else {}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces.

    Example:
        >>> normalize_answer("The  Denver Broncos!")
        'denver broncos'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer.

    Example:
        >>> exact_match("the Broncos.", ["Broncos", "Denver"])
        1.0
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def first_line(generated: str) -> str:
    """The answer part of a greedy continuation: its first non-empty line, stripped."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# ----------------------------------------------------------------------------- data

@dataclass
class TaskData:
    """A task's held-out split: corpus, queries and each query's candidate pool."""

    task: str
    corpus: List[Passage]
    queries: List[Query]
    pools: List[np.ndarray]

    @classmethod
    def build(cls, task: str, corpus: List[Passage], queries: List[Query]) -> "TaskData":
        cache: Dict[Tuple[Optional[str], Optional[str]], np.ndarray] = {}
        pools = []
        for query in queries:
            key = (query.group, query.subset)
            if key not in cache:
                pool = np.asarray(candidate_pool(query, corpus), dtype=np.int64)
                if pool.size == 0:
                    raise ValueError(f"{task}: query {query.id!r} (group={query.group!r}, "
                                     f"task={query.subset!r}) has no candidates in the corpus")
                cache[key] = pool
            pools.append(cache[key])
        return cls(task, corpus, queries, pools)


DataSpec = Union[None, str, Path, Mapping[str, Mapping[str, Any]]]


def load_task_data(task: str, data: DataSpec = None, split: str = "test",
                   max_queries: Optional[int] = None) -> TaskData:
    """Load ``task``'s corpus and ``split`` queries.

    ``data``: None for the bundled slices; a folder laid out like the shared data
    (``<root>/qa/xquad/corpus.jsonl``, ``queries.test.jsonl``, ...); or a mapping
    ``{task: {"corpus": path, "test": path}}``. ``max_queries`` keeps the first queries.

    Example:
        >>> load_task_data("qa").queries[0].text
    """
    get_task(task)
    if data is None:
        files = bundled_task_files(task)
    elif isinstance(data, Mapping):
        if task not in data:
            raise ValueError(f"data has no entry for task {task!r} (has {sorted(data)})")
        files = {key: Path(value) for key, value in data[task].items()}
    else:
        if task not in BUNDLED_TASK_DIRS:
            raise ValueError(f"no data layout known for task {task!r}; pass a mapping "
                             f"{{task: {{'corpus': ..., '{split}': ...}}}}")
        folder = Path(data) / BUNDLED_TASK_DIRS[task]
        files = {"corpus": folder / "corpus.jsonl", split: folder / f"queries.{split}.jsonl"}
    for key in ("corpus", split):
        if key not in files:
            raise ValueError(f"data for task {task!r} names no '{key}' file")
    corpus = load_corpus(files["corpus"])
    queries = load_queries(files[split])
    if max_queries is not None:
        queries = queries[:max_queries]
    ids = {p.id for p in corpus}
    for query in queries:
        missing = [pid for pid in query.positive_ids if pid not in ids]
        if missing:
            raise ValueError(f"{files[split]}: query {query.id!r} has positive ids not in "
                             f"{files['corpus']}: {missing[:3]}")
    return TaskData.build(task, corpus, queries)


# ----------------------------------------------------------------------------- rankings

def rank_random(data: TaskData, depth: int, seed: int = 0) -> List[np.ndarray]:
    """A seeded random ranking of each query's pool (the floor every system must clear)."""
    out = []
    for i, pool in enumerate(data.pools):
        rng = np.random.default_rng([seed, i])
        out.append(pool[rng.permutation(len(pool))[:depth]])
    return out


def rank_bm25(data: TaskData, depth: int) -> List[np.ndarray]:
    """BM25 ranking (bm25s) of each query's pool; one index per distinct pool."""
    from .retrieval import BM25Cache, rank_pool

    cache = BM25Cache([p.full_text for p in data.corpus])
    return [rank_pool(pool, depth, queries=[query.text], bm25=cache)[0]
            for query, pool in zip(data.queries, data.pools)]


def _encode(model: Any, texts: List[str], task: str, side: str, instructions: bool,
            batch_size: int, max_length: int) -> np.ndarray:
    # side=None makes the encoder prepend no instruction (the base_noinstr baseline).
    vectors = model.encode(texts, task=task, side=side if instructions else None,
                           batch_size=batch_size, max_length=max_length,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def rank_dense(data: TaskData, model: Any, depth: int, *, instructions: bool = True,
               batch_size: int = 64, query_max_length: int = 128,
               key_max_length: int = 256,
               store: Optional[Dict[str, Any]] = None) -> List[np.ndarray]:
    """Cosine ranking with an encoder (normalised vectors), within each query's pool.

    Only corpus entries in some query's pool are encoded (e.g. only the test conversations).
    ``store`` (a dict) receives those entries' ``ids`` and key ``vectors``, for reuse.
    """
    from .retrieval import rank_pool

    needed = np.unique(np.concatenate(data.pools))
    encoded = _encode(model, [data.corpus[j].full_text for j in needed], data.task, "key",
                      instructions, batch_size, key_max_length)
    keys = np.zeros((len(data.corpus), encoded.shape[1]), dtype=np.float32)
    keys[needed] = encoded
    if store is not None:
        store["ids"] = [data.corpus[j].id for j in needed]
        store["vectors"] = encoded
    queries = _encode(model, [q.text for q in data.queries], data.task, "query", instructions,
                      batch_size, query_max_length)
    out: List[Optional[np.ndarray]] = [None] * len(data.queries)
    by_pool: Dict[int, List[int]] = defaultdict(list)
    for i, pool in enumerate(data.pools):
        by_pool[id(pool)].append(i)
    for members in by_pool.values():
        pool = data.pools[members[0]]
        ranked = rank_pool(pool, depth, scores=queries[members] @ keys[pool].T)
        for row, i in enumerate(members):
            out[i] = ranked[row]
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- downstream

def _llm_queries(data: TaskData, budget: Optional[int], seed: int) -> List[int]:
    """Which queries the downstream LLM step sees: all (budget None) or a seeded sample,
    spread evenly over sub-tasks/conversations so a small budget still covers each of them."""
    usable = [i for i, q in enumerate(data.queries) if any(a.strip() for a in q.answers)]
    if budget is None or budget >= len(usable):
        return usable
    rng = np.random.default_rng(seed)
    strata: Dict[Any, List[int]] = defaultdict(list)
    for i in usable:
        q = data.queries[i]
        strata[q.subset or q.group].append(i)
    for members in strata.values():
        rng.shuffle(members)
    picked: List[int] = []
    queues = [list(m) for _, m in sorted(strata.items(), key=lambda kv: str(kv[0]))]
    while len(picked) < budget:
        for queue in queues:
            if queue and len(picked) < budget:
                picked.append(queue.pop(0))
    return sorted(picked)


def _context(data: TaskData, ranking: np.ndarray, k: int) -> str:
    # The top-k *set* in corpus order: chronological for dialogue turns, and two systems that
    # retrieve the same entries give the same prompt, which is scored once (the LLM is the
    # slow part on a CPU). The metric then measures what is retrieved, not how it is sorted.
    return "\n".join(data.corpus[j].full_text for j in sorted(int(j) for j in ranking[:k]))


def _score_unique(llm: Any, pairs: List[Tuple[str, str]]) -> Dict[Tuple[str, str], float]:
    """Score each distinct (prompt, output) pair once: systems often retrieve the same
    context, and the LLM is the slow part on a CPU."""
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return {}
    scores = llm.score([p for p, _ in unique], [o for _, o in unique])
    return dict(zip(unique, (float(s) for s in np.asarray(scores, dtype=np.float64))))


def downstream_answers(data: TaskData, rankings: Mapping[str, Sequence[np.ndarray]], llm: Any,
                       *, k: int, query_ids: Sequence[int], exact: bool = True,
                       max_new_tokens: int = 16) -> Dict[str, Dict[str, float]]:
    """Knowledge/memory: answer log-likelihood (and perplexity) with the top-``k`` context of
    each system vs no context (``none``); with ``exact`` also greedy-answer exact match."""
    task = get_task(data.task)
    systems = ["none", *rankings]
    prompts: Dict[str, List[str]] = {}
    for system in systems:
        prompts[system] = [
            task.format_prompt(data.queries[i].text,
                               None if system == "none" else _context(data, rankings[system][i], k))
            for i in query_ids]
    answers = [next(a for a in data.queries[i].answers if a.strip()) for i in query_ids]
    outputs = [task.answer_prefix + a for a in answers]
    pairs = [(p, o) for system in systems for p, o in zip(prompts[system], outputs)]
    scored = _score_unique(llm, pairs)
    generated: Dict[str, str] = {}
    if exact:
        unique_prompts = list(dict.fromkeys(p for system in systems for p in prompts[system]))
        texts = llm.generate(unique_prompts, max_new_tokens=max_new_tokens)
        generated = dict(zip(unique_prompts, texts))
    out: Dict[str, Dict[str, float]] = {}
    for system in systems:
        lls = np.array([scored[(p, o)] for p, o in zip(prompts[system], outputs)])
        metrics = {"answer_ll": float(lls.mean()), "answer_ppl": float(math.exp(-lls.mean()))}
        if exact:
            metrics["em"] = float(np.mean([
                exact_match(first_line(generated[p]), data.queries[i].answers)
                for p, i in zip(prompts[system], query_ids)]))
        out[system] = metrics
    return out


def downstream_choice(data: TaskData, rankings: Mapping[str, Sequence[np.ndarray]], llm: Any,
                      *, k: int, query_ids: Sequence[int]) -> Dict[str, Dict[str, float]]:
    """Examples: accuracy of the LLM choosing among each query's ``options`` (highest mean
    log-likelihood) zero-shot (``none``) and with ``k`` demonstrations from each system of
    ``rankings``.

    Example:
        >>> downstream_choice(data, {"bm25": rank_bm25(data, 4)}, llm, k=4, query_ids=[0, 1])
    """
    task = get_task(data.task)
    # The systems are the caller's: a random-demo reference is one more system's LLM calls,
    # which evaluate() passes when "random" is among its systems (the default).
    systems = ["none", *rankings]
    for i in query_ids:
        if not data.queries[i].options:
            raise ValueError(f"{task.name} query {data.queries[i].id!r} has no 'options' to "
                             f"choose from (its task's downstream kind is 'choice')")
    prompts = {system: [
        task.format_prompt(data.queries[i].text,
                           None if system == "none" else _context(data, rankings[system][i], k))
        for i in query_ids] for system in systems}
    # One scoring call for all systems: the LLM reuses each prompt's cache across its options.
    unique = list(dict.fromkeys(p for system in systems for p in prompts[system]))
    options_of = {}
    for system in systems:
        for p, i in zip(prompts[system], query_ids):
            options_of[p] = [task.answer_prefix + o for o in data.queries[i].options]
    scores = llm.score_grouped(unique, [options_of[p] for p in unique])
    best = {p: int(np.argmax(np.asarray(s))) for p, s in zip(unique, scores)}
    out = {}
    for system in systems:
        correct = [data.queries[i].options[best[p]] == data.queries[i].answers[0]
                   for p, i in zip(prompts[system], query_ids)]
        out[system] = {"accuracy": float(np.mean(correct))}
    return out


def downstream_metrics(task: Task, data: TaskData, rankings: Mapping[str, Sequence[np.ndarray]],
                       llm: Any, *, k: int, query_ids: Sequence[int],
                       exact_match_answers: bool = True) -> Dict[str, Dict[str, float]]:
    """The downstream LLM metrics of ``task``'s kind (``task.downstream``) per system, ``{}``
    for a task without one: ``answer`` log-likelihood, perplexity and exact match;
    ``perplexity`` the same without exact match; ``choice`` accuracy.

    Example:
        >>> downstream_metrics(get_task("qa"), data, {"bm25": rank_bm25(data, 10)}, llm, k=3,
        ...                    query_ids=[0, 1])["bm25"]["em"]
    """
    if task.downstream is None or not len(query_ids):
        return {}  # no query for the LLM: no metric (a mean over nothing would be NaN)
    if task.downstream == "choice":
        return downstream_choice(data, rankings, llm, k=k, query_ids=query_ids)
    # perplexity: the desired output is a free reply (memory), so exact match means nothing
    return downstream_answers(data, rankings, llm, k=k, query_ids=query_ids,
                              exact=exact_match_answers and task.downstream == "answer")


# ----------------------------------------------------------------------------- evaluate

KSpec = Union[None, int, Dict[str, int]]


@dataclass
class EvalConfig(Config):
    """Every knob of :func:`evaluate`, validated; readable from YAML/JSON with :meth:`load`.

    ``tasks``: None for every task with bundled data. ``data``: None for the bundled slices, a
    folder laid out like the shared data, or ``{task: {"corpus": path, "test": path}}``.
    ``systems``: among ``random``, ``bm25``, ``base``, ``base_noinstr``, ``trained_noinstr``,
    ``trained`` (None: all but ``trained_noinstr``, the trained ones only with a model);
    downstream metrics add ``none`` (no retrieval).
    ``k``: the downstream context size (None: each task's ``downstream_k``; an int for every
    task; a mapping per task). ``max_queries`` keeps the first test queries;
    ``max_llm_queries`` caps the queries per task that the LLM sees (None: all; a mapping: per
    task, a task left out gets all). ``downstream_systems``: the systems the LLM step covers
    (None: every system).

    Example:
        >>> config = EvalConfig.load({"tasks": ["qa", "tool"], "downstream": False})
        >>> evaluate("quickstart_out/model", config=config)
    """

    tasks: Optional[List[str]] = None
    data: Union[None, str, Dict[str, Dict[str, str]]] = None
    systems: Optional[List[str]] = None
    downstream: bool = True
    k: KSpec = None
    max_queries: Optional[int] = None
    max_llm_queries: KSpec = 100
    exact_match_answers: bool = True
    downstream_systems: Optional[List[str]] = None
    device: Any = None
    batch_size: int = 64
    seed: int = 0
    verbose: bool = True

    def check(self) -> None:
        """Value ranges and choices; a :class:`ConfigError` names the key."""
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in TASKS]
            check(not unknown, "tasks", f"unknown task(s) {unknown}; known tasks: "
                                        f"{sorted(TASKS)} (register_task adds one)")
        for key in ("systems", "downstream_systems"):
            chosen = getattr(self, key)
            unknown = [s for s in chosen or () if s not in SYSTEMS]
            check(not unknown, key, f"unknown systems {unknown}; known: {list(SYSTEMS)}")
        ks = self.k.values() if isinstance(self.k, Mapping) else [self.k]
        check(all(v is None or v >= 1 for v in ks), "k",
              f"downstream k must be >= 1, got {self.k}")
        budgets = (self.max_llm_queries.values() if isinstance(self.max_llm_queries, Mapping)
                   else [self.max_llm_queries])
        check(all(v is None or v >= 0 for v in budgets), "max_llm_queries",
              f"must be >= 0, got {self.max_llm_queries}")
        check(self.max_queries is None or self.max_queries >= 1, "max_queries",
              f"must be >= 1, got {self.max_queries}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    def context_size(self, task: Task) -> int:
        """How many retrieved entries the LLM sees for ``task`` (``k`` or its ``downstream_k``)."""
        if isinstance(self.k, int):
            return self.k
        if isinstance(self.k, Mapping) and task.name in self.k:
            return self.k[task.name]
        return task.downstream_k

    def llm_budget(self, task: Task) -> Optional[int]:
        """How many of ``task``'s test queries the downstream LLM step sees (None: all)."""
        if isinstance(self.max_llm_queries, Mapping):
            return self.max_llm_queries.get(task.name)
        return self.max_llm_queries


def eval_config(config: Union[None, EvalConfig, Mapping[str, Any], str, Path],
                overrides: Mapping[str, Any]) -> EvalConfig:
    """``config`` (None, an EvalConfig, a mapping or a YAML/JSON path) with keyword overrides
    on top, validated.

    Example:
        >>> eval_config("eval.yaml", {"downstream": False}).downstream
        False
    """
    base = EvalConfig() if config is None else EvalConfig.load(config)
    return EvalConfig.load({**base.to_dict_shallow(), **overrides})


def _load_embedder(model: Any, device: Optional[str]) -> Any:
    if model is None or isinstance(model, (str, Path)):
        from .embedder import Embedder

        return Embedder.from_pretrained(None if model is None else str(model), device=device)
    return model


def _load_llm(llm: Any, device: Optional[str]) -> Any:
    if llm is None or isinstance(llm, (str, Path)):
        from .llm import FrozenLLM

        return FrozenLLM.load(None if llm is None else str(llm), device=device)
    return llm


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def evaluate(model_or_path: Any = None, tasks: Optional[Sequence[str]] = None, *,
             config: Union[None, EvalConfig, Mapping[str, Any], str, Path] = None,
             llm: Any = None, base_model: Any = None,
             keep_vectors: Optional[Dict[str, Dict[str, Any]]] = None,
             **overrides: Any) -> Results:
    """Evaluate retrieval systems per task on held-out queries; returns
    ``{task: {system: {metric: value}}}`` plus ``{"average": {system: {"primary": value}}}``.

    ``model_or_path`` is the ``trained`` system (an Embedder or a folder; None: no trained
    system). The knobs are the fields of :class:`EvalConfig`: pass one as ``config`` (or a
    mapping / YAML path) and/or as keywords (``data=``, ``systems=``, ``downstream=``, ...),
    which win over ``config``. ``llm`` (a folder, .gguf file or loaded backend; None: the
    packaged one; or a function returning one, called once retrieval is done and the encoders
    are freed) is the frozen LLM of the downstream metrics, ``base_model`` (a folder or an
    Embedder; None: the packaged MiniLM) the ``base`` system. ``keep_vectors`` (a dict)
    receives per task the ``ids`` and key ``vectors`` the trained model computed, to build an
    index without encoding the corpus again.

    Example:
        >>> results = evaluate("quickstart_out/model", tasks=["qa", "tool"], downstream=False)
        >>> results["tool"]["trained"]["ndcg@5"], results["tool"]["bm25"]["ndcg@5"]
    """
    if tasks is not None:
        overrides = {**overrides, "tasks": list(tasks)}
    cfg = eval_config(config, overrides)
    systems = cfg.systems
    if systems is None:
        systems = [s for s in SYSTEMS if s not in OPT_IN_SYSTEMS
                   and (s != "trained" or model_or_path is not None)]
    needs_model = [s for s in systems if s.startswith("trained")]
    if needs_model and model_or_path is None:
        raise ValueError(f"system {needs_model[0]!r} needs model_or_path (a model folder or "
                         f"Embedder)")
    chosen = [get_task(t) for t in cfg.tasks or DEFAULT_TASKS]

    models: Dict[str, Any] = {}
    if needs_model:
        models["trained"] = _load_embedder(model_or_path, cfg.device)
    if "base" in systems or "base_noinstr" in systems:
        models["base"] = _load_embedder(base_model, cfg.device)

    # Retrieval for every task first, then the encoders go before the LLM comes: the two
    # never hold memory at once (quickstart probe on a CPU: retrieval 1.84 GB, LLM 2.0 GB).
    results: Results = {}
    retrieved = {}
    for task in chosen:
        results[task.name], retrieved[task.name] = _retrieve_task(task, cfg, systems, models,
                                                                  keep_vectors)
    models.clear()
    release_freed_memory()
    if cfg.downstream and any(t.downstream for t in chosen):
        llm = _load_llm(llm() if _is_loader(llm) else llm, cfg.device)
        for task in chosen:
            if task.downstream:
                split, rankings = retrieved.pop(task.name)
                _downstream_task(task, cfg, systems, split, rankings, llm, results[task.name])
                release_freed_memory()  # one task's scoring buffers, before the next one's
    results["average"] = average_primary(results)
    return results


def _is_loader(llm: Any) -> bool:
    """A zero-argument callable that returns the LLM (not a backend, which has ``score``)."""
    return callable(llm) and not hasattr(llm, "score")


def _retrieve_task(task: Task, cfg: EvalConfig, systems: Sequence[str],
                   models: Mapping[str, Any], keep_vectors: Optional[Dict[str, Dict[str, Any]]]
                   ) -> Tuple[Dict[str, Dict[str, float]],
                              Tuple[TaskData, Dict[str, List[np.ndarray]]]]:
    """One task's retrieval metrics per system, and its test split and rankings (what the
    downstream LLM step reads)."""
    start = time.perf_counter()
    split = load_task_data(task.name, cfg.data, "test", cfg.max_queries)
    k = cfg.context_size(task)
    depth = max(10, k) if task.downstream else 10
    rankings: Dict[str, List[np.ndarray]] = {}
    for system in systems:
        if system == "random":
            rankings[system] = rank_random(split, depth, cfg.seed)
        elif system == "bm25":
            rankings[system] = rank_bm25(split, depth)
        else:
            store = None
            if keep_vectors is not None and system == "trained":
                store = keep_vectors.setdefault(task.name, {})
            model = models["trained" if system.startswith("trained") else "base"]
            rankings[system] = rank_dense(split, model, depth,
                                          instructions=not system.endswith("_noinstr"),
                                          batch_size=cfg.batch_size, store=store)
    positives = [q.positive_ids for q in split.queries]
    out: Dict[str, Dict[str, float]] = {}
    for system, ranking in rankings.items():
        metrics = retrieval_metrics([[split.corpus[j].id for j in row] for row in ranking],
                                    positives)
        if metrics:
            out[system] = metrics
    _log(cfg.verbose, f"[eval] {task.name}: retrieval for {len(split.queries)} queries "
                      f"({time.perf_counter() - start:.1f}s)")
    return out, (split, rankings)


def _downstream_task(task: Task, cfg: EvalConfig, systems: Sequence[str], split: TaskData,
                     rankings: Mapping[str, List[np.ndarray]], llm: Any,
                     out: Dict[str, Dict[str, float]]) -> None:
    """Add the downstream LLM's metrics per system (and ``none``) to ``out``."""
    start = time.perf_counter()
    chosen = {s: rankings[s] for s in (cfg.downstream_systems or systems) if s in rankings}
    query_ids = _llm_queries(split, cfg.llm_budget(task), cfg.seed)
    extra = downstream_metrics(task, split, chosen, llm, k=cfg.context_size(task),
                               query_ids=query_ids, exact_match_answers=cfg.exact_match_answers)
    for system, metrics in extra.items():
        out.setdefault(system, {}).update(metrics)
    _log(cfg.verbose, f"[eval] {task.name}: downstream LLM on {len(query_ids)} queries "
                      f"({time.perf_counter() - start:.1f}s)")


def average_primary(results: Mapping[str, Mapping[str, Mapping[str, float]]]
                    ) -> Dict[str, Dict[str, float]]:
    """Per system, the mean over tasks of each task's primary metric — only for systems that
    have the primary metric on every task evaluated (otherwise the average would compare
    different task sets)."""
    tasks = [t for t in results if t != "average"]
    systems = list(dict.fromkeys(s for t in tasks for s in results[t]))
    out: Dict[str, Dict[str, float]] = {}
    for system in systems:
        values = []
        for task in tasks:
            metric = primary_metric(task)
            value = results[task].get(system, {}).get(metric) if metric else None
            if value is None:
                break
            values.append(value)
        else:
            if values:
                out[system] = {"primary": float(np.mean(values))}
    return out


# ----------------------------------------------------------------------------- reporting

_LABELS = {"none": "no retrieval", "random": "random", "bm25": "BM25",
           "base": "base (instr.)", "base_noinstr": "base (no instr.)",
           "trained_noinstr": "trained (no instr.)", "trained": "trained"}


def _systems_of(results: Mapping[str, Any]) -> List[str]:
    seen = list(dict.fromkeys(s for t, d in results.items() if t != "average" for s in d))
    order = ["none", *SYSTEMS]
    return sorted(seen, key=lambda s: order.index(s) if s in order else len(order))


def primary_table(results: Mapping[str, Any], markdown: bool = False) -> str:
    """Per task its primary metric for every system, plus the average row.

    Example:
        >>> print(primary_table(evaluate(downstream=False)))
    """
    systems = [s for s in _systems_of(results) if s != "none"]
    header = ["task (metric)", *[_LABELS.get(s, s) for s in systems]]
    rows = []
    for task, by_system in results.items():
        if task == "average":
            continue
        metric = primary_metric(task) or ""
        cells = [f"{by_system[s][metric]:.3f}" if metric in by_system.get(s, {}) else "-"
                 for s in systems]
        rows.append([f"{task} ({metric})", *cells])
    avg = results.get("average", {})
    rows.append(["average", *[f"{avg[s]['primary']:.3f}" if s in avg else "-" for s in systems]])
    return _render(header, rows, markdown)


def full_table(results: Mapping[str, Any], task: str, markdown: bool = False) -> str:
    """Every metric of ``task`` (rows) for every system (columns)."""
    by_system = results[task]
    systems = [s for s in _systems_of(results) if s in by_system]
    metrics = list(dict.fromkeys(m for s in systems for m in by_system[s]))
    header = ["metric", *[_LABELS.get(s, s) for s in systems]]
    rows = []
    for metric in metrics:
        arrow = "" if HIGHER_IS_BETTER.get(metric, True) else " (lower better)"
        rows.append([metric + arrow, *[f"{by_system[s][metric]:.3f}" if metric in by_system[s]
                                       else "-" for s in systems]])
    return _render(header, rows, markdown)


def _render(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def results_markdown(results: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A Markdown report: the primary-metric table, then every metric per task."""
    parts = [f"# {title}", "", "Primary metric per task (higher is better); the average is "
             "over tasks.", "", primary_table(results, markdown=True), ""]
    for task in results:
        if task != "average":
            parts += [f"## {task}", "", full_table(results, task, markdown=True), ""]
    return "\n".join(parts)


def write_results(results: Mapping[str, Any], out: Union[str, Path]) -> Tuple[Path, Path]:
    """Write ``results`` as JSON and as a Markdown report, the format chosen by ``out``'s suffix:
    ``.md`` gets the Markdown and a sibling ``.json`` the JSON; any other name gets the JSON and
    a sibling ``.md`` the Markdown. Returns ``(json_path, markdown_path)``.

    Example:
        >>> write_results(results, "eval/results.md")
        (PosixPath('eval/results.json'), PosixPath('eval/results.md'))
    """
    out = Path(out)
    if out.suffix.lower() == ".md":
        json_path, md_path = out.with_suffix(".json"), out
    else:
        json_path, md_path = out, out.with_suffix(".md")
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, results_markdown(results) + "\n")
    return json_path, md_path


def main_eval(model: Optional[str] = None, *, out: Optional[str] = None,
              config: Union[None, EvalConfig, Mapping[str, Any], str, Path] = None,
              llm: Optional[str] = None, **overrides: Any) -> int:
    """``llm-embedder eval``: evaluate, print the tables, optionally write the results (JSON and
    Markdown, see :func:`write_results`). ``config`` and ``overrides`` as for :func:`evaluate`.

    Example:
        >>> main_eval(model="quickstart_out/model", tasks=["tool"], downstream=False)
    """
    results = evaluate(model, config=config, llm=llm, **overrides)
    print(primary_table(results))
    for task in results:
        if task != "average":
            print(f"\n{task}\n{full_table(results, task)}")
    if out:
        json_path, md_path = write_results(results, out)
        print(f"\nresults written to {json_path} and {md_path}")
    return 0


__all__ = [
    "DEFAULT_TASKS",
    "DOWNSTREAM_METRICS",
    "RETRIEVAL_METRICS",
    "SYSTEMS",
    "EvalConfig",
    "TaskData",
    "average_primary",
    "downstream_answers",
    "downstream_choice",
    "downstream_metrics",
    "eval_config",
    "evaluate",
    "exact_match",
    "full_table",
    "load_task_data",
    "main_eval",
    "metrics_of",
    "mrr_at_k",
    "ndcg_at_k",
    "normalize_answer",
    "primary_metric",
    "primary_table",
    "rank_bm25",
    "rank_dense",
    "rank_random",
    "recall_at_k",
    "results_markdown",
    "retrieval_metrics",
    "write_results",
]
