"""JSONL schemas (the README's data formats), loading with file:line errors, bundled slices.

Every loader validates each line and raises :class:`DataError` naming the file, the line number
and the field, so a bad record is found in seconds rather than as a crash deep in training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A malformed input file; the message names the file, line and field."""

    def __init__(self, path: PathLike, line: Optional[int], message: str):
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {message}")
        self.path = os.fspath(path)
        self.line = line


@dataclass
class Passage:
    """A corpus entry: a passage, a dialogue turn, a demonstration or a tool description."""

    id: str
    text: str
    title: Optional[str] = None
    group: Optional[str] = None  # conversation/document it belongs to (memory retrieval)
    subset: Optional[str] = None  # sub-dataset, e.g. "sst2" for in-context examples
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def full_text(self) -> str:
        """The text the encoder and the LLM see (title first when there is one)."""
        return f"{self.title}: {self.text}" if self.title else self.text


@dataclass
class Query:
    """A query with its desired outputs (``answers``) and known positives, if any."""

    id: str
    text: str
    answers: List[str] = field(default_factory=list)
    positive_ids: List[str] = field(default_factory=list)
    group: Optional[str] = None
    subset: Optional[str] = None
    options: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelledQuery:
    """One line of the labeller's output: candidates with their rewards from the frozen LLM."""

    query_id: str
    task: str
    query: str
    answer: str
    candidates: List[Dict[str, str]]  # [{"id", "text"}]; the empty context has id ""
    likelihood_rewards: List[float]
    rank_rewards: List[float]
    samples: List[str] = field(default_factory=list)
    positive_ids: List[str] = field(default_factory=list)
    llm: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        out = {
            "query_id": self.query_id,
            "task": self.task,
            "query": self.query,
            "answer": self.answer,
            "candidates": self.candidates,
            "likelihood_rewards": self.likelihood_rewards,
            "rank_rewards": self.rank_rewards,
            "samples": self.samples,
            "positive_ids": self.positive_ids,
            "llm": self.llm,
        }
        out.update(self.extra)
        return out


def iter_jsonl(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line; DataError (file, line) on bad
    JSON or bytes that are not UTF-8.

    Example:
        >>> for number, obj in iter_jsonl("corpus.jsonl"):
        ...     print(number, obj["id"])
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_line(raw, path, number)
            if line.strip():
                yield number, parse_json_object(line, path, number)


def decode_line(raw: bytes, path: PathLike, number: int) -> str:
    """One line's bytes as text; DataError naming file, line and column when not UTF-8.

    Example:
        >>> decode_line(b"{}\n", "a.jsonl", 1)
        '{}\n'
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, number, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                      f"{err.start + 1}): save the file as UTF-8") from None


def parse_json_object(line: str, path: PathLike, number: int) -> Dict[str, Any]:
    """One JSONL line as a dict; DataError naming file and line otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:40]


def _string(obj: Dict[str, Any], name: str, path: PathLike, line: int, *,
            required: bool = True, non_empty: bool = True,
            integer: bool = False) -> Optional[str]:
    """Field ``name`` as a string; ``integer`` also reads an integer as its digits."""
    value = obj.get(name)
    if value is None:
        if required:
            raise DataError(path, line, f"missing field '{name}'")
        return None
    if integer and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # integer passage ids are common in public corpora
    if not isinstance(value, str):
        raise DataError(path, line, f"field '{name}' must be a string, got "
                                    f"{type(value).__name__} {_json_text(value)}")
    if non_empty and not value.strip():
        raise DataError(path, line, f"field '{name}' is empty")
    return value


def _string_list(obj: Dict[str, Any], name: str, path: PathLike, line: int) -> List[str]:
    value = obj.get(name, [])
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(path, line, f"field '{name}' must be a list of strings, got "
                                    f"{type(value).__name__} {_json_text(value)}")
    for i, item in enumerate(value):
        # Integers (numeric ids, numeric answers) read as their digits; true/1.5/null/[...]
        # would turn into text nobody wrote ("True", "1.5"), so they are errors.
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(path, line, f"field '{name}'[{i}] must be a string, got "
                                        f"{type(item).__name__} {_json_text(item)}")
    return [str(v) for v in value]


