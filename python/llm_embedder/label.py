"""Labelling: a frozen LLM (:mod:`llm_embedder.llm`) scores retrieval candidates, and ``label``
writes the rewards the embedder is trained from (see docs/method.md).

For each query the candidates are its positives, negatives mined from its candidate pool (BM25
and/or the current embedder) and the empty context. The LLM samples N outputs without context;
the desired output and every sample are then scored under every candidate by teacher forcing
(token-mean log-likelihood of the output tokens only). Each candidate prompt is run once and its
KV cache is shared by all the outputs scored under it, which is what makes labelling affordable
on a CPU (``benches/bench_label.py``). With ``reuse_prefixes`` (the default) each candidate's
passage is handed to the LLM as a cacheable prefix, so it runs once for every query it is a
candidate of, and ``query_batch`` queries are sampled and scored together. The likelihood reward
is the desired output's score; the rank-aware reward comes from the native kernel.

Example:
    >>> from llm_embedder import label
    >>> summary = label("qa", "queries.train.jsonl", "corpus.jsonl", "labels/qa.jsonl",
    ...                 num_samples=8, num_negatives=7)
    >>> print(summary)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .config import Config, ConfigError, check
from .data import (
    DataError,
    LabelledQuery,
    Passage,
    Query,
    candidate_pool,
    decode_line,
    iter_jsonl,
    iter_labelled,
    load_corpus,
    load_queries,
    parse_json_object,
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


# ----------------------------------------------------------------------------- configuration

#: Old keyword / config key -> its name now (the temperatures got one naming scheme).
_RENAMED = {"temperature": "sampling_temperature"}


@dataclass
class LabelConfig(Config):
    """Every knob of :func:`label`, validated; readable from YAML/JSON with :meth:`load`.

    ``method``: ``llm`` (rewards from the frozen LLM) or ``labels`` (1.0 for positives, 0.0
    otherwise, no LLM). ``negatives``: where mined negatives come from (``bm25``, ``embedder``
    or ``both``). ``sampling_temperature`` and ``top_p`` shape the LLM's own samples (the old
    name ``temperature`` still works, with a DeprecationWarning). ``sample_contexts``: how many
    of the query's top candidates (positives first, then mined ones) the LLM also samples with as
    context, besides sampling without context; ``oversample``: draws per kept sample, so that
    ``num_samples`` distinct outputs survive de-duplication. Token budgets are in tokens of the
    LLM; see :func:`label` for what each one cuts. ``reuse_prefixes``: hand the LLM each
    candidate's part of the prompt (the text before the query) so that a backend with a prefix
    cache (:class:`~llm_embedder.llm.FrozenLLM`) runs a passage once for every query it is a
    candidate of, for sampling and scoring alike, and label ``query_batch`` queries together
    (their samples drawn in one batch, their candidates scored in one call; a killed run redoes
    at most that many). The labels are the same up to float rounding. False: each query on its
    own, each prompt run in full (the labeller before prefix reuse).

    Example:
        >>> config = LabelConfig.load({"num_samples": 8, "limit": 100})
        >>> label("qa", "queries.jsonl", "corpus.jsonl", "qa.labels.jsonl", config=config)
    """

    method: str = "llm"
    num_samples: int = 8
    num_negatives: int = 7
    negatives: str = "bm25"
    limit: Optional[int] = None
    shard: int = 0
    num_shards: int = 1
    max_key_tokens: int = 192
    max_prompt_tokens: int = 512
    max_output_tokens: int = 64
    max_new_tokens: Optional[int] = None
    sampling_temperature: float = 1.0
    top_p: float = 0.95
    sample_contexts: int = 2
    oversample: float = 2.0
    max_batch_tokens: Optional[int] = None
    seed: int = 0
    device: Any = None
    skip_answer_negatives: bool = True
    show_progress: bool = True
    reuse_prefixes: bool = True
    query_batch: int = 4

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LabelConfig":
        """Like :meth:`Config.from_dict`, also accepting the deprecated key ``temperature``.

        Example:
            >>> LabelConfig.from_dict({"sampling_temperature": 0.7}).sampling_temperature
            0.7
        """
        if isinstance(values, Mapping):
            values = _renamed_keys(values)
        return super().from_dict(values)

    def check(self) -> None:
        """Value ranges and choices; a :class:`ConfigError` names the key."""
        check(self.method in ("llm", "labels"), "method",
              f"must be 'llm' or 'labels', got {self.method!r}")
        check(self.negatives in ("bm25", "embedder", "both"), "negatives",
              f"must be 'bm25', 'embedder' or 'both', got {self.negatives!r}")
        check(self.num_shards >= 1, "num_shards", f"must be >= 1, got {self.num_shards}")
        check(0 <= self.shard < self.num_shards, "shard",
              f"need 0 <= shard < num_shards, got shard={self.shard}, "
              f"num_shards={self.num_shards}")
        check(self.method != "llm" or self.num_samples >= 1, "num_samples",
              f"must be >= 1 for the rank-aware reward, got {self.num_samples}")
        check(self.num_negatives >= 0, "num_negatives", f"must be >= 0, got {self.num_negatives}")
        check(self.limit is None or self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        for key in ("max_key_tokens", "max_prompt_tokens", "max_output_tokens", "max_new_tokens",
                    "max_batch_tokens"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, f"must be >= 1 token, got {value}")
        check(self.sampling_temperature > 0, "sampling_temperature",
              f"must be > 0, got {self.sampling_temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.sample_contexts >= 0, "sample_contexts",
              f"must be >= 0, got {self.sample_contexts}")
        check(self.oversample >= 1, "oversample", f"must be >= 1, got {self.oversample}")
        check(self.query_batch >= 1, "query_batch", f"must be >= 1, got {self.query_batch}")


def _renamed_keys(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` with deprecated keys moved to their new names (one DeprecationWarning each)."""
    out = dict(values)
    for old, new in _RENAMED.items():
        if old in out:
            if new in out:
                raise ConfigError(f"config keys {old!r} and {new!r} both given: {old!r} is the "
                                  f"deprecated name of {new!r}, keep only {new!r}")
            warnings.warn(f"label option {old!r} is deprecated: call it {new!r}",
                          DeprecationWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


def _label_config(config: Any, overrides: Mapping[str, Any]) -> LabelConfig:
    """``config`` (None, a LabelConfig, a mapping or a YAML/JSON path) with keyword overrides."""
    base = LabelConfig() if config is None else LabelConfig.load(config)
    return LabelConfig.load({**base.to_dict_shallow(), **_renamed_keys(overrides)})


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
    # LLM tokens of the labelling (prompts, outputs, sampled) per second; tokens that prefix
    # reuse spared the LLM (stats "saved_tokens") count as the tokens they stand for, so runs
    # with and without reuse compare on the same work.
    tokens_per_s: float
    pairs_per_s: float  # (candidate, output) pairs scored per second of labelling
    llm_tokens: int = 0  # the tokens of tokens_per_s
    saved_tokens: int = 0  # of which not run thanks to reuse (prefix cache, shared prompt ends)

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
            if self.saved_tokens:
                lines.append(f"  prefix reuse       {self.saved_tokens} of {self.llm_tokens} "
                             f"LLM tokens not run")
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
        from .retrieval import BM25Cache

        self._bm25 = BM25Cache(self.texts)
        self._keys: Optional[np.ndarray] = None

    def _bm25_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        from .retrieval import rank_pool

        return rank_pool(pool, depth, queries=[query.text], bm25=self._bm25)[0].tolist()

    def _dense_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        if self._keys is None:
            self._keys = np.asarray(self.embedder.encode_keys(
                self.texts, task=self.task.name, show_progress_bar=False), dtype=np.float32)
        q = np.asarray(self.embedder.encode_queries(
            [query.text], task=self.task.name, show_progress_bar=False), dtype=np.float32)[0]
        from .retrieval import rank_pool

        return rank_pool(pool, depth, scores=self._keys[pool] @ q)[0].tolist()

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


#: How every record the labeller writes begins (the first key of LabelledQuery.to_json). A
#: partial last line is cut on resume only when it begins like this, so a file that is not ours
#: is never cut.
_RECORD_START = b'{"query_id": '


def _check_partial_last_line(out: Path) -> None:
    """DataError when ``out`` ends in a partial line that is not the start of one of our
    records (a killed labeller leaves only those)."""
    raw = out.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return
    tail = raw[raw.rfind(b"\n") + 1:]
    if tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail):
        return
    raise DataError(out, raw.count(b"\n") + 1, "the last line is neither complete nor the start "
                                               "of a labelled record: this is not a labelled "
                                               "file; choose another output file")


