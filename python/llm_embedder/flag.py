"""FlagEmbedding's fine-tuning data to and from this package's files (``llm-embedder convert``).

A FlagEmbedding training file is JSONL, one query a line::

    {"query": str, "pos": [str], "neg": [str],
     "pos_scores": [float]?, "neg_scores": [float]?,      # teacher scores (FlagEmbedding)
     "prompt": str?, "type": str?,
     "teacher_scores": [float]?,  # LLM-Embedder: the scores of pos + neg, in that order
     "answers": [str]?, "task": str?, "history": [str]?}  # LLM-Embedder

(``history``, LLM-Embedder's memory tasks: the conversation's earlier turns are the candidates,
with ``teacher_scores`` aligned to them; FlagEmbedding reads it as ``pos=[]``, ``neg=history``.)

Directions (each a function here, each a ``convert`` command):

- :func:`flag_to_queries`: queries file + corpus file for ``llm-embedder label``. Texts are
  deduplicated into a corpus whose ids are content hashes (stable across runs and files);
  ``pos`` become ``positive_ids``, ``neg`` the query field ``negative_ids`` (kept, unused by the
  labeller, which mines its own negatives), ``answers`` stay. With ``pool="query"`` each query
  gets its own pool (its pos + neg, a ``group``), so ``label --num-negatives N`` scores exactly
  the given candidates.
- :func:`flag_to_labelled`: a labelled file from records that carry teacher scores (pos + neg
  are the candidates, the scores every reward field, method ``flag``), ready for ``train``.
- :func:`labelled_to_flag`: a labeller's output as FlagEmbedding data: candidates split into
  ``pos``/``neg`` by ``positive_ids``, a reward as ``pos_scores``/``neg_scores`` and as
  ``teacher_scores``; the empty context is left out (it has no text).
- :func:`queries_to_flag`: queries + corpus as unscored FlagEmbedding data.

Fields outside the core ones (``prompt``, ``type``, ``task``, ``query_id``, ...) travel in a
``flag`` field of the queries/labelled records and are written back by the reverse direction.

Example:
    >>> flag_to_queries("train.jsonl", "queries.jsonl", "corpus.jsonl")
    >>> # llm-embedder label --task qa --queries queries.jsonl --corpus corpus.jsonl --out l.jsonl
    >>> labelled_to_flag("l.jsonl", "train.scored.jsonl", queries="queries.jsonl")
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .data import (
    DataError,
    LabelledQuery,
    Query,
    _string_list,
    iter_jsonl,
    load_corpus,
    load_labelled,
    load_queries,
)
from .io import write_jsonl

PathLike = Union[str, "os.PathLike[str]"]

#: Fields rebuilt by every conversion; any other field of a record travels in ``flag``.
_CORE = ("query", "pos", "neg", "pos_scores", "neg_scores", "teacher_scores", "history")
#: Where a FlagEmbedding record may carry its id (LLM-Embedder writes query_id, ToolBench qid).
_ID_FIELDS = ("query_id", "qid", "id")


@dataclass
class FlagRecord:
    """One FlagEmbedding line, validated: candidates are ``pos + neg`` (``history`` turns are
    ``neg`` with ``from_history``), scores aligned with them or None.

    Example:
        >>> record = read_flag("train.jsonl")[0]
        >>> record.pos, record.pos_scores
        (['Paris is the capital of France.'], [0.9])
    """

    id: str
    line: int
    query: str
    pos: List[str]
    neg: List[str]
    pos_scores: Optional[List[float]] = None
    neg_scores: Optional[List[float]] = None
    answers: List[str] = field(default_factory=list)
    from_history: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # every non-core field, as given

    @property
    def scored(self) -> bool:
        """Whether the record carries teacher scores."""
        return self.pos_scores is not None


@dataclass
class ConvertSummary:
    """What a conversion wrote (printed by ``llm-embedder convert``)."""

    records: int
    outputs: List[str]
    passages: int = 0
    duplicates_dropped: int = 0
    without_answers: int = 0
    max_negatives: int = 0
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.records} record(s) to {', '.join(self.outputs)}"]
        if self.passages:
            lines.append(f"  corpus: {self.passages} passage(s)")
        if self.duplicates_dropped:
            lines.append(f"  {self.duplicates_dropped} candidate(s) repeated within a record "
                         f"left out (the first copy kept)")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def passage_id(text: str, group: Optional[str] = None) -> str:
    """A stable id for a text (within ``group``, when given): the same text always gets the
    same id, in every file and run.

    Example:
        >>> passage_id("Paris is the capital of France.")
        'pee6ee5bbaa3d3af8'
    """
    key = text if group is None else f"{group}\x1f{text}"
    return "p" + hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()


# ----------------------------------------------------------------------------- reading


def _strings(obj: Dict[str, Any], name: str, path: PathLike, line: int) -> List[str]:
    """data.py's list-of-strings field check, plus: texts (all but answers) must not be empty."""
    values = _string_list(obj, name, path, line)
    if name != "answers":
        for i, item in enumerate(values):
            if not item.strip():
                raise DataError(path, line, f"field '{name}'[{i}] is empty")
    return values


