"""BEIR-style evaluation: full-corpus retrieval scored with graded nDCG@10 and Recall@100.

Reads a BEIR folder (``corpus.jsonl`` with ``_id``/``title``/``text``, ``queries.jsonl`` with
``_id``/``text``, ``qrels/<split>.tsv`` with the header ``query-id corpus-id score``) or the
project's own layout (``corpus.jsonl`` with ``id``/``title``/``text`` and
``queries.<split>.jsonl`` whose ``positive_ids`` are relevance grade 1), so the same numbers come
out for any BEIR set on disk and for ``../shared/data/qa/scifact``. Bad input raises
:class:`~llm_embedder.data.DataError` naming the file, the line and the field.

Every query is ranked against the whole corpus, as BEIR does: BM25 (:class:`BM25Index`), and
the encoders with exact top-k (the native kernel) over keys encoded once per system. Documents
are ``"title text"`` (BEIR's join). Metrics follow BEIR / pytrec_eval: nDCG@10 with the grade as
gain, a log2(rank + 1) discount and the ideal ranking taken from the qrels; Recall@100 over the
documents of grade >= 1. Only queries of the split's qrels with at least one such document are
scored, and a document whose id equals the query's id is left out of its ranking (BEIR's
``ignore_identical_ids``). Ties keep the native top-k order (lower corpus position first),
where pytrec_eval would order them by document id: identical scores are rare for real models.

Systems: ``bm25``; ``base_noinstr`` (the packaged encoder, no instruction); ``base`` (the same
with the task's instructions); ``trained_noinstr`` and ``trained`` (a model folder, without and
with instructions: a trained model has to beat the better of the two bases, and the
instruction-free number shows what it learned apart from its instructions).

Example:
    >>> results = evaluate_beir("datasets/scifact", split="test", systems=["bm25"])
    >>> results["systems"]["bm25"]["ndcg@10"]
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .data import (
    DataError,
    Passage,
    PathLike,
    Query,
    _string,
    _unique_id,
    decode_line,
    iter_jsonl,
    load_corpus,
    load_queries,
)
from .io import atomic_write_json, atomic_write_text

#: Systems :func:`evaluate_beir` knows, in table order.
BEIR_SYSTEMS = ("bm25", "base_noinstr", "base", "trained_noinstr", "trained")
#: The systems that encode with a model folder (``model``), not the base encoder.
_TRAINED_SYSTEMS = ("trained_noinstr", "trained")
NDCG_K = 10
RECALL_K = 100
#: Qrels maps a query id to ``{document id: relevance grade}``.
Qrels = Dict[str, Dict[str, int]]

_QRELS_HEADER = ("query-id", "corpus-id", "score")
# BM25 scores a block of queries against the whole corpus at once: at most this many floats.
_BM25_BLOCK_FLOATS = 1 << 24
_DENSE_BLOCK = 1024


@dataclass
class BeirData:
    """One split of a retrieval dataset: the corpus, the scored queries and their graded qrels.

    ``queries`` holds only the queries with a relevant document (grade >= 1) in ``qrels``, in
    the order of the queries file; ``skipped`` counts the qrels queries without one.
    Published BEIR sets are not always consistent (ArguAna's test qrels name a document that
    is not in its corpus, NFCorpus's name queries that are not in its queries file), so
    :func:`load_beir` reads them as pytrec_eval scores them and counts what it met:
    ``unknown_queries``, qrels query ids without a query (dropped: there is no text to rank),
    and ``unknown_documents``, relevant (query, document) pairs whose document is not in the
    corpus (kept: unretrievable, they lower the query's nDCG and recall as they do in BEIR).

    Example:
        >>> data = load_beir("datasets/scifact", "test")
        >>> len(data.queries), len(data.corpus)
        (300, 5183)
    """

    name: str
    split: str
    corpus: List[Passage]
    queries: List[Query]
    qrels: Qrels
    skipped: int = 0
    unknown_queries: int = 0
    unknown_documents: int = 0


# ----------------------------------------------------------------------------- readers

def load_beir_corpus(path: PathLike) -> List[Passage]:
    """Read a BEIR ``corpus.jsonl`` (``{"_id", "title"?, "text", "metadata"?}``); ids unique.

    ``text`` may be empty (some BEIR corpora have title-only or blank documents: they are kept
    so qrels naming them stay valid, and score zero for every system).

    Example:
        >>> load_beir_corpus("scifact/corpus.jsonl")[0].title
    """
    passages: List[Passage] = []
    seen: Dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        pid = _unique_id(seen, _string(obj, "_id", path, line, integer=True), "_id", path, line)
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(path, line, f"field 'title' must be a string, got "
                                        f"{type(title).__name__}")
        passages.append(Passage(id=pid, text=_string(obj, "text", path, line, non_empty=False),
                                title=title or None, extra=obj.get("metadata") or {}))
    if not passages:
        raise DataError(path, None, "corpus is empty")
    return passages


def load_beir_queries(path: PathLike) -> List[Query]:
    """Read a BEIR ``queries.jsonl`` (``{"_id", "text", "metadata"?}``); ids unique.

    Example:
        >>> load_beir_queries("scifact/queries.jsonl")[0].text
    """
    queries: List[Query] = []
    seen: Dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        qid = _unique_id(seen, _string(obj, "_id", path, line, integer=True), "_id", path, line)
        queries.append(Query(id=qid, text=_string(obj, "text", path, line),
                             extra=obj.get("metadata") or {}))
    if not queries:
        raise DataError(path, None, "no queries in file")
    return queries


def load_qrels(path: PathLike, query_ids: Optional[Sequence[str]] = None,
               doc_ids: Optional[Sequence[str]] = None) -> Qrels:
    """Read a BEIR qrels TSV (``query-id<TAB>corpus-id<TAB>score``, header line first) into
    ``{query id: {document id: grade}}``.

    A first line whose score is not an integer is the header and is skipped. ``query_ids`` /
    ``doc_ids``, when given, are the known ids: a line naming another is a DataError (file,
    line, column), as is a pair listed twice with different grades.

    Example:
        >>> load_qrels("scifact/qrels/test.tsv")["1"]
        {'31715818': 1}
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "qrels file not found")
    known_queries = None if query_ids is None else set(query_ids)
    known_docs = None if doc_ids is None else set(doc_ids)
    qrels: Qrels = {}
    where: Dict[Tuple[str, str], int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = decode_line(raw, path, number).rstrip("\r\n")
            if not text.strip():
                continue
            columns = text.split("\t")
            if len(columns) != 3:
                raise DataError(path, number, f"expected 3 tab-separated columns "
                                              f"{'/'.join(_QRELS_HEADER)}, got {len(columns)}")
            qid, did, score = (c.strip() for c in columns)
            try:
                grade = int(score)
            except ValueError:
                if number == 1:
                    continue  # the header
                raise DataError(path, number, f"column 'score' must be an integer grade, got "
                                              f"{score!r}") from None
            if not qid or not did:
                raise DataError(path, number, f"empty column "
                                              f"'{'query-id' if not qid else 'corpus-id'}'")
            if known_queries is not None and qid not in known_queries:
                raise DataError(path, number, f"query-id {qid!r} is not in the queries file")
            if known_docs is not None and did not in known_docs:
                raise DataError(path, number, f"corpus-id {did!r} is not in the corpus")
            grades = qrels.setdefault(qid, {})
            if did in grades and grades[did] != grade:
                raise DataError(path, number, f"pair ({qid!r}, {did!r}) has grade {grade} here "
                                              f"and {grades[did]} on line {where[qid, did]}")
            grades[did] = grade
            where.setdefault((qid, did), number)
    if not qrels:
        raise DataError(path, None, "no qrels in file")
    return qrels


def load_beir(folder: PathLike, split: str = "test", max_queries: Optional[int] = None
              ) -> BeirData:
    """Load ``split`` of a BEIR folder, or of a folder in the project's layout.

    BEIR: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``. The project's layout:
    ``corpus.jsonl`` (``id``) and ``queries.<split>.jsonl``, each query's ``positive_ids``
    being its relevant documents (grade 1). ``max_queries`` keeps the first scored queries.
    BEIR qrels naming a query or document the folder lacks are warned about and counted, not
    refused (see :class:`BeirData`); in the project's layout such a positive is a DataError.

    Example:
        >>> data = load_beir("../shared/data/qa/scifact", split="train", max_queries=50)
        >>> len(data.queries)
        50
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected a BEIR folder with "
                                f"corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")
    if max_queries is not None and (isinstance(max_queries, bool) or max_queries < 1):
        raise ValueError(f"max_queries must be >= 1, got {max_queries!r}")
    qrels_path = root / "qrels" / f"{split}.tsv"
    own_queries = root / f"queries.{split}.jsonl"
    unknown_queries = unknown_documents = 0
    if qrels_path.is_file():
        corpus = load_beir_corpus(root / "corpus.jsonl")
        queries = load_beir_queries(root / "queries.jsonl")
        qrels = load_qrels(qrels_path)
        qrels, unknown_queries, unknown_documents = _reconcile_qrels(
            qrels_path, qrels, {q.id for q in queries}, {p.id for p in corpus})
    elif own_queries.is_file():
        corpus = load_corpus(root / "corpus.jsonl")
        queries = load_queries(own_queries)
        known = {p.id for p in corpus}
        qrels = {}
        for query in queries:
            missing = [pid for pid in query.positive_ids if pid not in known]
            if missing:
                line = next(n for n, obj in iter_jsonl(own_queries) if obj.get("id") == query.id)
                raise DataError(own_queries, line, f"field 'positive_ids' names "
                                                   f"{missing[:3]}, not in the corpus")
            if query.positive_ids:
                qrels[query.id] = {pid: 1 for pid in query.positive_ids}
    else:
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) + sorted(
            p.name[len("queries."):-len(".jsonl")] for p in root.glob("queries.*.jsonl"))
        raise FileNotFoundError(f"{root}: split {split!r} has neither {qrels_path.name} under "
                                f"qrels/ (BEIR) nor {own_queries.name}; splits here: "
                                f"{splits or 'none'}")
    scored = [q for q in queries if any(g > 0 for g in qrels.get(q.id, {}).values())]
    skipped = sum(1 for grades in qrels.values() if not any(g > 0 for g in grades.values()))
    if not scored:
        raise DataError(qrels_path if qrels_path.is_file() else own_queries, None,
                        "no query has a relevant document (grade >= 1)")
    if max_queries is not None:
        scored = scored[:max_queries]
    return BeirData(root.resolve().name, split, corpus, scored,
                    {q.id: qrels[q.id] for q in scored}, skipped, unknown_queries,
                    unknown_documents)


def _reconcile_qrels(path: Path, qrels: Qrels, query_ids: Set[str], doc_ids: Set[str]
                     ) -> Tuple[Qrels, int, int]:
    """Qrels without the query ids that have no query, the number of those ids, and the number
    of relevant pairs whose document is not in the corpus; a warning names both, with examples.
    """
    missing_queries = sorted(qid for qid in qrels if qid not in query_ids)
    missing_docs = sorted((qid, did) for qid, grades in qrels.items() if qid in query_ids
                          for did, grade in grades.items() if grade > 0 and did not in doc_ids)
    if missing_queries:
        warnings.warn(f"{path}: {len(missing_queries)} query-id(s) are not in the queries file "
                      f"(e.g. {missing_queries[:3]}); their qrels are left out", stacklevel=3)
    if missing_docs:
        warnings.warn(f"{path}: {len(missing_docs)} relevant pair(s) name a corpus-id that is "
                      f"not in the corpus (e.g. {missing_docs[:3]}); they stay relevant and "
                      f"cannot be retrieved, as pytrec_eval scores them", stacklevel=3)
    kept = {qid: grades for qid, grades in qrels.items() if qid in query_ids}
    return kept, len(missing_queries), len(missing_docs)


def document_text(passage: Passage) -> str:
    """The text a document is retrieved by: ``"title text"``, as BEIR joins them.

    Example:
        >>> document_text(Passage(id="1", text="Cats purr.", title="Cats"))
        'Cats Cats purr.'
    """
    return f"{passage.title} {passage.text}".strip() if passage.title else passage.text.strip()


# ----------------------------------------------------------------------------- metrics

def graded_ndcg_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int = NDCG_K) -> float:
    """nDCG@k with graded gains as pytrec_eval computes it: DCG = sum of grade/log2(rank + 1)
    over the top ``k``, divided by the DCG of the qrels' grades sorted best first.

    Example:
        >>> round(graded_ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, 10), 4)
        0.8597
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dcg = sum(max(grades.get(doc, 0), 0) / math.log2(rank + 1)
              for rank, doc in enumerate(ranked[:k], start=1))
    best = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(rank + 1) for rank, g in enumerate(best, start=1))
    if ideal == 0:
        raise ValueError("a query without a relevant document (grade >= 1) has no nDCG")
    return dcg / ideal