def _existing(out: Path, task: str) -> Dict[str, Tuple[int, Dict[str, Any]]]:
    """``(line, record)`` already in ``out`` by query id. Reads only: a file that is not a
    labelled file of ``task`` is an error before anything is written to it."""
    if not out.exists():
        return {}
    if not out.is_file():
        raise DataError(out, None, "the output is not a regular file: choose another output file")
    _check_partial_last_line(out)
    done: Dict[str, Tuple[int, Dict[str, Any]]] = {}
    for number, obj, record in iter_labelled(out):
        if record.task != task:
            raise DataError(out, number, f"field 'task' is {record.task!r} but this run "
                                         f"labels {task!r}: use another output file")
        done[record.query_id] = (number, obj)
    return done


def _round(values: Iterable[float]) -> List[float]:
    return [round(float(v), 6) for v in values]


def label(task: Union[str, Task], queries: Any, corpus: Any, out: PathLike, *,
          llm: Any = None, embedder: Any = None, config: Any = None,
          **overrides: Any) -> LabelSummary:
    """Label ``queries`` with LLM rewards (docs/method.md) and append them to ``out`` (JSONL).

    Settings come from ``config`` (a :class:`LabelConfig`, a mapping or a YAML/JSON file),
    then keyword overrides of its fields (``label(..., num_samples=8)``); wrong types and
    ranges are ConfigErrors naming the key. The sampling temperature is
    ``sampling_temperature`` (it was ``temperature``, which still works with a
    DeprecationWarning): it shapes only the LLM's own samples, not any reward or loss.

    Candidates per query: its positives, ``num_negatives`` entries mined from its candidate pool
    (``negatives``: ``bm25``, ``embedder`` or ``both``; a query's ``group``/sub-task restricts
    the pool) and the empty context (id ``""``, always last). ``method="llm"`` samples
    ``num_samples`` outputs and scores the desired output (the first answer) and the samples
    under every candidate; every registered reward (:data:`REWARDS`: ``likelihood_rewards`` =
    ℓ_c(o*), ``rank_rewards`` = the rank-aware reward, ...) is written to its field, with the
    raw ``sample_likelihoods``. ``method="labels"`` uses no LLM: 1.0 for positives, 0.0
    otherwise, in every reward field; there, with ``skip_answer_negatives``, mined entries that
    contain one of the query's answers are passed over (DPR's filter: such a passage is more
    likely an unlabelled positive than a negative; on the bundled knowledge slice 2 % of BM25
    negatives, touching 13 % of the queries).

    Budgets are in tokens of the LLM: candidate texts are cut to ``max_key_tokens`` in the
    prompt (the file keeps the full text), prompts to their last ``max_prompt_tokens``, scored
    outputs to ``max_output_tokens``; samples get ``max_new_tokens`` new tokens (default: twice
    the desired output's length + 4, at most the task's ``max_new_tokens``).
    ``max_batch_tokens`` bounds the tokens per forward pass (default: the LLM's). ``llm`` is
    any :class:`~llm_embedder.llm.LLMBackend`, or a model path for :meth:`FrozenLLM.load`.

    Resumable: queries already in ``out`` are skipped, each query is appended (flushed, fsynced)
    as soon as it is done (with ``reuse_prefixes``, once its batch of ``query_batch`` queries
    is, in query order), and a partial last line left by a kill is cut off on the next run.
    ``out`` is validated before it is touched (a file that is not a labelled file is left as it
    is) and locked while the run writes (a second labeller gets OutputLockedError at once).
    ``limit`` keeps the first ``limit`` queries; shard ``i`` of ``S`` then takes every S-th from
    the i-th (merge the shard files with :func:`merge_labelled`).

    Example:
        >>> label("qa", "qa/queries.train.jsonl", "qa/corpus.jsonl", "qa.labels.jsonl",
        ...       num_samples=8, limit=100)
    """
    start = time.perf_counter()
    cfg = _label_config(config, overrides)
    task = task if isinstance(task, Task) else get_task(task)
    queries, corpus, q_name, c_name = _load_inputs(queries, corpus, cfg.method == "llm")
    selected = queries[:cfg.limit] if cfg.limit is not None else queries
    mine = selected[cfg.shard::cfg.num_shards]
    out = Path(out)
    # Read-only first: a file that is not ours is refused before the appender may cut its tail.
    existing = _existing(out, task.name)
    run = _LabelRun(cfg, task, corpus, start)
    run.check_positives([q for q in mine if q.id not in existing], q_name, c_name)
    with JsonlAppender(out) as appender:  # locked from here; a partial line of ours is cut
        existing = _existing(out, task.name)  # again: another labeller may have added some
        todo = [q for q in mine if q.id not in existing]
        run.load_models(llm, embedder, todo)
        run.check_same_llm(out, existing, todo)
        run.label_all(todo, appender)
    summary = run.summary(out, {q.id for q in mine}, len(mine) - len(todo))
    if cfg.show_progress:
        print(summary, file=sys.stderr)
    return summary


