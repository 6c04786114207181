"""Index: exact and hnsw search against brute force, save/load, and every bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_embedder import Index
from llm_embedder.index import SearchResult
from llm_embedder.io import FolderNotOursError

BACKENDS = ["exact", "hnsw"]


def _random(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _brute_force(queries: np.ndarray, vectors: np.ndarray, k: int, cosine: bool = True):
    if cosine:
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_vector_finds_its_own_id_first(backend):
    vectors = _random(2000, 48)
    ids = [f"doc-{i}" for i in range(len(vectors))]
    index = Index(48, backend=backend)
    index.add(vectors, ids)
    assert len(index) == 2000
    result = index.search(vectors[:300], k=5)
    assert isinstance(result, SearchResult)
    assert [row[0] for row in result.ids] == ids[:300]
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    assert result.scores.dtype == np.float32 and result.scores.shape == (300, 5)
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_exact_equals_brute_force_numpy(metric):
    vectors, queries = _random(700, 32, seed=1), _random(20, 32, seed=2)
    index = Index(32, metric=metric)
    # several adds exercise the amortised growth of the buffer
    for start in range(0, 700, 150):
        index.add(vectors[start:start + 150], list(range(start, min(start + 150, 700))))
    ids, scores = index.search(queries, k=10)
    order, expected = _brute_force(queries, vectors, 10, cosine=metric == "cosine")
    assert ids == order.tolist()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_hnsw_recall_is_high_on_random_data():
    vectors, queries = _random(3000, 32, seed=3), _random(50, 32, seed=4)
    index = Index(32, backend="hnsw")
    index.add(vectors, list(range(3000)))
    ids, scores = index.search(queries, k=10)
    order, expected = _brute_force(queries, vectors, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, order.tolist())])
    assert recall >= 0.95
    # the scores it reports are the true cosine scores of the ids it returns
    for q, row in enumerate(ids):
        true = _brute_force(queries[q:q + 1], vectors[row], len(row))[1][0]
        np.testing.assert_allclose(np.sort(scores[q])[::-1], true, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), dim=st.integers(1, 9), q=st.integers(1, 5),
       seed=st.integers(0, 2**16), data=st.data())
def test_exact_scores_equal_numpy_for_any_shape(n, dim, q, seed, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32) + 0.01
    queries = rng.standard_normal((q, dim)).astype(np.float32) + 0.01
    index = Index(dim, metric="ip")
    index.add(vectors, list(range(n)))
    ids, scores = index.search(queries, k=k)
    _, expected = _brute_force(queries, vectors, k, cosine=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    for row, row_scores, query in zip(ids, scores, queries):
        assert len(set(row)) == k
        np.testing.assert_allclose(vectors[row] @ query, row_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_query_is_one_row_and_k_may_equal_the_size(backend):
    vectors = _random(30, 8)
    index = Index(8, backend=backend)
    index.add(vectors, [f"v{i}" for i in range(30)])
    ids, scores = index.search(vectors[3], k=30)
    assert len(ids) == 1 and scores.shape == (1, 30)
    assert ids[0][0] == "v3" and sorted(ids[0]) == sorted(f"v{i}" for i in range(30))


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    index = Index(4)
    index.add(torch.eye(4), ["a", "b", "c", "d"])
    assert index.search(torch.tensor([0.0, 0.0, 2.0, 0.1]), k=1).ids == [["c"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_load_round_trip(backend, tmp_path):
    vectors, queries = _random(500, 16, seed=5), _random(12, 16, seed=6)
    ids = [i if i % 2 else f"s{i}" for i in range(500)]  # int and str ids both survive
    index = Index(16, backend=backend, hnsw_m=8, ef_construction=64, ef_search=40)
    index.add(vectors, ids)
    before = index.search(queries, k=7)
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert len(loaded) == 500 and loaded.ids == ids
    assert (loaded.backend, loaded.metric, loaded.dim) == (backend, "cosine", 16)
    assert (loaded.hnsw_m, loaded.ef_construction, loaded.ef_search) == (8, 64, 40)
    after = loaded.search(queries, k=7)
    assert after.ids == before.ids
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    # a loaded index keeps growing
    loaded.add(_random(3, 16, seed=7), ["x", "y", "z"])
    assert len(loaded) == 503 and loaded.search(_random(3, 16, seed=7)[1], k=1).ids == [["y"]]
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(_random(1, 16), [ids[10]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_save_replaces_an_index_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    small = Index(4)
    small.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    small.save(tmp_path / "ix")
    bigger = Index(4)
    bigger.add(_random(10, 4), list(range(10)))
    bigger.save(tmp_path / "ix")
    assert len(Index.load(tmp_path / "ix")) == 10

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        small.save(tmp_path / "ix")
    assert len(Index.load(tmp_path / "ix")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


# ---- errors ----------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def filled(request) -> Index:
    index = Index(8, backend=request.param)
    index.add(_random(10, 8), [f"d{i}" for i in range(10)])
    return index


def test_dimension_mismatch_on_add_and_search(filled):
    with pytest.raises(ValueError, match="vectors has dimension 7, the index has dimension 8"):
        filled.add(_random(2, 7), ["x", "y"])
    with pytest.raises(ValueError, match="queries has dimension 9"):
        filled.search(_random(1, 9), k=1)
    with pytest.raises(ValueError, match="1-D.*2-D"):
        filled.search(np.zeros((1, 1, 8), np.float32), k=1)


def test_duplicate_ids_within_a_call_and_against_the_index(filled):
    with pytest.raises(ValueError, match=r"ids\[2\]='x' repeats ids\[0\]"):
        filled.add(_random(3, 8), ["x", "y", "x"])
    with pytest.raises(ValueError, match=r"ids\[1\]='d3' is already in the index"):
        filled.add(_random(2, 8), ["new", "d3"])
    assert len(filled) == 10 and "new" not in filled


def test_ids_must_match_rows_and_be_str_or_int(filled):
    with pytest.raises(ValueError, match="got 3 vectors but 2 ids"):
        filled.add(_random(3, 8), ["x", "y"])
    with pytest.raises(ValueError, match=r"ids\[0\] has type float"):
        filled.add(_random(1, 8), [1.5])
    with pytest.raises(ValueError, match="sequence"):
        filled.add(_random(1, 8), "x")
    assert len(filled) == 10


def test_nan_and_inf_are_rejected_with_the_row(filled):
    bad = _random(4, 8)
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="vectors row 2 holds NaN or inf"):
        filled.add(bad, ["a", "b", "c", "e"])
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="queries row 2 holds NaN or inf"):
        filled.search(bad, k=1)
    assert len(filled) == 10


def test_zero_vector_has_no_cosine(filled):
    with pytest.raises(ValueError, match="row 0 is a zero vector"):
        filled.add(np.zeros((1, 8), np.float32), ["zero"])


def test_k_out_of_range(filled):
    with pytest.raises(ValueError, match="k=11 is larger than the index"):
        filled.search(_random(1, 8), k=11)
    with pytest.raises(ValueError, match="k must be at least 1"):
        filled.search(_random(1, 8), k=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_on_an_empty_index(backend):
    with pytest.raises(ValueError, match="empty index"):
        Index(8, backend=backend).search(_random(1, 8), k=1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dim"):
        Index(0)
    with pytest.raises(ValueError, match="backend"):
        Index(8, backend="faiss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric"):
        Index(8, metric="l2")  # type: ignore[arg-type]


def test_load_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index folder"):
        Index.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="index.json"):
        Index.load(tmp_path)
    index = Index(4)
    index.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    meta["count"] = 5
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="ids.json: expected a list of 5 ids"):
        Index.load(tmp_path / "ix")
    index.save(tmp_path / "ix")
    vectors_file = tmp_path / "ix" / "vectors.npy"
    vectors_file.write_bytes(vectors_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match="vectors.npy: truncated"):
        Index.load(tmp_path / "ix")
    (tmp_path / "ix" / "ids.json").write_text("[1, 2,")
    with pytest.raises(ValueError, match="ids.json: not valid JSON"):
        Index.load(tmp_path / "ix")
    index.save(tmp_path / "ix")
    (tmp_path / "ix" / "vectors.npy").unlink()
    with pytest.raises(FileNotFoundError, match="vectors.npy"):
        Index.load(tmp_path / "ix")


# ---- issue 13: nothing lost, no silent wrong answer ------------------------------------------


def _small(backend: str = "exact") -> Index:
    index = Index(4, backend=backend)
    index.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    return index


def test_save_refuses_a_folder_of_user_files_and_names_it(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FolderNotOursError, match=r"mydata is a non-empty folder that is not a "
                                                 r"saved index.*overwrite=True"):
        _small().save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]
    # a folder whose index.json is someone else's format is not ours either
    (folder / "index.json").write_text(json.dumps({"format": "faiss"}))
    with pytest.raises(FolderNotOursError):
        _small().save(folder)
    _small().save(folder, overwrite=True)
    assert Index.load(folder).ids == ["a", "b", "c", "d"]


def test_save_into_an_empty_folder_or_over_an_index_needs_no_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    _small().save(tmp_path / "empty")
    _small("hnsw").save(tmp_path / "empty")  # replaces our own exact index
    assert Index.load(tmp_path / "empty").backend == "hnsw"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("then", ["save", "load"])
def test_temporaries_of_a_killed_save_are_removed_by_the_next_save_or_load(tmp_path, then):
    _small().save(tmp_path / "ix")
    killed = tmp_path / f".ix.{_dead_pid()}.0123abcd.tmp"  # what kill -9 mid-save leaves
    killed.mkdir()
    (killed / "vectors.npy").write_bytes(b"0" * 4096)
    running = tmp_path / f".ix.{os.getpid()}.89abcdef.tmp"  # a live writer's: kept
    running.mkdir()
    if then == "save":
        _small().save(tmp_path / "ix")
    else:
        Index.load(tmp_path / "ix")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ix", running.name])


def test_saved_folders_honour_the_umask(tmp_path):
    saved = os.umask(0o022)
    try:
        _small().save(tmp_path / "ix")
    finally:
        os.umask(saved)
    assert stat.S_IMODE((tmp_path / "ix").stat().st_mode) == 0o755
    for name in ("index.json", "ids.json", "vectors.npy"):
        assert stat.S_IMODE((tmp_path / "ix" / name).stat().st_mode) == 0o644


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_refuses_duplicate_ids(tmp_path, backend):
    _small(backend).save(tmp_path / "ix")
    (tmp_path / "ix" / "ids.json").write_text(json.dumps(["a", "b", "a", "d"]))
    with pytest.raises(ValueError, match=r"ids.json: ids\[2\]='a' repeats ids\[0\]"):
        Index.load(tmp_path / "ix")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_inner_products_are_an_error_on_every_backend(backend):
    vectors = np.full((10, 4), 1e20, dtype=np.float32)  # finite, but <v, v> overflows float32
    index = Index(4, backend=backend, metric="ip")
    index.add(vectors, list(range(10)))
    with pytest.raises(ValueError, match=r"inner product of queries row 0 and keys row \d+ "
                                         r"overflows float32"):
        index.search(vectors[:2], k=3)
