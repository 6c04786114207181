"""retrieval: BM25Index, the BM25 cache and rank_pool — the one ranking path.

The ``_old_*`` functions are the numpy rankings that label.py and evaluate.py used before they
moved onto rank_pool; the tests hold rank_pool to them, ties included, on the bundled slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_embedder.data import bundled_task_files, candidate_pool, load_corpus, load_queries
from llm_embedder.retrieval import BM25Cache, BM25Index, rank_pool

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TASKS = ["qa", "tool", "chat", "icl"]

TEXTS = [
    "The cat sat on the mat.",
    "Dogs bark at night.",
    "A cat and a dog play together.",
    "Quantum chromodynamics describes the strong interaction.",
    "",
]


# ----------------------------------------------------------------- the rankings rank_pool replaced

def _old_bm25_top_k(scores: np.ndarray, k: int):
    """bm25.py's _top_k: partition, then lexsort by (-score, index)."""
    n = scores.shape[0]
    k = min(k, n)
    if k < n:
        threshold = np.partition(scores, n - k)[n - k]
        pool = np.flatnonzero(scores >= threshold)
    else:
        pool = np.arange(n)
    order = np.lexsort((pool, -scores[pool]))[:k]
    chosen = pool[order].astype(np.int64)
    return chosen, scores[chosen].astype(np.float32)


def _old_evaluate_top(scores: np.ndarray, depth: int) -> np.ndarray:
    """evaluate.py's _top: stable argsort of the negated scores."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :depth]


def _old_label_dense(scores: np.ndarray, depth: int) -> np.ndarray:
    """label.py's _NegativeMiner._dense_rank selection."""
    return np.lexsort((np.arange(len(scores)), -scores))[:depth]


def _slice(task: str):
    files = bundled_task_files(task)
    corpus = load_corpus(files["corpus"])
    queries = load_queries(files["test"])
    return corpus, queries