class _LabelRun:
    """The state of one :func:`label` call: settings, corpus, models, counters."""

    def __init__(self, cfg: LabelConfig, task: Task, corpus: List[Passage], start: float):
        self.cfg = cfg
        self.task = task
        self.corpus = corpus
        self.start = start
        self.by_id = {p.id: i for i, p in enumerate(corpus)}
        self.backend: Optional[LLMBackend] = None
        self.llm_name = "labels"
        self.stats0: Dict[str, int] = {}
        self.setup = 0.0
        self.labelled_now = 0
        self.skipped_no_positive = 0

    def check_positives(self, todo: List[Query], q_name: str, c_name: str) -> None:
        for q in todo:
            for pid in q.positive_ids:
                if pid not in self.by_id:
                    raise DataError(q_name, None, f"query {q.id!r}: positive id {pid!r} is not "
                                                  f"in the corpus {c_name}")

    def load_models(self, llm: Any, embedder: Any, todo: List[Query]) -> None:
        """The embedder (for dense negatives) and the LLM, only when there is work for them."""
        cfg = self.cfg
        if cfg.negatives != "bm25" and embedder is None and todo:
            from .embedder import Embedder

            embedder = Embedder.from_pretrained(device=cfg.device)
        self.miner = _NegativeMiner(self.task, self.corpus, cfg.negatives, embedder)
        if cfg.method == "llm" and todo:
            self.backend = (llm if isinstance(llm, LLMBackend)
                            else FrozenLLM.load(llm, device=cfg.device))
        if cfg.method == "llm":
            self.llm_name = (self.backend.name if self.backend is not None
                             else llm.name if isinstance(llm, LLMBackend)
                             else str(llm or "default"))
        self.stats0 = dict(self.backend.stats) if self.backend is not None else {}

    def check_same_llm(self, out: Path, existing: Dict[str, Tuple[int, Dict[str, Any]]],
                       todo: List[Query]) -> None:
        """One file, one judge: rewards of two LLMs are not comparable within a task."""
        for number, obj in existing.values():
            if todo and obj.get("llm") and obj["llm"] != self.llm_name:
                raise DataError(out, number, f"labelled by {obj['llm']!r}, but this run uses "
                                             f"{self.llm_name!r}: use another output file")

    def label_all(self, todo: List[Query], appender: JsonlAppender) -> None:
        self.setup = time.perf_counter() - self.start
        bar = _progress(len(todo), f"label {self.task.name}", self.cfg.show_progress)
        together = self.backend is not None and self.cfg.reuse_prefixes \
            and _takes(self.backend.sample, "prefixes", "seeds") \
            and _takes(self.backend.score_grouped, "prefixes")
        size = self.cfg.query_batch if together else 1
        try:
            for start in range(0, len(todo), size):
                # A batch's records are appended in query order once the batch is done.
                for record in self.label_batch(todo[start:start + size], together):
                    bar.update(1)
                    if record is None:
                        self.skipped_no_positive += 1
                        continue
                    appender.append(record.to_json())
                    self.labelled_now += 1
                if self.backend is not None:
                    spent = time.perf_counter() - self.start - self.setup
                    tokens = _work_tokens(self.backend.stats) - _work_tokens(self.stats0)
                    bar.set_postfix_str(f"{tokens / max(spent, 1e-9):.0f} tok/s", refresh=False)
        finally:
            bar.close()

    def candidates_of(self, q: Query) -> Optional[Tuple[List[Dict[str, str]], int]]:
        """``q``'s candidates (positives, mined negatives, the empty context last) and how many
        positives lead them; None in labels mode for a query without positives."""
        cfg = self.cfg
        positives = list(dict.fromkeys(self.by_id[p] for p in q.positive_ids))
        if cfg.method == "labels" and not positives:
            return None
        mined = self.miner.mine(q, cfg.num_negatives, positives,
                                skip_answers=cfg.method == "labels" and cfg.skip_answer_negatives)
        candidates = [{"id": self.corpus[i].id, "text": self.corpus[i].full_text}
                      for i in positives + mined]
        candidates.append({"id": "", "text": ""})
        return candidates, len(positives)

    def label_batch(self, batch: List[Query], together: bool) -> List[Optional[LabelledQuery]]:
        """The records of ``batch``, in its order (None: a query labels mode skips)."""
        found = [(q, self.candidates_of(q)) for q in batch]
        if self.cfg.method == "labels":
            return [None if c is None else _label_by_hand(self.task, q, *c) for q, c in found]
        assert self.backend is not None  # loaded by load_models whenever there is work
        work = [(q, c[0]) for q, c in found if c is not None]
        if together:
            return list(_label_together(self.backend, self.task, work, self.cfg))
        return [_label_with_llm(self.backend, self.task, q, c, self.cfg) for q, c in work]

    def summary(self, out: Path, ids: set, skipped_existing: int) -> LabelSummary:
        seconds = time.perf_counter() - self.start
        tally = _tally(out, ids)
        n, rank_count = tally["queries"], tally["rewards"]
        stats = self.backend.stats if self.backend is not None else {}
        work = seconds - self.setup
        tokens = _work_tokens(stats) - _work_tokens(self.stats0)
        saved = stats.get("saved_tokens", 0) - self.stats0.get("saved_tokens", 0)
        pairs = stats.get("pairs_scored", 0) - self.stats0.get("pairs_scored", 0)
        return LabelSummary(
            task=self.task.name, out=str(out), method=self.cfg.method, llm=self.llm_name,
            queries=n, labelled_now=self.labelled_now, skipped_existing=skipped_existing,
            skipped_no_positive=self.skipped_no_positive,
            candidates_per_query=tally["candidates"] / n if n else 0.0,
            samples_per_query=tally["samples"] / n if n else 0.0,
            mean_rank_reward=tally["rank_sum"] / rank_count if rank_count else math.nan,
            mean_likelihood_reward=tally["ll_sum"] / rank_count if rank_count else math.nan,
            top_positive_share=tally["top"] / tally["with_pos"] if tally["with_pos"] else None,
            seconds=seconds, setup_seconds=self.setup,
            queries_per_s=self.labelled_now / work if work > 0 else 0.0,
            tokens_per_s=tokens / work if work > 0 else 0.0,
            pairs_per_s=pairs / work if work > 0 else 0.0, llm_tokens=tokens,
            saved_tokens=saved)