def graded_recall_at_k(ranked: Sequence[str], grades: Mapping[str, int],
                       k: int = RECALL_K) -> float:
    """Share of the relevant documents (grade >= 1) in the top ``k`` (pytrec_eval's recall).

    Example:
        >>> graded_recall_at_k(["a", "c"], {"a": 2, "b": 1, "z": 0}, 100)
        0.5
    """
    relevant = {doc for doc, g in grades.items() if g > 0}
    if not relevant:
        raise ValueError("a query without a relevant document (grade >= 1) has no recall")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def score_rankings(data: BeirData, rankings: Sequence[Sequence[str]]
                   ) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Mean nDCG@10 and Recall@100 over ``data.queries`` (``rankings[i]`` ranks query i), and
    the same per query id.

    Example:
        >>> means, per_query = score_rankings(data, rank_bm25(data))
    """
    if len(rankings) != len(data.queries):
        raise ValueError(f"{len(rankings)} rankings for {len(data.queries)} queries")
    per_query = {}
    for query, ranked in zip(data.queries, rankings):
        grades = data.qrels[query.id]
        per_query[query.id] = {f"ndcg@{NDCG_K}": graded_ndcg_at_k(ranked, grades, NDCG_K),
                               f"recall@{RECALL_K}": graded_recall_at_k(ranked, grades,
                                                                        RECALL_K)}
    names = (f"ndcg@{NDCG_K}", f"recall@{RECALL_K}")
    means = {name: float(np.mean([m[name] for m in per_query.values()])) for name in names}
    return means, per_query


# ----------------------------------------------------------------------------- rankings

def _ids_of(data: BeirData, rows: np.ndarray, query: Query, depth: int) -> List[str]:
    # BEIR's ignore_identical_ids: a document never counts as retrieved for itself.
    ids = [data.corpus[j].id for j in rows.tolist()]
    return [d for d in ids if d != query.id][:depth]


def rank_bm25(data: BeirData, depth: int = RECALL_K, verbose: bool = False) -> List[List[str]]:
    """Each query's top ``depth`` document ids by BM25 over the whole corpus.

    Example:
        >>> rank_bm25(load_beir("scifact"), depth=10)[0][:3]
    """
    from .retrieval import BM25Index

    index = BM25Index([document_text(p) for p in data.corpus])
    k = min(depth + 1, len(data.corpus))
    block = max(1, _BM25_BLOCK_FLOATS // len(data.corpus))
    out: List[List[str]] = []
    for start in range(0, len(data.queries), block):
        queries = data.queries[start:start + block]
        rows, _ = index.search_batch([q.text for q in queries], k)
        out += [_ids_of(data, r, q, depth) for r, q in zip(rows, queries)]
        _log(verbose, f"bm25: {len(out)}/{len(data.queries)} queries")
    return out


def _encode(model: Any, texts: List[str], task: str, side: str, instructions: bool,
            batch_size: int, max_length: int, verbose: bool) -> np.ndarray:
    return np.ascontiguousarray(model.encode(
        texts, task=task, side=side if instructions else None, batch_size=batch_size,
        max_length=max_length, show_progress_bar=verbose), dtype=np.float32)


def rank_dense(data: BeirData, model: Any, *, task: str = "qa", instructions: bool = True,
               depth: int = RECALL_K, batch_size: int = 64, query_max_length: int = 128,
               key_max_length: int = 256, verbose: bool = False) -> List[List[str]]:
    """Each query's top ``depth`` document ids by cosine similarity over the whole corpus:
    keys encoded once (``task``'s key instruction, or none), exact top-k by the native kernel.

    Empty documents get a zero vector (score 0 for every query).

    Example:
        >>> rank_dense(load_beir("scifact"), Embedder.from_pretrained(), instructions=False)
    """
    from . import _native

    texts = [document_text(p) for p in data.corpus]
    filled = [i for i, text in enumerate(texts) if text]
    encoded = _encode(model, [texts[i] for i in filled], task, "key", instructions, batch_size,
                      key_max_length, verbose)
    keys = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
    keys[filled] = encoded
    queries = _encode(model, [q.text for q in data.queries], task, "query", instructions,
                      batch_size, query_max_length, verbose)
    k = min(depth + 1, len(texts))
    out: List[List[str]] = []
    for start in range(0, len(queries), _DENSE_BLOCK):
        _, rows = _native.topk(np.ascontiguousarray(queries[start:start + _DENSE_BLOCK]), keys, k)
        out += [_ids_of(data, r, q, depth)
                for r, q in zip(rows, data.queries[start:start + _DENSE_BLOCK])]
    return out


# ----------------------------------------------------------------------------- evaluation

def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _embedder(model: Any, device: Optional[str]) -> Any:
    if model is None or isinstance(model, (str, Path)):
        from .embedder import Embedder

        return Embedder.from_pretrained(None if model is None else str(model), device=device)
    return model


def evaluate_beir(data: Union[BeirData, PathLike], *, split: str = "test", model: Any = None,
                  base_model: Any = None, systems: Optional[Sequence[str]] = None,
                  task: str = "qa", max_queries: Optional[int] = None,
                  device: Optional[str] = None, batch_size: int = 64,
                  query_max_length: int = 128, key_max_length: int = 256,
                  verbose: bool = True) -> Dict[str, Any]:
    """Full-corpus nDCG@10 and Recall@100 of each system on ``split`` of a BEIR folder.

    ``model`` (a folder or an Embedder) is the ``trained`` and ``trained_noinstr`` systems;
    ``base_model`` (None: the packaged MiniLM) the ``base`` and ``base_noinstr`` ones; ``task``
    names the instructions. ``systems``: a subset of :data:`BEIR_SYSTEMS` (None: all, the
    trained ones only with a model). ``query_max_length``, ``key_max_length``: tokens per
    query / document, instruction included (longer ones are truncated).
    Returns ``{"dataset", "split", "queries", "documents", "skipped_queries",
    "qrels_unknown_queries", "qrels_unknown_documents" (see :class:`BeirData`), "task",
    "systems": {system: {"ndcg@10", "recall@100", "seconds"}}, "per_query": {system:
    {query id: {"ndcg@10", "recall@100"}}}}``.

    Example:
        >>> evaluate_beir("scifact", model="runs/model")["systems"]["trained"]["ndcg@10"]
    """
    from .tasks import get_task

    get_task(task)
    if systems is None:
        systems = [s for s in BEIR_SYSTEMS if s not in _TRAINED_SYSTEMS or model is not None]
    unknown = [s for s in systems if s not in BEIR_SYSTEMS]
    if unknown:
        raise ValueError(f"systems {unknown} are not evaluated on BEIR data; choose from "
                         f"{list(BEIR_SYSTEMS)}")
    needs_model = [s for s in systems if s in _TRAINED_SYSTEMS]
    if needs_model and model is None:
        raise ValueError(f"system {needs_model[0]!r} needs a model (--model DIR)")
    for name, value in (("query_max_length", query_max_length),
                        ("key_max_length", key_max_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(data, BeirData):
        data = load_beir(data, split, max_queries)
    elif max_queries is not None:
        data = replace(data, queries=data.queries[:max_queries])
    _log(verbose, f"{data.name}/{data.split}: {len(data.queries)} queries, "
                  f"{len(data.corpus)} documents")
    results: Dict[str, Any] = {
        "dataset": data.name, "split": data.split, "queries": len(data.queries),
        "documents": len(data.corpus), "skipped_queries": data.skipped,
        "qrels_unknown_queries": data.unknown_queries,
        "qrels_unknown_documents": data.unknown_documents, "task": task,
        "systems": {}, "per_query": {}}
    base = trained = None
    for system in [s for s in BEIR_SYSTEMS if s in systems]:
        start = time.perf_counter()
        if system == "bm25":
            rankings = rank_bm25(data, verbose=verbose)
        else:
            if system in _TRAINED_SYSTEMS:
                trained = trained or _embedder(model, device)
                encoder = trained
            else:
                base = base or _embedder(base_model, device)
                encoder = base
            _log(verbose, f"{system}: encoding {len(data.corpus)} documents")
            rankings = rank_dense(data, encoder, task=task,
                                  instructions=not system.endswith("_noinstr"),
                                  batch_size=batch_size, query_max_length=query_max_length,
                                  key_max_length=key_max_length, verbose=verbose)
        means, per_query = score_rankings(data, rankings)
        means["seconds"] = time.perf_counter() - start
        results["systems"][system] = means
        results["per_query"][system] = per_query
        _log(verbose, f"{system}: nDCG@10 {means['ndcg@10']:.4f}, Recall@100 "
                      f"{means['recall@100']:.4f} ({means['seconds']:.1f} s)")
    return results


def beir_table(results: Mapping[str, Any], markdown: bool = False) -> str:
    """The systems of :func:`evaluate_beir`'s results as a table (system, nDCG@10, Recall@100,
    seconds), plain text or Markdown.

    Example:
        >>> print(beir_table(evaluate_beir("scifact", systems=["bm25"])))
    """
    header = ["system", "nDCG@10", "Recall@100", "seconds"]
    rows = [[name, f"{m['ndcg@10']:.4f}", f"{m['recall@100']:.4f}", f"{m['seconds']:.1f}"]
            for name, m in results["systems"].items()]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|---|---:|---:|---:|",
                          *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [[c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
             for r in [header, *rows]]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(line) for line in lines)


def _title(results: Mapping[str, Any]) -> str:
    title = (f"{results['dataset']} / {results['split']}: {results['queries']} queries, "
             f"{results['documents']} documents")
    # Unretrievable relevant documents cap every system's score: the table says so.
    outside = results.get("qrels_unknown_documents", 0)
    return f"{title}, {outside} relevant qrels pair(s) outside the corpus" if outside else title


def write_beir_results(results: Mapping[str, Any], out: PathLike) -> Tuple[Path, Path]:
    """Write ``results`` as JSON and a Markdown table, as ``llm-embedder eval --out`` does:
    ``.md`` gets the Markdown and a sibling ``.json`` the JSON, any other name the JSON and a
    sibling ``.md`` the Markdown. Returns ``(json_path, markdown_path)``.

    Example:
        >>> write_beir_results(results, "eval/scifact.json")
        (PosixPath('eval/scifact.json'), PosixPath('eval/scifact.md'))
    """
    out = Path(out)
    json_path, md_path = ((out.with_suffix(".json"), out) if out.suffix.lower() == ".md"
                          else (out, out.with_suffix(".md")))
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, f"# {_title(results)}\n\n{beir_table(results, markdown=True)}\n")
    return json_path, md_path


def main_beir(folder: PathLike, *, split: str = "test", model: Optional[str] = None,
              task: str = "qa", max_queries: Optional[int] = None,
              systems: Optional[Sequence[str]] = None, device: Optional[str] = None,
              batch_size: int = 64, query_max_length: int = 128, key_max_length: int = 256,
              out: Optional[str] = None, verbose: bool = True) -> int:
    """``llm-embedder eval --beir DIR``: evaluate, print the table, optionally write the results.

    Example:
        >>> main_beir("datasets/scifact", split="test", systems=["bm25"])
        0
    """
    results = evaluate_beir(folder, split=split, model=model, systems=systems, task=task,
                            max_queries=max_queries, device=device, batch_size=batch_size,
                            query_max_length=query_max_length, key_max_length=key_max_length,
                            verbose=verbose)
    print(_title(results))
    print(beir_table(results))
    if out:
        json_path, md_path = write_beir_results(results, out)
        print(f"\nresults written to {json_path} and {md_path}")
    return 0


__all__ = ["BEIR_SYSTEMS", "BeirData", "beir_table", "document_text", "evaluate_beir",
           "graded_ndcg_at_k", "graded_recall_at_k", "load_beir", "load_beir_corpus",
           "load_beir_queries", "load_qrels", "main_beir", "rank_bm25", "rank_dense",
           "score_rankings", "write_beir_results"]