_PASSAGE_FIELDS = {"id", "text", "title", "group", "task"}
_QUERY_FIELDS = {"id", "text", "answers", "positive_ids", "group", "task", "options"}


def _unique_id(seen: Dict[str, int], value: str, field_name: str, path: PathLike,
               line: int) -> str:
    """``value`` after checking it is not already in ``seen`` (id -> first line); records it."""
    if value in seen:
        raise DataError(path, line, f"duplicate {field_name} {value!r} (first on line "
                                    f"{seen[value]})")
    seen[value] = line
    return value


def load_corpus(path: PathLike) -> List[Passage]:
    """Read a corpus JSONL (``{"id", "text", "title"?, "group"?, ...}``); ids must be unique.

    Example:
        >>> corpus = load_corpus("corpus.jsonl")
    """
    passages: List[Passage] = []
    seen: Dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        pid = _unique_id(seen, _string(obj, "id", path, line, integer=True), "id", path, line)
        passages.append(Passage(
            id=pid,
            text=_string(obj, "text", path, line),
            title=_string(obj, "title", path, line, required=False, non_empty=False) or None,
            group=_string(obj, "group", path, line, required=False, integer=True),
            subset=_string(obj, "task", path, line, required=False),
            extra={k: v for k, v in obj.items() if k not in _PASSAGE_FIELDS},
        ))
    if not passages:
        raise DataError(path, None, "corpus is empty")
    return passages


def load_queries(path: PathLike, *, require_answers: bool = False) -> List[Query]:
    """Read a queries JSONL (``{"id", "text", "answers", "positive_ids", "group"?, ...}``).

    Example:
        >>> queries = load_queries("queries.train.jsonl", require_answers=True)
    """
    queries: List[Query] = []
    seen: Dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        qid = _unique_id(seen, _string(obj, "id", path, line), "id", path, line)
        answers = _string_list(obj, "answers", path, line)
        if require_answers and not any(a.strip() for a in answers):
            raise DataError(path, line, "field 'answers' is empty: the LLM needs a desired output")
        options = obj.get("options")
        if options is not None:
            options = _string_list(obj, "options", path, line)
        queries.append(Query(
            id=qid,
            text=_string(obj, "text", path, line),
            answers=answers,
            positive_ids=_string_list(obj, "positive_ids", path, line),
            group=_string(obj, "group", path, line, required=False, integer=True),
            subset=_string(obj, "task", path, line, required=False),
            options=options,
            extra={k: v for k, v in obj.items() if k not in _QUERY_FIELDS},
        ))
    if not queries:
        raise DataError(path, None, "no queries in file")
    return queries


def _float_list(obj: Dict[str, Any], name: str, n: int, path: PathLike, line: int) -> List[float]:
    value = obj.get(name)
    if not isinstance(value, list):
        raise DataError(path, line, f"missing or non-list field '{name}'")
    if len(value) != n:
        raise DataError(path, line, f"field '{name}' has {len(value)} values for {n} candidates")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(path, line, f"field '{name}' holds a non-finite or non-number value")
        out.append(float(v))
    return out


_LABEL_FIELDS = {"query_id", "task", "query", "answer", "candidates", "likelihood_rewards",
                 "rank_rewards", "samples", "positive_ids", "llm"}


def parse_labelled(obj: Dict[str, Any], path: PathLike, line: int) -> LabelledQuery:
    """Validate one labelled-query object (see :class:`LabelledQuery`)."""
    candidates = obj.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise DataError(path, line, "field 'candidates' must be a non-empty list")
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict) or not isinstance(cand.get("id"), str) \
                or not isinstance(cand.get("text"), str):
            raise DataError(path, line,
                            f"candidates[{i}] must be an object with string 'id' and 'text'")
    n = len(candidates)
    return LabelledQuery(
        query_id=_string(obj, "query_id", path, line),
        task=_string(obj, "task", path, line),
        query=_string(obj, "query", path, line),
        answer=_string(obj, "answer", path, line, non_empty=False),
        candidates=[{"id": c["id"], "text": c["text"]} for c in candidates],
        likelihood_rewards=_float_list(obj, "likelihood_rewards", n, path, line),
        rank_rewards=_float_list(obj, "rank_rewards", n, path, line),
        samples=_string_list(obj, "samples", path, line),
        positive_ids=_string_list(obj, "positive_ids", path, line),
        llm=obj.get("llm") or "",
        extra={k: v for k, v in obj.items() if k not in _LABEL_FIELDS},
    )


