"""Evaluation on held-out splits: retrieval metrics, downstream LLM metrics and baselines.

Retrieval (DESIGN.md §7): Recall@{1,5,10}, MRR@10 and nDCG@{5,10} with binary gains, each
query ranked within its candidate pool (its own conversation for memory, its own sub-task for
in-context examples; :func:`llm_embedder.data.candidate_pool`).

Downstream, with the frozen LLM and a per-task query budget (``max_llm_queries``):

- knowledge (``qa``): mean token log-likelihood of the gold answer and SQuAD-style exact match
  of the greedy answer, with the top-3 retrieved passages vs none;
- memory (``chat``): perplexity of the gold answer with the top-3 retrieved turns of the same
  conversation vs none;
- examples (``icl``): accuracy with the top-4 retrieved demonstrations vs random ones vs
  zero-shot; the LLM classifies by scoring every option and picking the most likely;
- tools: nDCG@5 of the retrieval itself (no LLM step).

The retrieved entries reach the LLM as a set in corpus order (chronological for dialogue turns),
so systems that retrieve the same entries share one scored prompt.

Systems: ``none`` (no retrieval, downstream only), ``random``, ``bm25``, ``base`` (the packaged
encoder with the task instructions), ``base_noinstr`` (the same encoder without instructions,
which is sometimes the stronger baseline: both are reported) and ``trained``.

Each task has one primary metric (:data:`PRIMARY_METRICS`) and the results hold their average
over tasks under the key ``"average"``.
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

from .io import atomic_write_json, atomic_write_text
from .data import (
    BUNDLED_TASK_DIRS,
    Passage,
    Query,
    bundled_task_files,
    candidate_pool,
    load_corpus,
    load_queries,
)
from .tasks import get_task

Results = Dict[str, Dict[str, Dict[str, float]]]

RETRIEVAL_KS = (1, 5, 10)
NDCG_KS = (5, 10)
MRR_K = 10
RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@5", "ndcg@10")

# Primary metric per task. qa: nDCG@10, not R@5 — on this 190-passage corpus R@5 is 0.93-0.99
# for every system (BM25 and MiniLM alike), so it cannot tell systems apart, while nDCG@10 still
# rewards putting the one gold paragraph first. icl has no positives: the LLM's accuracy is the
# only thing that measures retrieved examples.
PRIMARY_METRICS = {"qa": "ndcg@10", "tool": "ndcg@5", "chat": "recall@5", "icl": "accuracy"}
# Whether larger is better, for every metric this module reports.
HIGHER_IS_BETTER = {**{m: True for m in RETRIEVAL_METRICS}, "accuracy": True, "answer_ll": True,
                    "em": True, "answer_ppl": False}

SYSTEMS = ("random", "bm25", "base", "base_noinstr", "trained")
DOWNSTREAM_K = {"qa": 3, "chat": 3, "icl": 4}
DEFAULT_TASKS = ("qa", "tool", "chat", "icl")


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

def _top(scores: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the ``depth`` largest scores per row, descending, ties to the lower index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :depth]


def rank_random(data: TaskData, depth: int, seed: int = 0) -> List[np.ndarray]:
    """A seeded random ranking of each query's pool (the floor every system must clear)."""
    out = []
    for i, pool in enumerate(data.pools):
        rng = np.random.default_rng([seed, i])
        out.append(pool[rng.permutation(len(pool))[:depth]])
    return out


def rank_bm25(data: TaskData, depth: int) -> List[np.ndarray]:
    """BM25 ranking (bm25s) of each query's pool; one index per distinct pool."""
    from .bm25 import BM25Index

    texts = [p.full_text for p in data.corpus]
    indexes: Dict[int, Tuple[Any, np.ndarray]] = {}
    out = []
    for query, pool in zip(data.queries, data.pools):
        key = id(pool)
        if key not in indexes:
            indexes[key] = (BM25Index([texts[j] for j in pool]), pool)
        index, pool = indexes[key]
        local, _ = index.search(query.text, k=min(depth, len(pool)))
        out.append(pool[np.asarray(local, dtype=np.int64)])
    return out


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
        scores = queries[members] @ keys[pool].T
        top = _top(scores, min(depth, len(pool)))
        for row, i in enumerate(members):
            out[i] = pool[top[row]]
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


