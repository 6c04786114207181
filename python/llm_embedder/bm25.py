"""BM25 lexical search (the `bm25s` package), used to mine negatives and as a baseline.

Results are deterministic: scores descending, ties broken by the lower index. ``k`` larger than
the number of texts is clipped (you get every text, ranked); ``k < 1`` is a ValueError.

Example:
    >>> index = BM25Index(["the cat sat", "dogs bark", "a cat and a dog"])
    >>> indices, scores = index.search("cat", k=2)
    >>> indices.tolist()
    [0, 2]
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


class BM25Index:
    """Okapi BM25 (Lucene variant, k1=1.5, b=0.75) over ``texts``; lowercased, English stopwords.

    Example:
        >>> BM25Index(["red apple", "green pear"]).search("apple", k=1)[0].tolist()
        [0]
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str = "en"):
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

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every text (float32 [n]); words unseen in the
        indexed texts are ignored, so a query with none known scores 0 everywhere."""
        tokens = [t for t in self._tokenize([query])[0] if t and t in self._vocab]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top ``min(k, n)`` texts for one query: ``(indices int64 [k], scores float32 [k])``.

        Example:
            >>> BM25Index(["red apple", "green pear"]).search("pear", k=5)[0].tolist()
            [1, 0]
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return _top_k(self.scores(query), int(k))

    def search_batch(self, queries: Sequence[str], k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top ``min(k, n)`` for each query: ``(indices int64 [Q, k], scores float32 [Q, k])``."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings; use search() for one")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        kk = min(int(k), self.size)
        indices = np.empty((len(queries), kk), dtype=np.int64)
        scores = np.empty((len(queries), kk), dtype=np.float32)
        for row, query in enumerate(queries):
            indices[row], scores[row] = _top_k(self.scores(query), kk)
        return indices, scores


def _top_k(scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    n = scores.shape[0]
    k = min(k, n)
    if k < n:
        # Everything tied with the k-th score stays in, so the lower index wins a tie exactly.
        threshold = np.partition(scores, n - k)[n - k]
        pool = np.flatnonzero(scores >= threshold)
    else:
        pool = np.arange(n)
    order = np.lexsort((pool, -scores[pool]))[:k]
    chosen = pool[order].astype(np.int64)
    return chosen, scores[chosen].astype(np.float32)