def _work_tokens(stats: Mapping[str, int]) -> int:
    """Tokens the LLM ran plus those reuse spared it: the same for the same labels."""
    return stats.get("forward_tokens", 0) + stats.get("saved_tokens", 0)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def _reward_fields(values: Dict[str, List[float]], extra: Dict[str, Any], **record: Any
                   ) -> LabelledQuery:
    """A record holding each registered reward's values (by field) and ``extra`` after them."""
    values = dict(values)
    return LabelledQuery(likelihood_rewards=values.pop("likelihood_rewards"),
                         rank_rewards=values.pop("rank_rewards"), extra={**values, **extra},
                         **record)


def _label_by_hand(task: Task, q: Query, candidates: List[Dict[str, str]],
                   n_pos: int) -> LabelledQuery:
    rewards = [1.0 if k < n_pos else 0.0 for k in range(len(candidates))]
    return _reward_fields(
        {reward.field: list(rewards) for reward in REWARDS.values()}, {"method": "labels"},
        query_id=q.id, task=task.name, query=q.text,
        answer=next((a for a in q.answers if a.strip()), ""), candidates=candidates,
        samples=[], positive_ids=[c["id"] for c in candidates[:n_pos]], llm="labels")


def _llm_record(llm: LLMBackend, task: Task, q: Query, answer: str,
                candidates: List[Dict[str, str]], samples: List[str], contexts: List[str],
                table: np.ndarray) -> LabelledQuery:
    positive_ids = [c["id"] for c in candidates if c["id"] in set(q.positive_ids)]
    return _reward_fields(
        {reward.field: _round(reward.compute(table)) for reward in REWARDS.values()},
        {"sample_likelihoods": [_round(row) for row in table[:, 1:]],
         "sample_contexts": contexts, "method": "llm"},
        query_id=q.id, task=task.name, query=q.text, answer=answer, candidates=candidates,
        samples=samples, positive_ids=positive_ids, llm=llm.name)