def _scores(obj: Dict[str, Any], name: str, n: int, what: str, path: PathLike,
            line: int) -> Optional[List[float]]:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(path, line, f"field '{name}' must be a list of numbers, got "
                                    f"{type(value).__name__}")
    if len(value) != n:
        raise DataError(path, line, f"field '{name}' has {len(value)} score(s) for {n} {what}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(path, line, f"field '{name}'[{i}] must be a finite number, got "
                                        f"{v!r}")
    return [float(v) for v in value]


def parse_flag(obj: Dict[str, Any], path: PathLike, line: int, index: int) -> FlagRecord:
    """Validate one FlagEmbedding object (the ``index``-th record, for its default id ``q<index>``);
    DataError naming file, line and field.

    Example:
        >>> parse_flag({"query": "q?", "pos": ["a"], "neg": ["b"]}, "t.jsonl", 1, 0).neg
        ['b']
    """
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(path, line, "field 'query' must be a non-empty string"
                        if "query" in obj else "missing field 'query'")
    pos, neg = _strings(obj, "pos", path, line), _strings(obj, "neg", path, line)
    history = _strings(obj, "history", path, line)
    from_history = "history" in obj and obj["history"] is not None
    if from_history and (pos or neg):
        raise DataError(path, line, "give either 'history' (a conversation's turns) or "
                                    "'pos'/'neg', not both")
    if from_history:
        neg = history
    n = len(pos) + len(neg)
    teacher = _scores(obj, "teacher_scores", n, "candidates (pos + neg)" if not from_history
                      else "history turns", path, line)
    pos_scores = _scores(obj, "pos_scores", len(pos), "pos texts", path, line)
    neg_scores = _scores(obj, "neg_scores", len(neg), "neg texts", path, line)
    if (pos_scores is None) != (neg_scores is None) and pos and neg:
        given, missing = (("pos_scores", "neg_scores") if neg_scores is None
                          else ("neg_scores", "pos_scores"))
        raise DataError(path, line, f"field '{given}' without '{missing}': give both")
    if pos_scores is not None or neg_scores is not None:
        split = (pos_scores or []) + (neg_scores or [])
        if teacher is not None and teacher != split:
            raise DataError(path, line, "fields 'teacher_scores' and 'pos_scores'/'neg_scores' "
                                        "disagree: keep one")
        teacher = split
    rid = next((obj[k] for k in _ID_FIELDS if obj.get(k) is not None), f"q{index}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise DataError(path, line, f"the record id must be a string or an integer, got "
                                    f"{rid!r}")
    return FlagRecord(
        id=str(rid), line=line, query=query, pos=pos, neg=neg,
        pos_scores=None if teacher is None else teacher[:len(pos)],
        neg_scores=None if teacher is None else teacher[len(pos):],
        answers=_strings(obj, "answers", path, line), from_history=from_history,
        extra={k: v for k, v in obj.items() if k not in _CORE})


def read_flag(path: PathLike) -> List[FlagRecord]:
    """Every record of a FlagEmbedding JSONL file, validated; ids must be unique.

    Example:
        >>> [record.id for record in read_flag("train.jsonl")]
        ['q0', 'q1']
    """
    records: List[FlagRecord] = []
    seen: Dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        record = parse_flag(obj, path, line, len(records))
        if record.id in seen:
            raise DataError(path, line, f"duplicate record id {record.id!r} (first on line "
                                        f"{seen[record.id]}): ids come from "
                                        f"{'/'.join(_ID_FIELDS)}")
        seen[record.id] = line
        records.append(record)
    if not records:
        raise DataError(path, None, "no records in file")
    return records