def iter_labelled(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any], LabelledQuery]]:
    """Yield ``(line_number, object, record)`` for each labelled query of a labeller's file,
    once per query id.

    A last line without its newline is what a killed labeller leaves; it is skipped (the
    labeller itself cuts it on resume). A query id found again with the same content (two
    labellers that both wrote it) is skipped too; with different content it is a DataError
    naming both lines, since either could be the one training should use.

    Example:
        >>> ids = [record.query_id for _, _, record in iter_labelled("qa.labels.jsonl")]
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "labelled file not found")
    first: Dict[str, Tuple[int, Dict[str, Any]]] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                break  # a partial last line
            line = decode_line(raw, path, number)
            if not line.strip():
                continue
            obj = parse_json_object(line, path, number)
            record = parse_labelled(obj, path, number)
            if record.query_id in first:
                seen_line, seen_obj = first[record.query_id]
                if seen_obj != obj:
                    raise DataError(path, number, f"query {record.query_id!r} is labelled again, "
                                                  f"differently from line {seen_line}: keep one")
                continue
            first[record.query_id] = (number, obj)
            yield number, obj, record


def load_labelled(path: PathLike) -> List[LabelledQuery]:
    """Read the labeller's output file: one record per query id (see :func:`iter_labelled`).

    Example:
        >>> records = load_labelled("qa.labels.jsonl")
    """
    records = [record for _, _, record in iter_labelled(path)]
    if not records:
        raise DataError(path, None, "no labelled queries in file")
    return records


def candidate_pool(query: Query, corpus: Sequence[Passage]) -> List[int]:
    """Indices of the corpus entries that may serve ``query``.

    A query's ``group`` (its conversation) restricts candidates to that group; for in-context
    examples the sub-dataset (``task`` field, e.g. ``sst2``) does the same. Otherwise: all.
    """
    if query.group is not None and any(p.group is not None for p in corpus):
        return [i for i, p in enumerate(corpus) if p.group == query.group]
    if query.subset is not None and any(p.subset is not None for p in corpus):
        return [i for i, p in enumerate(corpus) if p.subset == query.subset]
    return list(range(len(corpus)))


# ----------------------------------------------------------------------------- bundled data

BUNDLED_TASK_DIRS = {"qa": "qa/xquad", "tool": "tool/gorilla", "chat": "chat/locomo",
                     "icl": "icl/fewshot5"}


def bundled_data_dir() -> Path:
    """Folder of the real-data slices shipped inside the package (for the quickstart)."""
    return Path(__file__).resolve().parent / "bundled"


def bundled_task_files(task: str) -> Dict[str, Path]:
    """``{"corpus", "train", "test"}`` paths of the bundled slice for ``task``."""
    if task not in BUNDLED_TASK_DIRS:
        raise ValueError(f"no bundled data for task {task!r}; bundled: {sorted(BUNDLED_TASK_DIRS)}")
    folder = bundled_data_dir() / BUNDLED_TASK_DIRS[task]
    files = {"corpus": folder / "corpus.jsonl", "train": folder / "queries.train.jsonl",
             "test": folder / "queries.test.jsonl"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled data missing (broken install?): {missing}")
    return files


def bundled_labels_file(task: str) -> Optional[Path]:
    """The project's compact LLM labels of ``task``'s bundled training queries
    (``bundled/labels/<task>.jsonl``, made by ``scripts/label_bundled.py``), or None.

    Example:
        >>> bundled_labels_file("qa")
        PosixPath('.../llm_embedder/bundled/labels/qa.jsonl')
    """
    path = bundled_data_dir() / "labels" / f"{task}.jsonl"
    return path if path.is_file() else None