def downstream_icl(data: TaskData, rankings: Mapping[str, Sequence[np.ndarray]], llm: Any, *,
                   k: int, query_ids: Sequence[int], seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Examples: accuracy of the LLM choosing among each query's ``options`` (highest mean
    log-likelihood) zero-shot (``none``) and with ``k`` demonstrations from each system."""
    task = get_task(data.task)
    systems = ["none", *rankings]
    if "random" not in rankings:
        systems.append("random")
        rankings = {**rankings, "random": rank_random(data, k, seed)}
    for i in query_ids:
        if not data.queries[i].options:
            raise ValueError(f"icl query {data.queries[i].id!r} has no 'options' to choose from")
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


# ----------------------------------------------------------------------------- evaluate

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


def evaluate(model_or_path: Any = None, tasks: Optional[Sequence[str]] = None,
             data: DataSpec = None, systems: Optional[Sequence[str]] = None, llm: Any = None,
             downstream: bool = True, k: Union[None, int, Mapping[str, int]] = None, *,
             base_model: Any = None, max_queries: Optional[int] = None,
             max_llm_queries: Union[None, int, Mapping[str, int]] = 100,
             exact_match_answers: bool = True,
             downstream_systems: Optional[Sequence[str]] = None, device: Optional[str] = None,
             batch_size: int = 64, seed: int = 0, verbose: bool = True,
             keep_vectors: Optional[Dict[str, Dict[str, Any]]] = None) -> Results:
    """Evaluate retrieval systems per task on held-out queries; returns
    ``{task: {system: {metric: value}}}`` plus ``{"average": {system: {"primary": value}}}``.

    ``model_or_path`` is the ``trained`` system (an Embedder or a folder; None: no trained
    system). ``systems`` picks among ``random``, ``bm25``, ``base``, ``base_noinstr``,
    ``trained``; downstream metrics add ``none`` (no retrieval). ``max_llm_queries`` caps the
    queries per task that the LLM sees (None: all; a mapping: per task). ``k`` overrides the
    downstream context size (default qa 3, chat 3, icl 4). ``keep_vectors`` (a dict) receives
    per task the ``ids`` and key ``vectors`` the trained model computed, to build an index
    without encoding the corpus again.

    Example:
        >>> results = evaluate("quickstart_out/model", tasks=["qa", "tool"], downstream=False)
        >>> results["tool"]["trained"]["ndcg@5"], results["tool"]["bm25"]["ndcg@5"]
    """
    tasks = list(tasks or DEFAULT_TASKS)
    if systems is None:
        systems = [s for s in SYSTEMS if s != "trained" or model_or_path is not None]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    if "trained" in systems and model_or_path is None:
        raise ValueError("system 'trained' needs model_or_path (a model folder or Embedder)")
    downstream_k = dict(DOWNSTREAM_K)
    if isinstance(k, int):
        downstream_k = {t: k for t in downstream_k}
    elif k is not None:
        downstream_k.update(k)
    if any(v < 1 for v in downstream_k.values()):
        raise ValueError(f"downstream k must be >= 1, got {downstream_k}")

    models: Dict[str, Any] = {}
    if "trained" in systems:
        models["trained"] = _load_embedder(model_or_path, device)
    if "base" in systems or "base_noinstr" in systems:
        models["base"] = _load_embedder(base_model, device)
    if downstream and any(t in DOWNSTREAM_K for t in tasks):
        llm = _load_llm(llm, device)

    results: Results = {}
    for task in tasks:
        start = time.perf_counter()
        split = load_task_data(task, data, "test", max_queries)
        depth = max(10, downstream_k.get(task, 0))
        rankings: Dict[str, List[np.ndarray]] = {}
        for system in systems:
            if system == "random":
                rankings[system] = rank_random(split, depth, seed)
            elif system == "bm25":
                rankings[system] = rank_bm25(split, depth)
            else:
                model = models["trained" if system == "trained" else "base"]
                store = None
                if keep_vectors is not None and system == "trained":
                    store = keep_vectors.setdefault(task, {})
                rankings[system] = rank_dense(split, model, depth,
                                              instructions=system != "base_noinstr",
                                              batch_size=batch_size, store=store)
        positives = [q.positive_ids for q in split.queries]
        task_results: Dict[str, Dict[str, float]] = {}
        for system, ranking in rankings.items():
            ids = [[split.corpus[j].id for j in row] for row in ranking]
            metrics = retrieval_metrics(ids, positives)
            if metrics:
                task_results[system] = metrics
        _log(verbose, f"[eval] {task}: retrieval for {len(split.queries)} queries "
                      f"({time.perf_counter() - start:.1f}s)")
        if downstream and task in DOWNSTREAM_K:
            start = time.perf_counter()
            chosen = {s: rankings[s] for s in (downstream_systems or systems) if s in rankings}
            budget = (max_llm_queries.get(task) if isinstance(max_llm_queries, Mapping)
                      else max_llm_queries)
            query_ids = _llm_queries(split, budget, seed)
            if task == "icl":
                extra = downstream_icl(split, chosen, llm, k=downstream_k[task],
                                       query_ids=query_ids, seed=seed)
            else:
                extra = downstream_answers(split, chosen, llm, k=downstream_k[task],
                                           query_ids=query_ids,
                                           exact=exact_match_answers and task == "qa")
                if task == "chat":  # perplexity is the memory metric; log-likelihood is kept
                    extra = {s: {m: v for m, v in d.items() if m != "em"}
                             for s, d in extra.items()}
            for system, metrics in extra.items():
                task_results.setdefault(system, {}).update(metrics)
            _log(verbose, f"[eval] {task}: downstream LLM on {len(query_ids)} queries "
                          f"({time.perf_counter() - start:.1f}s)")
        results[task] = task_results
    results["average"] = average_primary(results)
    return results


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
            metric = PRIMARY_METRICS.get(task)
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
           "base": "base (instr.)", "base_noinstr": "base (no instr.)", "trained": "trained"}


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
        metric = PRIMARY_METRICS.get(task, "")
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


def main_eval(model: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
              data: Optional[str] = None, downstream: bool = True, llm: Optional[str] = None,
              device: Optional[str] = None, out: Optional[str] = None,
              max_llm_queries: Optional[int] = 100, systems: Optional[Sequence[str]] = None
              ) -> int:
    """``llm-embedder eval``: evaluate, print the tables, optionally write JSON (+ Markdown).

    Example:
        >>> main_eval(model="quickstart_out/model", tasks=["tool"], downstream=False)
    """
    results = evaluate(model, tasks=tasks, data=data, systems=systems, llm=llm,
                       downstream=downstream, device=device, max_llm_queries=max_llm_queries)
    print(primary_table(results))
    for task in results:
        if task != "average":
            print(f"\n{task}\n{full_table(results, task)}")
    if out:
        atomic_write_json(out, results)
        atomic_write_text(Path(out).with_suffix(".md"), results_markdown(results) + "\n")
        print(f"\nresults written to {out}")
    return 0


__all__ = [
    "PRIMARY_METRICS", "RETRIEVAL_METRICS", "SYSTEMS", "TaskData", "average_primary",
    "downstream_answers", "downstream_icl", "evaluate", "exact_match", "full_table",
    "load_task_data", "main_eval", "mrr_at_k", "ndcg_at_k", "normalize_answer",
    "primary_table", "rank_bm25", "rank_dense", "rank_random", "recall_at_k",
    "results_markdown", "retrieval_metrics",
]