# ----------------------------------------------------------------------------- FlagEmbedding ->


def _candidates(record: FlagRecord) -> Tuple[List[Dict[str, str]], List[float], List[str], int]:
    """``record``'s candidates ({id, text}; history turns get ids within the query's own group),
    their scores (empty when unscored), the positive ids and how many repeats were left out."""
    group = record.id if record.from_history else None
    scores = (record.pos_scores or []) + (record.neg_scores or [])
    out: List[Dict[str, str]] = []
    kept: List[float] = []
    seen = set()
    positive_ids: List[str] = []
    for i, text in enumerate(record.pos + record.neg):
        pid = passage_id(text, group)
        if pid in seen:
            continue
        seen.add(pid)
        out.append({"id": pid, "text": text})
        if scores:
            kept.append(scores[i])
        if i < len(record.pos):
            positive_ids.append(pid)
    return out, kept, positive_ids, len(record.pos) + len(record.neg) - len(out)


def flag_to_queries(flag_path: PathLike, queries_out: PathLike, corpus_out: PathLike, *,
                    pool: str = "shared") -> ConvertSummary:
    """Write a queries file and a corpus file (the formats of ``label``) from FlagEmbedding data.

    ``pool="shared"``: one deduplicated corpus of every pos/neg text; the labeller mines
    negatives from all of it (the query's ``negative_ids`` are kept for reference).
    ``pool="query"``: each query's own pos + neg form its pool (corpus ``group`` = query id), so
    ``label --num-negatives N`` (N >= the most negatives of a query, printed) scores exactly the
    given candidates. ``history`` records always get their own pool (their conversation).

    Example:
        >>> print(flag_to_queries("train.jsonl", "queries.jsonl", "corpus.jsonl"))
        wrote 2 record(s) to queries.jsonl, corpus.jsonl
    """
    if pool not in ("shared", "query"):
        raise ValueError(f"pool must be 'shared' or 'query', got {pool!r}")
    records = read_flag(flag_path)
    corpus: Dict[str, Dict[str, Any]] = {}
    queries: List[Dict[str, Any]] = []
    summary = ConvertSummary(records=len(records), outputs=[os.fspath(queries_out),
                                                            os.fspath(corpus_out)])
    for record in records:
        group = record.id if (record.from_history or pool == "query") else None
        ids = []
        for text in record.pos + record.neg:
            pid = passage_id(text, group)
            ids.append(pid)
            entry = {"id": pid, "text": text}
            if group is not None:
                entry["group"] = group
            corpus.setdefault(pid, entry)
        positive_ids = list(dict.fromkeys(ids[:len(record.pos)]))
        negative_ids = [i for i in dict.fromkeys(ids[len(record.pos):])
                        if i not in positive_ids]
        summary.duplicates_dropped += len(ids) - len(positive_ids) - len(negative_ids)
        summary.max_negatives = max(summary.max_negatives, len(negative_ids))
        row: Dict[str, Any] = {"id": record.id, "text": record.query, "answers": record.answers,
                               "positive_ids": positive_ids, "negative_ids": negative_ids}
        if group is not None:
            row["group"] = group
        # Always there, {} included: it marks the query as FlagEmbedding's for the way back.
        row["flag"] = {k: v for k, v in record.extra.items() if k != "answers"}
        summary.without_answers += not any(a.strip() for a in record.answers)
        queries.append(row)
    if not corpus:
        raise DataError(flag_path, None, "no 'pos', 'neg' or 'history' texts in any record: "
                                         "there is nothing to put in the corpus")
    write_jsonl(corpus_out, list(corpus.values()))
    write_jsonl(queries_out, queries)
    summary.passages = len(corpus)
    if summary.without_answers:
        summary.notes.append(f"{summary.without_answers} quer(y/ies) without 'answers': "
                             f"`label --method llm` needs a desired output per query "
                             f"(`--method labels` does not)")
    if pool == "query":
        summary.notes.append(f"label with --num-negatives {summary.max_negatives} to score "
                             f"every given negative")
    return summary


