"""The one ranking path: a query's candidate pool ranked by BM25 or by dense scores.

Negative mining (:mod:`llm_embedder.label`) and the evaluation baselines
(:mod:`llm_embedder.evaluate`) both call :func:`rank_pool`, so a pool is ranked the same way
everywhere: the native top-k selects the best ``depth`` entries, scores descending, ties broken
by the lower position in the pool. BM25 scores come from :class:`BM25Index` (the `bm25s`
package), built once per distinct pool by a :class:`BM25Cache`.

Example:
    >>> cache = BM25Cache(["the cat sat", "dogs bark", "a cat and a dog"])
    >>> rank_pool([0, 1, 2], 2, queries=["cat"], bm25=cache).tolist()
    [[0, 2]]
    >>> rank_pool([4, 7, 9], 2, scores=np.array([[0.1, 0.5, 0.5]], np.float32)).tolist()
    [[7, 9]]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import _native

Pool = Union[Sequence[int], npt.NDArray[np.integer]]


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _top_k(scores: npt.NDArray[np.float32], k: int
           ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Best ``min(k, N)`` columns of each row of ``scores`` [Q, N] (float32): ``(columns int64,
    scores float32)``, scores descending, ties to the lower column."""
    k = min(k, scores.shape[1])
    if k == 0:
        return (np.empty((scores.shape[0], 0), dtype=np.int64),
                np.empty((scores.shape[0], 0), dtype=np.float32))
    top, columns = _native.topk_scores(scores, k)
    return columns, top


class BM25Index:
    """Okapi BM25 (Lucene variant, k1=1.5, b=0.75) over ``texts``; lowercased, English stopwords.

    Results are deterministic: scores descending, ties broken by the lower index. ``k`` larger
    than the number of texts is clipped (you get every text, ranked); ``k < 1`` is a ValueError.

    Example:
        >>> BM25Index(["red apple", "green pear"]).search("apple", k=1)[0].tolist()
        [0]
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str = "en") -> None:
        import bm25s

        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        texts = list(texts)
        if not texts:
            raise ValueError("BM25Index needs at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
        self._stopwords = stopwords
        self._retriever = bm25s.BM25(k1=k1, b=b)
        self._retriever.index(self._tokenize(texts), show_progress=False)
        self._vocab = self._retriever.vocab_dict
        self.size = len(texts)

    def __len__(self) -> int:
        return self.size

    def _tokenize(self, texts: List[str]) -> List[List[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self._stopwords, return_ids=False,
                              show_progress=False)

    def scores(self, query: str) -> npt.NDArray[np.float32]:
        """BM25 score of ``query`` against every text (float32 [n]); words unseen in the
        indexed texts are ignored, so a query with none known scores 0 everywhere.

        Example:
            >>> BM25Index(["red apple", "green pear"]).scores("pear").tolist()[0]
            0.0
        """
        tokens = [t for t in self._tokenize([query])[0] if t and t in self._vocab]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``min(k, n)`` texts for one query: ``(indices int64 [k], scores float32 [k])``.

        Example:
            >>> BM25Index(["red apple", "green pear"]).search("pear", k=5)[0].tolist()
            [1, 0]
        """
        indices, scores = _top_k(self.scores(query)[None], _check_k(k))
        return indices[0], scores[0]

    def search_batch(self, queries: Sequence[str], k: int
                     ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``min(k, n)`` for each query: ``(indices int64 [Q, k], scores float32 [Q, k])``.

        Example:
            >>> index = BM25Index(["red apple", "green pear"])
            >>> index.search_batch(["pear", "apple"], k=1)[0].tolist()
            [[1], [0]]
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings; use search() for one")
        k = _check_k(k)
        scores = np.empty((len(queries), self.size), dtype=np.float32)
        for row, query in enumerate(queries):
            scores[row] = self.scores(query)
        return _top_k(scores, k)


class BM25Cache:
    """BM25 indexes over a corpus's ``texts``, one per distinct candidate pool, built on first
    use: the only BM25 cache, shared by negative mining and evaluation.

    Example:
        >>> cache = BM25Cache(["red apple", "green pear", "apple pie"])
        >>> cache.scores([0, 2], ["apple"]).shape
        (1, 2)
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self._indexes: Dict[bytes, BM25Index] = {}

    def __len__(self) -> int:
        return len(self._indexes)

    def index(self, pool: Pool) -> BM25Index:
        """The BM25 index over the texts of ``pool`` (corpus positions), in pool order.

        Example:
            >>> BM25Cache(["a b", "c d"]).index([1]).size
            1
        """
        positions = np.asarray(pool, dtype=np.int64)
        key = positions.tobytes()
        if key not in self._indexes:
            self._indexes[key] = BM25Index([self.texts[i] for i in positions.tolist()])
        return self._indexes[key]

    def scores(self, pool: Pool, queries: Sequence[str]) -> npt.NDArray[np.float32]:
        """BM25 scores of each query against each pool entry: float32 [Q, len(pool)].

        Example:
            >>> int(BM25Cache(["red apple", "green pear"]).scores([0, 1], ["pear"]).argmax())
            1
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not one string")
        index = self.index(pool)
        scores = np.empty((len(queries), index.size), dtype=np.float32)
        for row, query in enumerate(queries):
            scores[row] = index.scores(query)
        return scores


def rank_pool(pool: Pool, depth: int, *, scores: Optional[npt.NDArray[np.float32]] = None,
              queries: Optional[Sequence[str]] = None, bm25: Optional[BM25Cache] = None
              ) -> npt.NDArray[np.int64]:
    """The best ``min(depth, len(pool))`` entries of ``pool`` for each query, best first.

    Rank either by ``scores`` (float32 [Q, len(pool)] or [len(pool)] for one query, e.g.
    dense inner products; NaN/inf are a ValueError) or by BM25 (``queries`` texts scored with
    ``bm25``, the cache over the corpus that ``pool`` indexes). Ties go to the entry earlier in
    the pool. Returns int64 [Q, min(depth, len(pool))] holding pool entries (not positions).

    Example:
        >>> rank_pool([4, 7, 9], 2, scores=np.array([0.1, 0.5, 0.5], np.float32)).tolist()
        [[7, 9]]
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    entries = np.asarray(pool, dtype=np.int64)
    if entries.ndim != 1:
        raise ValueError(f"pool must be 1-D corpus positions, got shape {entries.shape}")
    if (scores is None) == (bm25 is None):
        raise ValueError("rank_pool needs either scores= or bm25= (with queries=), not both")
    if bm25 is not None:
        if queries is None:
            raise ValueError("rank_pool(bm25=...) needs the query texts as queries=")
        scores = bm25.scores(entries, queries)
    matrix = np.asarray(scores)
    if matrix.ndim == 1:
        matrix = matrix[None]
    if matrix.ndim != 2 or matrix.shape[1] != len(entries):
        raise ValueError(f"scores must be [Q, {len(entries)}] (one column per pool entry), got "
                         f"shape {matrix.shape}")
    columns, _ = _top_k(matrix, int(depth))
    return entries[columns]


__all__ = ["BM25Cache", "BM25Index", "rank_pool"]