def _answer(q: Query) -> str:
    return next(a for a in q.answers if a.strip()).strip()


def _label_with_llm(llm: LLMBackend, task: Task, q: Query, candidates: List[Dict[str, str]],
                    cfg: LabelConfig) -> LabelledQuery:
    """One query: its samples in two calls (without, with context), then its scores."""
    answer = _answer(q)
    samples, contexts = _draw_samples(llm, task, q, answer, candidates, cfg)
    table = _likelihood_table(llm, task, q, [answer, *samples], candidates, cfg)
    return _llm_record(llm, task, q, answer, candidates, samples, contexts, table)


def _label_together(llm: LLMBackend, task: Task, work: List[Tuple[Query, List[Dict[str, str]]]],
                    cfg: LabelConfig) -> Iterable[LabelledQuery]:
    """Several queries at once, on a backend with prefix reuse: every query's samples in one
    :meth:`sample` call (each prompt with the seed :func:`_draw_samples` gives it, so the draws
    are the same), then every query's candidates scored in one :meth:`score_grouped` call;
    each candidate's passage is passed as a prefix, so the backend runs it once."""
    answers = [_answer(q) for q, _ in work]
    plans = [_sample_plan(llm, task, q, answer, candidates, cfg)
             for (q, candidates), answer in zip(work, answers)]
    drawn = llm.sample([p for plan in plans for p in plan.prompts],  # type: ignore[call-arg]
                       [c for plan in plans for c in plan.counts],
                       seeds=[s for plan in plans for s in plan.seeds],
                       prefixes=[p for plan in plans for p in plan.prefixes],
                       max_new_tokens=[plan.max_new_tokens for plan in plans
                                       for _ in plan.prompts],
                       temperature=cfg.sampling_temperature, top_p=cfg.top_p,
                       stop_at_newline=not task.multiline, max_prompt_tokens=cfg.max_prompt_tokens)
    inputs = []
    cursor = 0
    for plan, answer in zip(plans, answers):
        samples, contexts = _keep_samples(plan, drawn[cursor:cursor + len(plan.prompts)], answer,
                                          cfg)
        cursor += len(plan.prompts)
        inputs.append((samples, contexts))
    prompts, outputs, prefixes = [], [], []
    for (q, candidates), answer, (samples, _) in zip(work, answers, inputs):
        p, o, x = _scoring_inputs(llm, task, q, [answer, *samples], candidates, cfg)
        prompts += p
        outputs += [o] * len(p)
        prefixes += x
    scores = llm.score_grouped(prompts, outputs, max_prompt_tokens=cfg.max_prompt_tokens,
                               max_output_tokens=cfg.max_output_tokens,
                               max_batch_tokens=cfg.max_batch_tokens,
                               prefixes=prefixes)  # type: ignore[call-arg]
    cursor = 0
    for (q, candidates), answer, (samples, contexts) in zip(work, answers, inputs):
        table = _checked_table(q, scores[cursor:cursor + len(candidates)])
        cursor += len(candidates)
        yield _llm_record(llm, task, q, answer, candidates, samples, contexts, table)


@dataclass
class _SamplePlan:
    """One query's draws: prompt 0 without context, then one prompt per context candidate;
    ``counts``/``seeds``/``prefixes`` per prompt."""

    prompts: List[str]
    counts: List[int]
    seeds: List[int]
    prefixes: List[Optional[str]]
    context_ids: List[str]
    max_new_tokens: int
    free_seed: int
    context_seed: int