def flag_to_labelled(flag_path: PathLike, out: PathLike, *, task: Optional[str] = None,
                     unscored: str = "error") -> ConvertSummary:
    """Write a labelled file (what ``label`` writes, what ``train`` reads) from FlagEmbedding
    records with teacher scores: pos + neg are the candidates (ids as :func:`flag_to_queries`
    gives them), the scores fill every registered reward field, method ``flag``.

    ``task``: the registered task the records train (default: each record's ``task`` field).
    ``unscored``: ``error`` (a record without scores is a DataError) or ``labels`` (1.0 for
    pos, 0.0 for neg, as ``label --method labels`` gives).

    Example:
        >>> print(flag_to_labelled("train.scored.jsonl", "qa.labels.jsonl", task="qa"))
        wrote 2 record(s) to qa.labels.jsonl
    """
    from .label import REWARDS
    from .tasks import get_task

    if unscored not in ("error", "labels"):
        raise ValueError(f"unscored must be 'error' or 'labels', got {unscored!r}")
    if task is not None:
        get_task(task)  # a ValueError listing the known tasks
    records = read_flag(flag_path)
    rows: List[Dict[str, Any]] = []
    summary = ConvertSummary(records=len(records), outputs=[os.fspath(out)])
    for record in records:
        name = task or record.extra.get("task")
        if not isinstance(name, str) or not name:
            raise DataError(flag_path, record.line, "no field 'task': pass --task NAME (a "
                                                    "registered task) for the whole file")
        try:
            get_task(name)
        except ValueError as exc:
            raise DataError(flag_path, record.line, f"field 'task': {exc} (pass --task, or "
                                                    f"register it with --tasks-file)") from None
        candidates, scores, positive_ids, dropped = _candidates(record)
        if not candidates:
            raise DataError(flag_path, record.line, "no candidates: 'pos', 'neg' and "
                                                    "'history' are all empty")
        method = "flag"
        if not record.scored:
            if unscored == "error":
                raise DataError(flag_path, record.line,
                                "no teacher scores ('pos_scores'/'neg_scores' or "
                                "'teacher_scores'): convert --to queries and score with "
                                "`llm-embedder label`, or pass --unscored labels")
            scores = [1.0 if c["id"] in positive_ids else 0.0 for c in candidates]
            method = "labels"
        summary.duplicates_dropped += dropped
        rewards = {reward.field: list(scores) for reward in REWARDS.values()}
        answer = next((a.strip() for a in record.answers if a.strip()), "")
        extra: Dict[str, Any] = {k: v for k, v in rewards.items()
                                 if k not in ("likelihood_rewards", "rank_rewards")}
        extra["method"] = method
        extra["flag"] = (dict(record.extra, answers=record.answers)
                         if "answers" in record.extra else dict(record.extra))
        rows.append(LabelledQuery(
            query_id=record.id, task=name, query=record.query, answer=answer,
            candidates=candidates, likelihood_rewards=rewards["likelihood_rewards"],
            rank_rewards=rewards["rank_rewards"], positive_ids=positive_ids,
            llm=method, extra=extra).to_json())
    write_jsonl(out, rows)
    return summary


# ----------------------------------------------------------------------------- -> FlagEmbedding


def _flag_line(query: str, pos: Sequence[str], neg: Sequence[str],
               scores: Optional[Tuple[List[float], List[float]]],
               extra: Dict[str, Any]) -> Dict[str, Any]:
    """A FlagEmbedding object: the core fields, then the travelling ones in their order."""
    row: Dict[str, Any] = {"query": query, "pos": list(pos), "neg": list(neg)}
    if scores is not None:
        row["pos_scores"], row["neg_scores"] = scores
        row["teacher_scores"] = scores[0] + scores[1]
    for key, value in extra.items():
        if key not in row:
            row[key] = value
    return row


def _reward_values(record: LabelledQuery, field_name: str, path: PathLike) -> List[float]:
    values = getattr(record, field_name, None) if field_name in ("likelihood_rewards",
                                                                 "rank_rewards") \
        else record.extra.get(field_name)
    if not isinstance(values, list) or len(values) != len(record.candidates):
        raise DataError(path, None, f"query {record.query_id!r} has no field {field_name!r} "
                                    f"with one value per candidate: pick another --reward")
    return [float(v) for v in values]