def _bag_of_words(texts, dim: int = 48) -> np.ndarray:
    """Hashed word counts: small integers, so inner products tie often and exactly."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, sum(word.encode()) % dim] += 1.0
    return out


# ----------------------------------------------------------------- identity with the old rankings

@pytest.mark.parametrize("task", TASKS)
def test_bm25_ranking_equals_the_old_partition_and_lexsort_on_bundled_slices(task):
    corpus, queries = _slice(task)
    cache = BM25Cache([p.full_text for p in corpus])
    ties = 0
    for query in queries[:80]:
        pool = candidate_pool(query, corpus)
        for depth in (1, 10, len(pool), len(pool) + 5):
            got = rank_pool(pool, depth, queries=[query.text], bm25=cache)[0]
            scores = cache.index(pool).scores(query.text)
            local, _ = _old_bm25_top_k(scores, depth)
            assert got.tolist() == [pool[i] for i in local], (task, query.id, depth)
        ties += len(np.unique(scores)) < len(scores)
    assert ties > 0  # the slices do exercise tied scores


@pytest.mark.parametrize("task", TASKS)
def test_dense_ranking_equals_the_old_argsort_and_lexsort_on_bundled_slices(task):
    corpus, queries = _slice(task)
    keys = _bag_of_words([p.full_text for p in corpus])
    vectors = _bag_of_words([q.text for q in queries[:80]])
    for query, q in zip(queries[:80], vectors):
        pool = candidate_pool(query, corpus)
        scores = keys[pool] @ q  # label's per-query scores
        for depth in (1, 7, len(pool), len(pool) + 3):
            got = rank_pool(pool, depth, scores=scores)[0]
            old_label = [pool[i] for i in _old_label_dense(scores, depth)]
            old_eval = np.asarray(pool)[_old_evaluate_top(scores[None], min(depth, len(pool)))[0]]
            assert got.tolist() == old_label == old_eval.tolist(), (task, query.id, depth)


@settings(max_examples=60, deadline=None)
@given(q=st.integers(1, 4), n=st.integers(1, 60), depth=st.integers(0, 70),
       grid=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_rank_pool_equals_a_stable_argsort_for_any_scores(q, n, depth, grid, seed):
    rng = np.random.default_rng(seed)
    if grid:  # few distinct values: ties everywhere, signed zeros included
        scores = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0], np.float32), size=(q, n))
    else:
        scores = rng.standard_normal((q, n)).astype(np.float32)
    pool = rng.permutation(10 * n)[:n]
    got = rank_pool(pool, depth, scores=scores)
    assert got.shape == (q, min(depth, n)) and got.dtype == np.int64
    np.testing.assert_array_equal(got, pool[_old_evaluate_top(scores, min(depth, n))])


def test_label_and_evaluate_rank_through_rank_pool_like_before():
    from llm_embedder.evaluate import TaskData, rank_bm25
    from llm_embedder.label import _NegativeMiner
    from llm_embedder.tasks import get_task

    corpus, queries = _slice("chat")
    queries = queries[:40]
    data = TaskData.build("chat", corpus, queries)
    ranked = rank_bm25(data, depth=10)
    miner = _NegativeMiner(get_task("chat"), corpus, "bm25", embedder=None)
    texts = [p.full_text for p in corpus]
    for query, pool, got in zip(queries, data.pools, ranked):
        index = BM25Index([texts[j] for j in pool])
        local, _ = _old_bm25_top_k(index.scores(query.text), 10)
        assert got.tolist() == pool[local].tolist()
        assert miner._bm25_rank(query, pool.tolist(), 10) == pool[local].tolist()
    assert len(miner._bm25) == len({id(p) for p in data.pools})  # one index per pool


def test_evaluate_dense_ranking_is_unchanged_with_tied_scores():
    from llm_embedder.evaluate import TaskData, rank_dense

    class Words:
        def encode(self, texts, **_):
            return _bag_of_words(texts)

    corpus, queries = _slice("tool")
    data = TaskData.build("tool", corpus, queries[:60])
    got = rank_dense(data, Words(), depth=12)
    keys = _bag_of_words([p.full_text for p in corpus])
    vectors = _bag_of_words([q.text for q in data.queries])
    for q, pool, row in zip(vectors, data.pools, got):
        scores = (q[None] @ keys[pool].T)
        assert row.tolist() == pool[_old_evaluate_top(scores, 12)[0]].tolist()


# ----------------------------------------------------------------- rank_pool contract

def test_rank_pool_returns_pool_entries_best_first_with_ties_to_the_earlier_entry():
    scores = np.array([[0.1, 0.5, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]], np.float32)
    got = rank_pool([40, 30, 20, 10], 3, scores=scores)
    assert got.tolist() == [[10, 30, 20], [40, 30, 20]]


def test_rank_pool_clips_depth_and_allows_zero():
    assert rank_pool([5, 6], 10, scores=np.array([1.0, 2.0], np.float32)).tolist() == [[6, 5]]
    assert rank_pool([5, 6], 0, scores=np.array([1.0, 2.0], np.float32)).shape == (1, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"scores": np.array([[np.nan, 1.0]], np.float32)}, "scores must be finite"),
    ({"scores": np.array([[np.inf, 1.0]], np.float32)}, "scores must be finite"),
    ({"scores": np.array([[1.0, 2.0]])}, "float32"),
    ({"scores": np.ones((1, 3), np.float32)}, r"scores must be \[Q, 2\]"),
    ({}, "either scores= or bm25="),
    ({"bm25": BM25Cache(["a", "b"])}, "needs the query texts"),
])
def test_rank_pool_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rank_pool([0, 1], 1, **kwargs)


@pytest.mark.parametrize("depth", [-1, 1.5, True])
def test_rank_pool_rejects_a_bad_depth(depth):
    with pytest.raises(ValueError, match="depth must be a non-negative integer"):
        rank_pool([0], depth, scores=np.ones(1, np.float32))


def test_bm25_cache_builds_one_index_per_distinct_pool():
    cache = BM25Cache(TEXTS)
    a = cache.index([0, 2, 4])
    assert cache.index(np.array([0, 2, 4])) is a
    assert cache.index([0, 2]) is not a
    assert len(cache) == 2
    np.testing.assert_array_equal(cache.scores([0, 2, 4], ["cat"])[0],
                                  BM25Index([TEXTS[0], TEXTS[2], TEXTS[4]]).scores("cat"))


# ----------------------------------------------------------------- BM25Index

def test_search_ranks_the_text_sharing_rare_words_first():
    index = BM25Index(TEXTS)
    indices, scores = index.search("strong interaction chromodynamics", k=2)
    assert indices[0] == 3
    assert scores[0] > scores[1]
    assert indices.dtype == np.int64 and scores.dtype == np.float32


def test_scores_are_descending_and_equal_the_full_score_vector():
    index = BM25Index(TEXTS)
    full = index.scores("cat dog")
    indices, scores = index.search("cat dog", k=len(TEXTS))
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_array_equal(scores, full[indices])
    assert sorted(indices.tolist()) == list(range(len(TEXTS)))


def test_ties_are_broken_by_the_lower_index():
    index = BM25Index(["apple pie", "banana split", "apple pie", "cherry tart", "apple pie"])
    indices, _ = index.search("apple", k=2)
    assert indices.tolist() == [0, 2]
    indices, scores = index.search("unknownword", k=3)  # no known word: all tied at zero
    assert indices.tolist() == [0, 1, 2]
    assert np.all(scores == 0)


def test_k_larger_than_the_corpus_is_clipped():
    index = BM25Index(TEXTS)
    indices, scores = index.search("cat", k=100)
    assert len(indices) == len(TEXTS) == len(scores)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k_raises_value_error(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        BM25Index(TEXTS).search("cat", k=k)


def test_empty_corpus_and_non_string_texts_are_rejected():
    with pytest.raises(ValueError, match="at least one text"):
        BM25Index([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        BM25Index(["ok", 3])
    with pytest.raises(TypeError, match="not one string"):
        BM25Index("just one string")


def test_batch_search_equals_one_query_at_a_time():
    index = BM25Index(TEXTS)
    queries = ["cat", "dog night", "strong", "nothing matches here"]
    indices, scores = index.search_batch(queries, k=3)
    assert indices.shape == (4, 3) and scores.shape == (4, 3)
    for row, query in enumerate(queries):
        one_idx, one_scores = index.search(query, k=3)
        np.testing.assert_array_equal(indices[row], one_idx)
        np.testing.assert_array_equal(scores[row], one_scores)


def test_same_input_gives_the_same_ranking_in_a_fresh_index():
    a = BM25Index(TEXTS).search_batch(["cat dog", "bark"], k=4)
    b = BM25Index(list(TEXTS)).search_batch(["cat dog", "bark"], k=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
def test_bm25_finds_the_positive_passage_of_real_squad_questions():
    corpus = [json.loads(line) for line in (DATA / "qa/xquad/corpus.jsonl").open()]
    queries = [json.loads(line) for line in (DATA / "qa/xquad/queries.test.jsonl").open()][:40]
    index = BM25Index([f"{p.get('title', '')}: {p['text']}" for p in corpus])
    ids = [p["id"] for p in corpus]
    indices, _ = index.search_batch([q["text"] for q in queries], k=5)
    hits = sum(any(ids[i] in q["positive_ids"] for i in row) for q, row in zip(queries, indices))
    assert hits / len(queries) >= 0.9  # the brief measured R@5 = .994 on this split