def _sample_plan(llm: LLMBackend, task: Task, q: Query, answer: str,
                 candidates: List[Dict[str, str]], cfg: LabelConfig) -> _SamplePlan:
    """What :func:`_draw_samples` draws for ``q`` (see there)."""
    max_new_tokens = cfg.max_new_tokens
    if max_new_tokens is None:
        # Samples much longer than the desired output only cost time: they are rivals to it.
        answer_tokens = llm.count_tokens(task.answer_prefix + answer)
        max_new_tokens = min(task.max_new_tokens, max(8, 2 * answer_tokens + 4))
    draws = max(cfg.num_samples, math.ceil(cfg.num_samples * cfg.oversample))
    context_ids = [c["id"] for c in candidates if c["id"]][:cfg.sample_contexts]
    keys = {c["id"]: c["text"] for c in candidates}
    free = draws if not context_ids else math.ceil(draws / 2)
    per_context = math.ceil((draws - free) / len(context_ids)) if context_ids else 0
    # The seeds depend on the query id only: a resumed or sharded run draws the same samples.
    free_seed = stable_seed(cfg.seed, q.id)
    context_seed = stable_seed(cfg.seed, q.id, "with context")
    contexts = llm.truncate([keys[i] for i in context_ids], cfg.max_key_tokens) \
        if context_ids else []
    return _SamplePlan(
        prompts=[task.format_prompt(q.text, None)] + [task.format_prompt(q.text, k)
                                                      for k in contexts],
        counts=[free] + [per_context] * len(contexts),
        # The seeds LLMBackend.sample derives from free_seed and context_seed by position.
        seeds=[stable_seed(free_seed, 0)] + [stable_seed(context_seed, k)
                                             for k in range(len(contexts))],
        prefixes=[None] + [_key_prefix(task, k) for k in contexts], context_ids=context_ids,
        max_new_tokens=max_new_tokens, free_seed=free_seed, context_seed=context_seed)


def _draw_samples(llm: LLMBackend, task: Task, q: Query, answer: str,
                  candidates: List[Dict[str, str]], cfg: LabelConfig
                  ) -> Tuple[List[str], List[str]]:
    """``num_samples`` distinct outputs of the LLM other than the desired one (its rivals), and
    the id of the candidate each was drawn with (``""``: no context).

    Half the draws are made without context and half with the query's top ``sample_contexts``
    candidates as context ("with and without retrieval"): samples of one kind only tend to be
    all more likely, or all less likely, than the desired output under every candidate, which
    leaves the rank-aware reward one or two distinct values per query. ``oversample`` times
    ``num_samples`` are drawn and the first distinct ones are kept, taken in turn from each
    context, so de-duplication does not shrink N.
    """
    plan = _sample_plan(llm, task, q, answer, candidates, cfg)
    common = dict(max_new_tokens=plan.max_new_tokens, temperature=cfg.sampling_temperature,
                  top_p=cfg.top_p, stop_at_newline=not task.multiline,
                  max_prompt_tokens=cfg.max_prompt_tokens)
    drawn = llm.sample(plan.prompts[:1], plan.counts[0], seed=plan.free_seed, **common)
    if len(plan.prompts) > 1:
        drawn += llm.sample(plan.prompts[1:], plan.counts[1], seed=plan.context_seed, **common)
    return _keep_samples(plan, drawn, answer, cfg)


def _keep_samples(plan: _SamplePlan, drawn: List[List[str]], answer: str, cfg: LabelConfig
                  ) -> Tuple[List[str], List[str]]:
    """The first ``num_samples`` distinct draws other than ``answer`` (per prompt of ``plan``,
    in ``drawn``) and the context each came from."""
    free_texts, by_context = drawn[0], drawn[1:]
    # Without context and with context in turn; the contexts in turn among themselves.
    streams: List[List[Tuple[str, str]]] = [[("", text) for text in free_texts], []]
    if by_context:
        streams[1] = [(source, texts[k]) for k in range(max(map(len, by_context)))
                      for source, texts in zip(plan.context_ids, by_context) if k < len(texts)]
    seen = {normalise_text(answer)}
    samples: List[str] = []
    sources: List[str] = []
    for position in range(max(map(len, streams))):
        for stream in streams:
            if position < len(stream) and len(samples) < cfg.num_samples:
                source, text = stream[position]
                if normalise_text(text) not in seen:
                    seen.add(normalise_text(text))
                    samples.append(text)
                    sources.append(source)
    return samples, sources