def _travelling(record: LabelledQuery, source: Optional[Query]) -> Dict[str, Any]:
    """The non-core fields of ``record``'s FlagEmbedding line: those it came with (kept in the
    labelled record, else in its queries file ``source``); for data that never was
    FlagEmbedding's, LLM-Embedder's ``query_id``, ``answers`` and ``task``."""
    kept = record.extra.get("flag")
    if isinstance(kept, dict):
        return dict(kept)
    if source is not None and isinstance(source.extra.get("flag"), dict):
        out = dict(source.extra["flag"])
        if source.answers:  # the queries file keeps them as its own field
            out["answers"] = source.answers
        return out
    answers = source.answers if source is not None else [record.answer] if record.answer else []
    return {"query_id": record.query_id, "answers": answers, "task": record.task}


def labelled_to_flag(labelled_path: PathLike, out: PathLike, *, reward: str = "rank",
                     queries: Optional[PathLike] = None) -> ConvertSummary:
    """Write a labelled file as FlagEmbedding data: for each query, candidates whose id is in
    ``positive_ids`` become ``pos``, the others ``neg`` (the empty context is left out), the
    ``reward`` (a name in :data:`llm_embedder.label.REWARDS`; ``rank``, what ``train`` uses by
    default) becomes ``pos_scores``/``neg_scores`` and LLM-Embedder's ``teacher_scores``. The
    record's ``task`` and ``answers`` are written too, and fields that came from FlagEmbedding
    (``prompt``, ``type``, ...) are restored: from the record, else from ``queries`` (the
    queries file it was labelled from, matched by id).

    Example:
        >>> print(labelled_to_flag("qa.labels.jsonl", "train.scored.jsonl",
        ...                        queries="queries.jsonl"))
        wrote 2 record(s) to train.scored.jsonl
    """
    from .label import get_reward

    field_name = get_reward(reward).field
    by_id = {q.id: q for q in load_queries(queries)} if queries is not None else {}
    rows = []
    for record in load_labelled(labelled_path):
        values = _reward_values(record, field_name, labelled_path)
        positive = set(record.positive_ids)
        pos, neg, pos_scores, neg_scores = [], [], [], []
        for cand, value in zip(record.candidates, values):
            if cand["id"] == "":  # the empty context: a baseline with no text to train on
                continue
            texts, scores = (pos, pos_scores) if cand["id"] in positive else (neg, neg_scores)
            texts.append(cand["text"])
            scores.append(value)
        rows.append(_flag_line(record.query, pos, neg, (pos_scores, neg_scores),
                               _travelling(record, by_id.get(record.query_id))))
    write_jsonl(out, rows)
    return ConvertSummary(records=len(rows), outputs=[os.fspath(out)])


def queries_to_flag(queries_path: PathLike, corpus_path: PathLike,
                    out: PathLike) -> ConvertSummary:
    """Write a queries file (with its corpus) as unscored FlagEmbedding data: the texts of
    ``positive_ids`` as ``pos``, of ``negative_ids`` (when a query has them) as ``neg``, and the
    ``answers``; fields that came from FlagEmbedding are restored.

    Example:
        >>> print(queries_to_flag("queries.jsonl", "corpus.jsonl", "train.jsonl"))
        wrote 2 record(s) to train.jsonl
    """
    texts = {p.id: p.text for p in load_corpus(corpus_path)}
    rows = []
    for query in load_queries(queries_path):
        sides = []
        for name, ids in (("positive_ids", query.positive_ids),
                          ("negative_ids", query.extra.get("negative_ids") or [])):
            if not isinstance(ids, list):
                raise DataError(queries_path, None, f"query {query.id!r}: field {name!r} must "
                                                    f"be a list of ids")
            missing = [i for i in ids if str(i) not in texts]
            if missing:
                raise DataError(queries_path, None, f"query {query.id!r}: {name} {missing[:3]} "
                                                    f"not in the corpus {os.fspath(corpus_path)}")
            sides.append([texts[str(i)] for i in ids])
        travelling = query.extra.get("flag")
        extra: Dict[str, Any] = (dict(travelling) if isinstance(travelling, dict)
                                 else {"query_id": query.id})
        if query.answers or not isinstance(travelling, dict):
            extra["answers"] = query.answers
        rows.append(_flag_line(query.text, sides[0], sides[1], None, extra))
    write_jsonl(out, rows)
    return ConvertSummary(records=len(rows), outputs=[os.fspath(out)])


__all__ = ["ConvertSummary", "FlagRecord", "flag_to_labelled", "flag_to_queries",
           "labelled_to_flag", "parse_flag", "passage_id", "queries_to_flag", "read_flag"]
