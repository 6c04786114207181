"""Labelling: a frozen LLM (:mod:`llm_embedder.llm`) scores retrieval candidates, and ``label``
writes the rewards the embedder is trained from (see docs/method.md).

For each query the candidates are its positives, negatives mined from its candidate pool (BM25
and/or the current embedder) and the empty context. The LLM samples N outputs without context;
the desired output and every sample are then scored under every candidate by teacher forcing
(token-mean log-likelihood of the output tokens only). Each candidate prompt is run once and its
KV cache is shared by all the outputs scored under it, which is what makes labelling affordable
on a CPU (``benches/bench_label.py``). The likelihood reward is the desired output's score; the
rank-aware reward comes from the native kernel.

Example:
    >>> from llm_embedder import label
    >>> summary = label("qa", "queries.train.jsonl", "corpus.jsonl", "labels/qa.jsonl",
    ...                 num_samples=8, num_negatives=7)
    >>> print(summary)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import (
    DataError,
    LabelledQuery,
    Passage,
    Query,
    candidate_pool,
    iter_jsonl,
    load_corpus,
    load_queries,
    parse_labelled,
)
from .io import JsonlAppender, atomic_write_text
from .llm import FrozenLLM, LLMBackend, normalise_text, stable_seed
from .tasks import Task, get_task

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- reward registry

@dataclass(frozen=True)
class Reward:
    """A reward: how to compute it from the LLM's log-likelihoods, and where a labelled record
    keeps it.

    ``compute(table)`` takes the float32 table ``[M candidates, 1 + N]`` of token-mean
    log-likelihoods (column 0: the desired output, columns 1..N: the LLM's own samples) and
    returns one reward per candidate. ``field`` is the labelled-file field holding the values,
    so training reads any registered reward by name (``TrainConfig.reward``).
    """

    name: str
    compute: Callable[[np.ndarray], np.ndarray]
    field: str


REWARDS: Dict[str, Reward] = {}


def register_reward(reward: Reward, *, overwrite: bool = False) -> Reward:
    """Add a reward to the registry; ``train`` then picks it by name.

    Example:
        >>> register_reward(Reward("margin", lambda t: t[:, 0] - t[:, 1:].max(1), "margin"))
    """
    if reward.name in REWARDS and not overwrite:
        raise ValueError(f"reward {reward.name!r} is already registered; pass overwrite=True")
    REWARDS[reward.name] = reward
    return reward


def get_reward(name: str) -> Reward:
    """The registered reward called ``name``; a ValueError lists the known ones otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None


def _likelihood_reward(table: np.ndarray) -> np.ndarray:
    return table[:, 0]


def _rank_aware_reward(table: np.ndarray) -> np.ndarray:
    from . import _native

    target = np.ascontiguousarray(table[None, :, 0])
    sampled = np.ascontiguousarray(table[None, :, 1:])
    return _native.rank_aware_reward(target, sampled, "position")[0]


register_reward(Reward("likelihood", _likelihood_reward, "likelihood_rewards"))
register_reward(Reward("rank", _rank_aware_reward, "rank_rewards"))


@dataclass
class LabelSummary:
    """What a :func:`label` run produced (over every query of its shard found in ``out``)."""

    task: str
    out: str
    method: str
    llm: str
    queries: int  # labelled queries of this shard now in the file
    labelled_now: int  # of which labelled by this run
    skipped_existing: int  # already in the file when the run started
    skipped_no_positive: int  # labels mode: queries without positives cannot be labelled
    candidates_per_query: float
    samples_per_query: float
    mean_rank_reward: float
    mean_likelihood_reward: float
    top_positive_share: Optional[float]  # queries whose positive gets the top rank reward
    seconds: float  # wall time of the run, loading included
    setup_seconds: float  # reading data, loading the LLM/embedder (rates below exclude it)
    queries_per_s: float
    tokens_per_s: float  # LLM tokens run (prompts, outputs, sampled) per second of labelling
    pairs_per_s: float  # (candidate, output) pairs scored per second of labelling

    def __str__(self) -> str:
        share = "n/a" if self.top_positive_share is None else f"{self.top_positive_share:.3f}"
        skipped = (f", {self.skipped_no_positive} without positives skipped"
                   if self.skipped_no_positive else "")
        lines = [
            f"label {self.task} ({self.method}, llm={self.llm}) -> {self.out}",
            (f"  queries            {self.queries} ({self.labelled_now} new, "
             f"{self.skipped_existing} already there{skipped})"),
            f"  candidates/query   {self.candidates_per_query:.2f}",
        ]
        if self.method == "llm":
            lines += [f"  samples/query      {self.samples_per_query:.2f}",
                      f"  mean rank reward   {self.mean_rank_reward:.4f}",
                      f"  mean likelihood    {self.mean_likelihood_reward:.4f}"]
        lines += [
            f"  positive on top    {share}",
            f"  time               {self.seconds:.1f} s, of which setup {self.setup_seconds:.1f} s",
        ]
        if self.method == "llm":
            lines.append(f"  throughput         {self.queries_per_s:.3f} queries/s, "
                         f"{self.tokens_per_s:.0f} LLM tokens/s, {self.pairs_per_s:.1f} pairs/s")
        else:
            lines.append(f"  throughput         {self.queries_per_s:.1f} queries/s")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# Shorter answers ("yes", "2") occur in unrelated texts: no evidence of a false negative.
MIN_ANSWER_CHARS = 4


class _NegativeMiner:
    """Ranks a query's candidate pool by BM25 and/or the embedder; one BM25 index per pool."""

    def __init__(self, task: Task, corpus: Sequence[Passage], strategy: str, embedder: Any):
        self.task = task
        self.corpus = corpus
        self.strategy = strategy
        self.embedder = embedder
        self.texts = [p.full_text for p in corpus]
        self._bm25: Dict[Tuple[int, ...], Any] = {}
        self._keys: Optional[np.ndarray] = None

    def _bm25_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        from .bm25 import BM25Index

        key = tuple(pool)
        if key not in self._bm25:
            self._bm25[key] = BM25Index([self.texts[i] for i in pool])
        local, _ = self._bm25[key].search(query.text, k=depth)
        return [pool[i] for i in local]

    def _dense_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        if self._keys is None:
            self._keys = np.asarray(self.embedder.encode_keys(
                self.texts, task=self.task.name, show_progress_bar=False), dtype=np.float32)
        q = np.asarray(self.embedder.encode_queries(
            [query.text], task=self.task.name, show_progress_bar=False), dtype=np.float32)[0]
        scores = self._keys[pool] @ q
        order = np.lexsort((np.arange(len(pool)), -scores))[:depth]
        return [pool[i] for i in order]

    def mine(self, query: Query, k: int, exclude: Iterable[int],
             skip_answers: bool = False) -> List[int]:
        """Top ``k`` pool entries for ``query`` not in ``exclude`` (BM25/dense interleaved for
        ``both``). Entries that contain the query itself (an in-context demo of this very
        example) are skipped: they would leak the answer. ``skip_answers`` also skips entries
        that contain one of the query's answers (at least :data:`MIN_ANSWER_CHARS` characters):
        without an LLM to judge them they are likely unlabelled positives, not negatives."""
        if k <= 0:
            return []
        pool = candidate_pool(query, self.corpus)
        banned = set(exclude)
        q_norm = normalise_text(query.text)
        answers = [a for a in (normalise_text(a) for a in query.answers)
                   if len(a) >= MIN_ANSWER_CHARS] if skip_answers else []
        depth = min(len(pool), k + len(banned) + (48 if answers else 16))
        if depth == 0:
            return []
        rankings = []
        if self.strategy in ("bm25", "both"):
            rankings.append(self._bm25_rank(query, pool, depth))
        if self.strategy in ("embedder", "both"):
            rankings.append(self._dense_rank(query, pool, depth))
        chosen: List[int] = []
        for position in range(depth):
            for ranking in rankings:
                if position < len(ranking):
                    i = ranking[position]
                    if i in banned or i in chosen:
                        continue
                    text = normalise_text(self.texts[i])
                    if len(q_norm) >= 10 and text.startswith(q_norm):
                        continue
                    if any(a in text for a in answers):
                        continue
                    chosen.append(i)
                    if len(chosen) == k:
                        return chosen
        return chosen


def _load_inputs(queries: Any, corpus: Any, require_answers: bool
                 ) -> Tuple[List[Query], List[Passage], str, str]:
    if isinstance(queries, (str, os.PathLike)):
        q_name = os.fspath(queries)
        queries = load_queries(queries, require_answers=require_answers)
    else:
        q_name = "<queries>"
        queries = list(queries)
        for q in queries:
            if not isinstance(q, Query):
                raise TypeError(f"queries must be a path or a list of Query, got "
                                f"{type(q).__name__}")
            if require_answers and not any(a.strip() for a in q.answers):
                raise DataError(q_name, None, f"query {q.id!r}: field 'answers' is empty: the "
                                              f"LLM needs a desired output")
    if isinstance(corpus, (str, os.PathLike)):
        c_name = os.fspath(corpus)
        corpus = load_corpus(corpus)
    else:
        c_name = "<corpus>"
        corpus = list(corpus)
        if not corpus:
            raise DataError(c_name, None, "corpus is empty")
    return queries, corpus, q_name, c_name


def _existing(out: Path, task: str) -> Dict[str, Tuple[int, Dict[str, Any]]]:
    """``(line, record)`` already in ``out`` by query id (a partial last line is cut first)."""
    done: Dict[str, Tuple[int, Dict[str, Any]]] = {}
    if not out.is_file():
        return done
    # A partial last line was cut by JsonlAppender; damage anywhere else is an error here.
    for number, obj in iter_jsonl(out):
        record = parse_labelled(obj, out, number)
        if record.task != task:
            raise DataError(out, number, f"field 'task' is {record.task!r} but this run "
                                         f"labels {task!r}: use another output file")
        done[record.query_id] = (number, obj)
    return done


def _round(values: Iterable[float]) -> List[float]:
    return [round(float(v), 6) for v in values]


def label(task: Union[str, Task], queries: Any, corpus: Any, out: PathLike, *,
          llm: Any = None, embedder: Any = None, method: str = "llm", num_samples: int = 8,
          num_negatives: int = 7, negatives: str = "bm25", limit: Optional[int] = None,
          shard: int = 0, num_shards: int = 1, max_key_tokens: int = 192,
          max_prompt_tokens: int = 512, max_output_tokens: int = 64,
          max_new_tokens: Optional[int] = None, temperature: float = 1.0, top_p: float = 0.95,
          max_batch_tokens: Optional[int] = None, seed: int = 0, device: Any = None,
          skip_answer_negatives: bool = True, show_progress: bool = True) -> LabelSummary:
    """Label ``queries`` with LLM rewards (DESIGN.md §3) and append them to ``out`` (JSONL).

    Candidates per query: its positives, ``num_negatives`` entries mined from its candidate pool
    (``negatives``: ``bm25``, ``embedder`` or ``both``; a query's ``group``/sub-task restricts
    the pool) and the empty context (id ``""``, always last). ``method="llm"`` samples
    ``num_samples`` outputs and scores the desired output (the first answer) and the samples
    under every candidate: ``likelihood_rewards`` = ℓ_c(o*), ``rank_rewards`` = the rank-aware
    reward, plus ``rank_rewards_shift`` (minus the empty context's) and the raw
    ``sample_likelihoods``. ``method="labels"`` uses no LLM: 1.0 for positives, 0.0 otherwise; there, with
    ``skip_answer_negatives``, mined entries that contain one of the query's answers are passed
    over (DPR's filter: such a passage is more likely an unlabelled positive than a negative; on
    the bundled knowledge slice 2 % of BM25 negatives, touching 13 % of the queries).

    Budgets are in tokens of the LLM: candidate texts are cut to ``max_key_tokens`` in the
    prompt (the file keeps the full text), prompts to their last ``max_prompt_tokens``, scored
    outputs to ``max_output_tokens``; samples get ``max_new_tokens`` new tokens (default: twice
    the desired output's length + 4, at most the task's ``max_new_tokens``).
    ``max_batch_tokens`` bounds the tokens per forward pass (default: the LLM's).

    Resumable: queries already in ``out`` are skipped, each query is appended (flushed, fsynced)
    as soon as it is done, and a partial last line left by a kill is cut off on the next run.
    ``limit`` keeps the first ``limit`` queries; shard ``i`` of ``S`` then takes every S-th from
    the i-th (merge the shard files with :func:`merge_labelled`).

    Example:
        >>> label("qa", "qa/queries.train.jsonl", "qa/corpus.jsonl", "qa.labels.jsonl",
        ...       num_samples=8, limit=100)
    """
    start = time.perf_counter()
    task = task if isinstance(task, Task) else get_task(task)
    if method not in ("llm", "labels"):
        raise ValueError(f"method must be 'llm' or 'labels', got {method!r}")
    if negatives not in ("bm25", "embedder", "both"):
        raise ValueError(f"negatives must be 'bm25', 'embedder' or 'both', got {negatives!r}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, "
                         f"num_shards={num_shards}")
    if method == "llm" and num_samples < 1:
        raise ValueError("num_samples must be >= 1 for the rank-aware reward")
    if num_negatives < 0 or (limit is not None and limit < 0):
        raise ValueError("num_negatives and limit must be >= 0")
    queries, corpus, q_name, c_name = _load_inputs(queries, corpus, method == "llm")
    selected = queries[:limit] if limit is not None else queries
    mine = selected[shard::num_shards]

    out = Path(out)
    appender = JsonlAppender(out)  # cuts a partial last line before we read the file
    try:
        existing = _existing(out, task.name)
        todo = [q for q in mine if q.id not in existing]
        by_id = {p.id: i for i, p in enumerate(corpus)}
        for q in todo:
            for pid in q.positive_ids:
                if pid not in by_id:
                    raise DataError(q_name, None, f"query {q.id!r}: positive id {pid!r} is not "
                                                  f"in the corpus {c_name}")
        if negatives != "bm25" and embedder is None and todo:
            from .embedder import Embedder

            embedder = Embedder.from_pretrained(device=device)
        miner = _NegativeMiner(task, corpus, negatives, embedder)
        frozen: Optional[LLMBackend] = None
        if method == "llm" and todo:
            frozen = llm if isinstance(llm, LLMBackend) else FrozenLLM.load(llm, device=device)
        llm_name = "labels" if method == "labels" else (
            frozen.name if frozen is not None else (llm.name if isinstance(llm, LLMBackend)
                                                    else str(llm or "default")))
        for number, obj in existing.values():
            if todo and obj.get("llm") and obj["llm"] != llm_name:
                raise DataError(out, number, f"labelled by {obj['llm']!r}, but this run uses "
                                             f"{llm_name!r}: use another output file")
        stats0 = dict(frozen.stats) if frozen is not None else {}
        skipped_no_positive = 0
        setup = time.perf_counter() - start
        bar = _progress(len(todo), f"label {task.name}", show_progress)
        labelled_now = 0
        try:
            for q in todo:
                positives = list(dict.fromkeys(by_id[p] for p in q.positive_ids))
                if method == "labels" and not positives:
                    skipped_no_positive += 1
                    bar.update(1)
                    continue
                mined = miner.mine(q, num_negatives, positives,
                                   skip_answers=method == "labels" and skip_answer_negatives)
                idx = positives + mined
                candidates = [{"id": corpus[i].id, "text": corpus[i].full_text} for i in idx]
                candidates.append({"id": "", "text": ""})
                if method == "labels":
                    record = _label_by_hand(task, q, candidates, len(positives))
                else:
                    record = _label_with_llm(frozen, task, q, candidates, num_samples,
                                             max_key_tokens, max_prompt_tokens, max_output_tokens,
                                             max_new_tokens, temperature, top_p, max_batch_tokens,
                                             seed)
                appender.append(record.to_json())
                labelled_now += 1
                bar.update(1)
                if frozen is not None:
                    spent = time.perf_counter() - start - setup
                    tokens = frozen.stats["forward_tokens"] - stats0["forward_tokens"]
                    bar.set_postfix_str(f"{tokens / max(spent, 1e-9):.0f} tok/s", refresh=False)
        finally:
            bar.close()
    finally:
        appender.close()

    seconds = time.perf_counter() - start
    summary = _summarise(out, task.name, method, llm_name, {q.id for q in mine}, labelled_now,
                         len(mine) - len(todo), skipped_no_positive, seconds, setup,
                         frozen.stats if frozen is not None else {}, stats0)
    if show_progress:
        print(summary, file=sys.stderr)
    return summary


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def _label_by_hand(task: Task, q: Query, candidates: List[Dict[str, str]],
                   n_pos: int) -> LabelledQuery:
    rewards = [1.0 if k < n_pos else 0.0 for k in range(len(candidates))]
    return LabelledQuery(
        query_id=q.id, task=task.name, query=q.text,
        answer=next((a for a in q.answers if a.strip()), ""), candidates=candidates,
        likelihood_rewards=list(rewards), rank_rewards=list(rewards), samples=[],
        positive_ids=[c["id"] for c in candidates[:n_pos]], llm="labels",
        extra={"rank_rewards_shift": list(rewards), "method": "labels"})


def _label_with_llm(llm: LLMBackend, task: Task, q: Query, candidates: List[Dict[str, str]],
                    num_samples: int, max_key_tokens: int, max_prompt_tokens: int,
                    max_output_tokens: int, max_new_tokens: Optional[int], temperature: float,
                    top_p: float, max_batch_tokens: Optional[int], seed: int) -> LabelledQuery:
    answer = next(a for a in q.answers if a.strip()).strip()
    empty_prompt = task.format_prompt(q.text, None)
    if max_new_tokens is None:
        # Samples much longer than the desired output only cost time: they are rivals to it.
        answer_tokens = llm.count_tokens(task.answer_prefix + answer)
        max_new_tokens = min(task.max_new_tokens, max(8, 2 * answer_tokens + 4))
    # The seed depends on the query id only: a resumed or sharded run draws the same samples.
    drawn = llm.sample([empty_prompt], num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=stable_seed(seed, q.id),
                       stop_at_newline=not task.multiline, max_prompt_tokens=max_prompt_tokens)[0]
    samples = [s for s in drawn if normalise_text(s) != normalise_text(answer)]
    keys = llm.truncate([c["text"] for c in candidates[:-1]], max_key_tokens)
    prompts = [task.format_prompt(q.text, k) for k in keys] + [empty_prompt]
    outputs = [task.answer_prefix + o for o in [answer, *samples]]
    scores = llm.score_grouped(prompts, [outputs] * len(prompts),
                               max_prompt_tokens=max_prompt_tokens,
                               max_output_tokens=max_output_tokens,
                               max_batch_tokens=max_batch_tokens)
    table = np.stack(scores).astype(np.float32)  # [M, 1 + N]
    if not np.all(np.isfinite(table)):
        raise FloatingPointError(f"query {q.id!r}: non-finite log-likelihood from the LLM")
    rank = REWARDS["rank"].compute(table)
    shift = rank - rank[-1]
    positive_ids = [c["id"] for c in candidates if c["id"] in set(q.positive_ids)]
    return LabelledQuery(
        query_id=q.id, task=task.name, query=q.text, answer=answer, candidates=candidates,
        likelihood_rewards=_round(table[:, 0]), rank_rewards=_round(rank), samples=samples,
        positive_ids=positive_ids, llm=llm.name,
        extra={"rank_rewards_shift": _round(shift),
               "sample_likelihoods": [_round(row) for row in table[:, 1:]],
               "method": "llm"})


def _summarise(out: Path, task: str, method: str, llm_name: str, ids: set, labelled_now: int,
               skipped_existing: int, skipped_no_positive: int, seconds: float, setup: float,
               stats: Dict[str, int], stats0: Dict[str, int]) -> LabelSummary:
    n = 0
    candidates = samples = 0
    rank_sum = ll_sum = 0.0
    rank_count = 0
    with_pos = top = 0
    if out.is_file():
        with out.open("r", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if obj.get("query_id") not in ids:
                    continue
                n += 1
                cands = obj["candidates"]
                rr = obj["rank_rewards"]
                candidates += len(cands)
                samples += len(obj.get("samples", []))
                rank_sum += sum(rr)
                ll_sum += sum(obj["likelihood_rewards"])
                rank_count += len(rr)
                pos = set(obj.get("positive_ids", []))
                pos_r = [r for c, r in zip(cands, rr) if c["id"] in pos]
                if pos_r:
                    with_pos += 1
                    others = [r for c, r in zip(cands, rr) if c["id"] not in pos]
                    top += int(not others or max(pos_r) >= max(others))
    work = seconds - setup
    tokens = stats.get("forward_tokens", 0) - stats0.get("forward_tokens", 0)
    pairs = stats.get("pairs_scored", 0) - stats0.get("pairs_scored", 0)
    return LabelSummary(
        task=task, out=str(out), method=method, llm=llm_name, queries=n,
        labelled_now=labelled_now, skipped_existing=skipped_existing,
        skipped_no_positive=skipped_no_positive,
        candidates_per_query=candidates / n if n else 0.0,
        samples_per_query=samples / n if n else 0.0,
        mean_rank_reward=rank_sum / rank_count if rank_count else math.nan,
        mean_likelihood_reward=ll_sum / rank_count if rank_count else math.nan,
        top_positive_share=top / with_pos if with_pos else None,
        seconds=seconds, setup_seconds=setup,
        queries_per_s=labelled_now / work if work > 0 else 0.0,
        tokens_per_s=tokens / work if work > 0 else 0.0,
        pairs_per_s=pairs / work if work > 0 else 0.0)


def merge_labelled(shard_files: Sequence[PathLike], out: PathLike) -> int:
    """Merge labelled shard files into ``out`` (written atomically); returns the record count.

    Records are interleaved round-robin (shard 0's first, shard 1's first, ...), which restores
    the original query order of a ``shard``/``num_shards`` split, so the merge of complete
    shards equals the unsharded file byte for byte. A partial last line (a killed shard) is
    left out; a query id found twice with different content is an error.

    Example:
        >>> merge_labelled(["qa.0.jsonl", "qa.1.jsonl"], "qa.jsonl")
    """
    if not shard_files:
        raise ValueError("no shard files to merge")
    per_shard: List[List[Tuple[str, str]]] = []
    for path in shard_files:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "shard file not found")
        raw = path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            print(f"warning: {path}: partial last line (killed run?) left out of the merge",
                  file=sys.stderr)
        lines = []
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, number, f"invalid JSON ({err.msg})") from err
            record = parse_labelled(obj, path, number)
            lines.append((record.query_id, line))
        per_shard.append(lines)
    seen: Dict[str, str] = {}
    merged: List[str] = []
    for position in range(max(len(s) for s in per_shard)):
        for shard_lines in per_shard:
            if position < len(shard_lines):
                qid, line = shard_lines[position]
                if qid in seen:
                    if seen[qid] != line:
                        raise DataError(out, None, f"query {qid!r} is labelled differently in "
                                                   f"two shard files")
                    continue
                seen[qid] = line
                merged.append(line)
    atomic_write_text(out, "".join(line + "\n" for line in merged))
    return len(merged)


__all__ = ["REWARDS", "LabelSummary", "Reward", "get_reward", "label", "merge_labelled",
           "register_reward"]