def _takes(method: Any, *names: str) -> bool:
    """Whether ``method`` names every keyword of ``names`` in its signature (``**kwargs``
    does not count: a backend that swallows them would ignore them)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def _key_prefix(task: Task, key: str) -> Optional[str]:
    """The prompt's text before the query with ``key`` as context: what every query with
    this candidate shares (None when the template puts the query before the key)."""
    marker = "\uE000"  # a private-use character: no query or template holds it
    text = task.prompt_template.format(key=key, query=marker)
    head = text[:max(text.find(marker), 0)]
    return head if key and key in head else None


def _scoring_inputs(llm: LLMBackend, task: Task, q: Query, outputs: List[str],
                    candidates: List[Dict[str, str]], cfg: LabelConfig
                    ) -> Tuple[List[str], List[str], List[Optional[str]]]:
    """The prompt under each candidate (the empty context last), the outputs as scored and
    each prompt's cacheable prefix (the candidate's part of it)."""
    keys = llm.truncate([c["text"] for c in candidates[:-1]], cfg.max_key_tokens)
    prompts = [task.format_prompt(q.text, k) for k in keys] + [task.format_prompt(q.text, None)]
    prefixes = [_key_prefix(task, k) for k in keys] + [None]
    return prompts, [task.answer_prefix + o for o in outputs], prefixes


def _checked_table(q: Query, scores: Sequence[np.ndarray]) -> np.ndarray:
    table = np.stack(scores).astype(np.float32)
    if not np.all(np.isfinite(table)):
        raise FloatingPointError(f"query {q.id!r}: non-finite log-likelihood from the LLM")
    return table


def _likelihood_table(llm: LLMBackend, task: Task, q: Query, outputs: List[str],
                      candidates: List[Dict[str, str]], cfg: LabelConfig) -> np.ndarray:
    """float32 ``[candidates, outputs]`` token-mean log-likelihoods (the empty context last)."""
    prompts, prefixed, prefixes = _scoring_inputs(llm, task, q, outputs, candidates, cfg)
    extra: Dict[str, Any] = {}
    if cfg.reuse_prefixes and _takes(llm.score_grouped, "prefixes"):
        extra["prefixes"] = prefixes
    return _checked_table(q, llm.score_grouped(prompts, [prefixed] * len(prompts),
                                               max_prompt_tokens=cfg.max_prompt_tokens,
                                               max_output_tokens=cfg.max_output_tokens,
                                               max_batch_tokens=cfg.max_batch_tokens, **extra))


def _tally(out: Path, ids: set) -> Dict[str, float]:
    """Counts and sums over the records of ``ids`` in ``out`` (one per query id)."""
    tally = dict.fromkeys(("queries", "candidates", "samples", "rank_sum", "ll_sum", "rewards",
                           "with_pos", "top"), 0)
    if not out.is_file():
        return tally
    for _, _, record in iter_labelled(out):
        if record.query_id not in ids:
            continue
        ids_, rr = [c["id"] for c in record.candidates], record.rank_rewards
        tally["queries"] += 1
        tally["candidates"] += len(ids_)
        tally["samples"] += len(record.samples)
        tally["rank_sum"] += sum(rr)
        tally["ll_sum"] += sum(record.likelihood_rewards)
        tally["rewards"] += len(rr)
        pos = set(record.positive_ids)
        pos_r = [r for c, r in zip(ids_, rr) if c in pos]
        if pos_r:
            tally["with_pos"] += 1
            others = [r for c, r in zip(ids_, rr) if c not in pos]
            tally["top"] += int(not others or max(pos_r) >= max(others))
    return tally


#: Fields a compact labelled record drops: they are resolved again from the queries and corpus.
_TEXT_FIELDS = ("query", "answer", "candidates")


def compact_labelled(labelled: PathLike, out: PathLike) -> int:
    """Write ``labelled`` without its texts: ids, rewards, samples and likelihoods only.

    The compact file is what the project keeps under version control (the texts are already in
    the queries and corpus files, and some corpora may not be redistributed); each record has
    ``candidate_ids`` in place of ``candidates`` and no ``query``/``answer``.
    :func:`expand_labelled` restores the full file byte for byte. Returns the record count.

    Example:
        >>> compact_labelled("work/qa.jsonl", "labels/qa.jsonl")
        784
    """
    rows = []
    for _, obj, record in iter_labelled(labelled):
        row = {"query_id": record.query_id, "task": record.task,
               "candidate_ids": [c["id"] for c in record.candidates]}
        row.update((k, v) for k, v in obj.items() if k not in _TEXT_FIELDS and k not in row)
        rows.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    atomic_write_text(out, "".join(rows))
    return len(rows)


def expand_labelled(compact: PathLike, queries: Any, corpus: Any, out: PathLike, *,
                    query_ids: Optional[Iterable[str]] = None) -> int:
    """Rebuild the full labelled file from a compact one (:func:`compact_labelled`), taking the
    query texts, desired outputs and candidate texts from ``queries`` and ``corpus`` (paths or
    lists). ``query_ids`` keeps only those queries. A query or candidate id that is not in the
    data is a DataError naming the compact file and line: the labels belong to other data.
    Returns the record count.

    Example:
        >>> expand_labelled("labels/qa.jsonl", "qa/queries.train.jsonl", "qa/corpus.jsonl",
        ...                 "out/qa.labels.jsonl")
    """
    queries, corpus, _, _ = _load_inputs(queries, corpus, require_answers=False)
    by_query = {q.id: q for q in queries}
    texts = {p.id: p.full_text for p in corpus}
    texts[""] = ""
    keep = None if query_ids is None else set(query_ids)
    rows = []
    for number, obj in iter_jsonl(compact):
        qid = obj.get("query_id")
        if keep is not None and qid not in keep:
            continue
        ids = obj.get("candidate_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(compact, number, "field 'candidate_ids' must be a list of strings: "
                                             "is this a compact labelled file?")
        if qid not in by_query:
            raise DataError(compact, number, f"query {qid!r} is not in the queries file: these "
                                             f"labels were made for other data")
        missing = [i for i in ids if i not in texts]
        if missing:
            raise DataError(compact, number, f"candidate {missing[0]!r} is not in the corpus: "
                                             f"these labels were made for another corpus")
        q = by_query[qid]
        full = {"query_id": qid, "task": obj.get("task"), "query": q.text,
                "answer": next((a.strip() for a in q.answers if a.strip()), ""),
                "candidates": [{"id": i, "text": texts[i]} for i in ids]}
        full.update((k, v) for k, v in obj.items() if k not in full and k != "candidate_ids")
        parse_labelled(full, compact, number)  # the same checks as a labelled file
        rows.append(json.dumps(full, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(rows))
    return len(rows)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def reward_report(path: PathLike) -> Dict[str, Any]:
    """How much each reward in a labelled file can tell candidates apart, per query on average.

    For every registered reward: ``distinct`` (distinct reward values among a query's
    candidates, the empty context included), ``spread`` (their standard deviation) and
    ``positive_on_top`` (share of queries with positives where a positive gets the top reward).
    For the LLM's rank-aware reward, ``distinct_ranks`` counts the distinct ranks of the desired
    output among the samples (the reward without its margin), and ``samples`` / ``with_context``
    the samples per query and the share drawn with a retrieved candidate as context. Records of
    the ``labels`` method (1/0 rewards) are left out.

    Example:
        >>> reward_report("labels/qa.jsonl")["rank"]["distinct_ranks"]
        5.2
    """
    per: Dict[str, Dict[str, List[float]]] = {name: {"distinct": [], "spread": [], "top": []}
                                              for name in REWARDS}
    ranks: List[int] = []
    samples: List[int] = []
    with_context: List[float] = []
    for _, obj, record in iter_labelled(path):
        if obj.get("method") != "llm":
            continue
        ids = [c["id"] for c in record.candidates]
        positives = set(record.positive_ids)
        for name, reward in REWARDS.items():
            values = np.asarray(obj.get(reward.field, []), dtype=np.float64)
            if len(values) != len(ids):
                continue
            per[name]["distinct"].append(len(np.unique(values)))
            per[name]["spread"].append(float(values.std()))
            if positives:
                best = values.max()
                per[name]["top"].append(float(any(v == best for c, v in zip(ids, values)
                                                  if c in positives)))
        table = obj.get("sample_likelihoods") or []
        if table and len(table[0]):
            sampled = np.asarray(table, dtype=np.float64)
            target = np.asarray(record.likelihood_rewards, dtype=np.float64)[:, None]
            rank = (sampled > target).sum(1) * 2 + (sampled == target).sum(1)
            ranks.append(len(np.unique(rank)))
        samples.append(len(record.samples))
        contexts = obj.get("sample_contexts") or []
        if contexts:
            with_context.append(sum(1 for c in contexts if c) / len(contexts))
    report: Dict[str, Any] = {"queries": len(samples), "samples": _mean(samples),
                              "with_context": _mean(with_context), "distinct_ranks": _mean(ranks)}
    for name, values in per.items():
        report[name] = {"distinct": _mean(values["distinct"]),
                        "spread": _mean(values["spread"]),
                        "positive_on_top": _mean(values["top"])}
    return report


def merge_labelled(shard_files: Sequence[PathLike], out: PathLike, *,
                   order: Optional[Sequence[str]] = None) -> int:
    """Merge labelled shard files into ``out`` (written atomically); returns the record count.

    Records are interleaved round-robin (shard 0's first, shard 1's first, ...), which restores
    the original query order of a ``shard``/``num_shards`` split when every shard wrote every
    one of its queries. When some were skipped (the ``labels`` method skips queries without
    positives) pass ``order``, the query ids in their original order, and the records follow
    it (ids not in ``order`` go last, in round-robin order). Either way the merge of complete
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
        for number, raw_line in enumerate(complete.splitlines(), start=1):
            line = decode_line(raw_line, path, number)
            if not line.strip():
                continue
            record = parse_labelled(parse_json_object(line, path, number), path, number)
            lines.append((record.query_id, line))
        per_shard.append(lines)
    seen: Dict[str, str] = {}
    merged: List[Tuple[str, str]] = []
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
                merged.append((qid, line))
    if order is not None:
        position = {qid: k for k, qid in enumerate(order)}
        merged.sort(key=lambda item: position.get(item[0], len(position)))  # stable
    atomic_write_text(out, "".join(line + "\n" for _, line in merged))
    return len(merged)


__all__ = ["REWARDS", "LabelSummary", "Reward", "get_reward", "label", "merge_labelled",
           "compact_labelled", "expand_labelled", "register_reward", "reward_report"]
