"""Native exact top-k against a numpy reference, every ValueError path of the native module, and
its thread pools (a failure to start threads is a RuntimeError; pools are not leaked)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from llm_embedder import _native


def reference_topk(queries: np.ndarray, keys: np.ndarray, k: int):
    """Full score matrix, sorted by (score descending, index ascending)."""
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    idx = np.stack([np.lexsort((np.arange(len(keys)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, idx, 1), idx


def grid(rng: np.random.Generator, shape) -> np.ndarray:
    # small integers: every dot product is exact in float32 and ties are everywhere
    return rng.integers(-2, 3, shape).astype(np.float32)


@pytest.mark.parametrize(
    "q,n,d,k",
    [
        (1, 1, 1, 1),
        (1, 50, 13, 50),  # k = N
        (1, 2000, 17, 10),  # Q = 1, d not a multiple of 8/16
        (3, 700, 385, 7),
        (8, 513, 16, 1),
        (33, 1000, 31, 10),
        (130, 600, 64, 600),  # k = N with many queries
        (257, 300, 9, 5),
    ],
)
@pytest.mark.parametrize("threads", [None, 1, 2])
def test_topk_equals_numpy_reference_with_ties(q, n, d, k, threads):
    rng = np.random.default_rng(q * 7 + n + d)
    queries, keys = grid(rng, (q, d)), grid(rng, (n, d))
    scores, idx = _native.topk(queries, keys, k, threads=threads)
    want_scores, want_idx = reference_topk(queries, keys, k)
    assert scores.shape == (q, k) and idx.shape == (q, k)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


@pytest.mark.parametrize("q,n,d", [(1, 20000, 384), (64, 5000, 768), (300, 3000, 100)])
def test_topk_equals_numpy_reference_on_random_floats(q, n, d):
    rng = np.random.default_rng(d)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    k = 10
    scores, idx = _native.topk(queries, keys, k)
    want_scores, want_idx = reference_topk(queries, keys, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
    # indices agree except where two scores are closer than float32 rounding
    exact = np.take_along_axis(queries.astype(np.float64) @ keys.astype(np.float64).T, idx, 1)
    np.testing.assert_allclose(exact, want_scores, rtol=1e-5, atol=1e-4)
    assert (idx == want_idx).mean() > 0.99
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_topk_finds_each_normalised_key_itself():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((3000, 96)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    _, idx = _native.topk(keys[::7], keys, 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(0, 3000, 7))


def test_topk_accepts_non_contiguous_views():
    rng = np.random.default_rng(6)
    queries = grid(rng, (10, 40))
    keys = grid(rng, (400, 40))
    got = _native.topk(queries[::2, ::2], keys[:, ::2], 5)
    want = _native.topk(
        np.ascontiguousarray(queries[::2, ::2]), np.ascontiguousarray(keys[:, ::2]), 5
    )
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_topk_threads_do_not_change_the_answer():
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((70, 200)).astype(np.float32)
    keys = rng.standard_normal((9000, 200)).astype(np.float32)
    one = _native.topk(queries, keys, 20, threads=1)
    two = _native.topk(queries, keys, 20, threads=2)
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[0], two[0])


# ---------------------------------------------------------------- ValueError paths

F32 = np.float32
Q = np.zeros((2, 4), F32)
K = np.zeros((5, 4), F32)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros(4, F32), K, 1), {}, r"queries must be a 2-D float32 array, got 1-D"),
        ((Q, np.zeros((5, 4, 1), F32), 1), {}, r"keys must be a 2-D float32 array, got 3-D"),
        ((Q.astype(np.float64), K, 1), {}, r"queries must be a 2-D float32 numpy array.*float64"),
        ((Q, K.astype(np.float16), 1), {}, r"keys must be a 2-D float32 numpy array.*float16"),
        (([[0.0] * 4], K, 1), {}, r"queries must be a 2-D float32 numpy array, got list"),
        ((Q, np.zeros((5, 3), F32), 1), {}, r"same dimension.*\[\.\., 4\].*\[\.\., 3\]"),
        ((np.zeros((2, 0), F32), np.zeros((5, 0), F32), 1), {}, r"at least one column"),
        ((Q, K, 0), {}, r"k must be >= 1, got 0"),
        ((Q, K, -3), {}, r"k must be >= 1, got -3"),
        ((Q, K, 6), {}, r"k must be <= the number of keys \(5\), got 6"),
        ((Q, np.zeros((0, 4), F32), 1), {}, r"k must be <= the number of keys \(0\)"),
        (
            (np.array([[0, np.nan, 0, 0]], F32), K, 1),
            {},
            r"queries must be finite, found NaN in row 0",
        ),
        ((Q, K, 1), {"threads": 0}, r"threads must be >= 1"),
    ],
)
def test_topk_value_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _native.topk(*args, **kwargs)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_topk_rejects_non_finite_keys_naming_the_row(bad):
    keys = K.copy()
    keys[3, 1] = bad
    with pytest.raises(ValueError, match=r"keys must be finite.*row 3"):
        _native.topk(Q, keys, 1)


T = np.zeros((2, 3), F32)
S = np.zeros((2, 3, 4), F32)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros(3, F32), S), {}, r"target_ll must be a 2-D float32 array, got 1-D"),
        ((T, np.zeros((2, 3), F32)), {}, r"sample_ll must be a 3-D float32 array, got 2-D"),
        ((T.astype(np.float64), S), {}, r"target_ll must be a 2-D float32 numpy array.*float64"),
        ((T, np.zeros((2, 2, 4), F32)), {}, r"sample_ll must have shape \[Q, M, N\] = \[2, 3, N\]"),
        ((T, np.zeros((3, 3, 4), F32)), {}, r"sample_ll must have shape"),
        ((T, S), {"mode": "rank"}, r"mode must be 'position' or 'shift', got \"rank\""),
        ((T, S), {"mode": "shift"}, r"mode='shift' needs baseline"),
        (
            (T, S),
            {"mode": "shift", "baseline": 3},
            r"baseline must be a candidate column in \[0, 3\), got 3",
        ),
        ((T, S), {"mode": "shift", "baseline": -1}, r"baseline must be .* got -1"),
        ((np.array([[0, np.nan, 0]] * 2, F32), S), {}, r"target_ll must be finite.*flat index 1"),
        ((np.array([[0, 0, np.inf]] * 2, F32), S), {}, r"target_ll must be finite.*inf"),
    ],
)
def test_rank_reward_value_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _native.rank_aware_reward(*args, **kwargs)


def test_rank_reward_rejects_infinite_samples_but_not_nan():
    samples = S.copy()
    samples[1, 2, 3] = np.nan
    _native.rank_aware_reward(T, samples)  # NaN marks a missing sample
    samples[0, 1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"sample_ll must be finite or NaN.*-inf"):
        _native.rank_aware_reward(T, samples)


TI = np.array([0, 0, 1], np.int64)
LE = np.array([3, 1, 2], np.int64)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((TI[None], LE, 2, 0), {}, r"task_ids must be a 1-D int64 array, got 2-D"),
        ((TI, LE.astype(np.int32), 2, 0), {}, r"lengths must be a 1-D int64 numpy array.*int32"),
        ((TI, LE[:2], 2, 0), {}, r"same length, got 3 and 2"),
        ((TI, LE, 0, 0), {}, r"batch_size must be >= 1, got 0"),
        ((TI, LE, 2, 0), {"bucket_factor": 0}, r"bucket_factor must be >= 1, got 0"),
        (
            (TI, LE, 2, 0),
            {"task_temperature": 0.0},
            r"task_temperature must be a finite number > 0",
        ),
        ((TI, LE, 2, 0), {"task_temperature": float("nan")}, r"task_temperature"),
        ((TI, LE, 2, 0), {"task_temperature": float("inf")}, r"task_temperature"),
        ((TI, np.array([3, -1, 2]), 2, 0), {}, r"lengths must be >= 0, got -1 at index 1"),
    ],
)
def test_bucket_batches_value_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _native.bucket_batches(*args, **kwargs)


def test_bucket_batches_empty_input_gives_no_batches():
    assert _native.bucket_batches(np.array([], np.int64), np.array([], np.int64), 4, 0) == []


# ---------------------------------------------------------------- float16 keys, threads, probe


@pytest.mark.parametrize("q,n,d", [(1, 5000, 384), (5, 900, 17), (40, 1200, 64), (300, 600, 9)])
def test_topk_f16_equals_topk_on_the_widened_keys(q, n, d):
    rng = np.random.default_rng(q + n)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    keys16 = rng.standard_normal((n, d)).astype(np.float16)
    got = _native.bench.topk_f16(queries, keys16, 10)
    want = _native.topk(queries, keys16.astype(np.float32), 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_topk_f16_value_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"keys must be a 2-D float16 numpy array.*float32"):
        _native.bench.topk_f16(Q, K, 1)
    keys = K.astype(np.float16)
    keys[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"keys must be finite.*row 2"):
        _native.bench.topk_f16(Q, keys, 1)


def test_set_num_threads_sets_the_default_and_zero_restores_it():
    default = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        assert _native.get_num_threads() == 1
        rng = np.random.default_rng(3)
        queries = rng.standard_normal((3, 16)).astype(np.float32)
        keys = rng.standard_normal((2000, 16)).astype(np.float32)
        np.testing.assert_array_equal(
            _native.topk(queries, keys, 4)[1], _native.topk(queries, keys, 4, threads=2)[1]
        )
    finally:
        _native.set_num_threads(0)
    assert _native.get_num_threads() == default
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _native.set_num_threads(-1)


def test_stream_sum_is_the_sum():
    x = np.arange(100_003, dtype=np.float32) % 7
    assert _native.bench.stream_sum(x, threads=2) == pytest.approx(float(x.sum(dtype=np.float64)))
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.bench.stream_sum(x[::2])


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_topk_fallback_kernels_give_the_same_answer(isa, tmp_path):
    """The AVX2 and portable kernels (chosen at run time on older CPUs) end to end."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import numpy as np\n"
        "from llm_embedder import _native\n"
        "rng = np.random.default_rng(0)\n"
        "keys = rng.integers(-2, 3, (3000, 37)).astype(np.float32)\n"
        "out = {}\n"
        "for q in (1, 5, 40, 300):\n"
        "    queries = rng.integers(-2, 3, (q, 37)).astype(np.float32)\n"
        "    out[f's{q}'], out[f'i{q}'] = _native.topk(queries, keys, 9)\n"
        "    out[f'h{q}'] = _native.bench.topk_f16(queries, keys.astype(np.float16), 9)[1]\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n"
    )
    env = {**os.environ, "LLM_EMBEDDER_ISA": isa}
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=120)
    got = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(0)
    keys = rng.integers(-2, 3, (3000, 37)).astype(np.float32)
    for q in (1, 5, 40, 300):
        queries = rng.integers(-2, 3, (q, 37)).astype(np.float32)
        want_scores, want_idx = reference_topk(queries, keys, 9)
        np.testing.assert_array_equal(got[f"i{q}"], want_idx)
        np.testing.assert_array_equal(got[f"h{q}"], want_idx)
        np.testing.assert_array_equal(got[f"s{q}"], want_scores.astype(np.float32))


def test_bucket_batches_accepts_any_64_bit_seed():
    tasks = np.zeros(50, np.int64)
    lengths = np.arange(50, dtype=np.int64)
    for seed in (-1, -(2**63), 2**64 - 1):
        a = _native.bucket_batches(tasks, lengths, 4, seed)
        b = _native.bucket_batches(tasks, lengths, 4, seed)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # -1 and 2**64 - 1 are the same 64 bits
    a = _native.bucket_batches(tasks, lengths, 4, -1)
    b = _native.bucket_batches(tasks, lengths, 4, 2**64 - 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        _native.bucket_batches(tasks, lengths, 4, 2**64)


# ---------------------------------------------------------------- top-k of a score matrix


@pytest.mark.parametrize("q,n,k", [(1, 1, 1), (3, 50, 50), (4, 3000, 17), (40, 700, 9)])
def test_topk_scores_equals_a_stable_sort_with_ties(q, n, k):
    rng = np.random.default_rng(n)
    scores = rng.integers(-2, 3, (q, n)).astype(np.float32)  # ties everywhere
    got_scores, got_cols = _native.topk_scores(scores, k)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got_cols, want)
    np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, want, 1))
    assert got_cols.dtype == np.int64 and got_scores.dtype == np.float32


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros(4, F32), 1), {}, r"scores must be a 2-D float32 array, got 1-D"),
        ((np.zeros((2, 4)), 1), {}, r"scores must be a 2-D float32 numpy array.*float64"),
        ((np.zeros((2, 4), F32), 0), {}, r"k must be >= 1, got 0"),
        ((np.zeros((2, 4), F32), 5), {}, r"k must be <= the number of columns \(4\), got 5"),
        ((np.array([[0, 1], [np.nan, 0]], F32), 1), {}, r"finite, found NaN in row 1 column 0"),
        ((np.zeros((2, 4), F32), 1), {"threads": 0}, r"threads must be >= 1"),
    ],
)
def test_topk_scores_value_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _native.topk_scores(*args, **kwargs)


# ---------------------------------------------------------------- thread pools


def test_threads_beyond_what_a_pool_can_hold_are_a_value_error():
    with pytest.raises(ValueError, match=r"threads must be >= 1 and <= \d+, got 10000000"):
        _native.topk(Q, K, 1, threads=10_000_000)
    with pytest.raises(ValueError, match=r"threads must be >= 0 \(0: the default\)"):
        _native.set_num_threads(10_000_000)


def test_threads_that_cannot_start_are_a_runtime_error_not_a_panic(tmp_path):
    """With the process count capped, no worker thread can be created: the call must raise
    RuntimeError (a Rust panic would surface as pyo3's PanicException, a BaseException).

    RLIMIT_NPROC makes every clone() fail before anything is allocated for the thread, so the
    failure is deterministic. Capping the address space instead was not: the allocator could
    fail first (in rayon's per-worker buffers, or a started worker's thread-local data) and
    an allocation failure aborts the process, outside anything Rust can catch."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import os, resource\n"
        "import numpy as np\n"
        "from llm_embedder import _native\n"
        "q, k = np.ones((1, 4), np.float32), np.ones((600, 4), np.float32)\n"
        "_native.topk(q, k, 1, threads=1)  # this pool starts before the cap and stays cached\n"
        "scores, flat = k.T.copy(), k.ravel()\n"
        "if os.geteuid() == 0:\n"
        "    # root ignores RLIMIT_NPROC; an unused uid, which holds no capabilities, does not\n"
        "    try:\n"
        "        os.setgroups([]); os.setgid(54_321); os.setuid(54_321)\n"
        "    except PermissionError:  # a root without CAP_SETUID (some sandboxes)\n"
        "        raise SystemExit('cannot drop root')\n"
        "hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))  # this process is already one\n"
        "for call in (lambda: _native.topk(q, k, 1, threads=500),\n"
        "             lambda: _native.topk_scores(scores, 1, threads=500),\n"
        "             lambda: _native.bench.stream_sum(flat, threads=500)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as err:\n"
        "        assert 'could not start 500 worker threads' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print(_native.topk(q, k, 2, threads=1)[1].tolist())\n"
    )
    # One BLAS thread: numpy's import must not need the threads the cap will refuse later.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env)
    if "cannot drop root" in done.stderr:
        pytest.skip("running as a root that cannot change its uid: RLIMIT_NPROC does not bind")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[0, 1]]"  # the module still works afterwards


def test_pools_of_many_thread_counts_are_not_all_kept(tmp_path):
    """Sweeping thread counts keeps only a few pools: their threads end with them."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import os, time\n"
        "import numpy as np\n"
        "from llm_embedder import _native\n"
        "q, k = np.ones((1, 4), np.float32), np.ones((600, 4), np.float32)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "for threads in range(1, 21):\n"
        "    _native.topk(q, k, 1, threads=threads)\n"
        "# an evicted pool's threads exit on their own shortly after it is dropped\n"
        "deadline = time.monotonic() + 30\n"
        "while len(os.listdir('/proc/self/task')) - before > 17 + 18 + 19 + 20:\n"
        "    assert time.monotonic() < deadline, len(os.listdir('/proc/self/task')) - before\n"
        "    os.sched_yield()\n"
        "print(len(os.listdir('/proc/self/task')) - before)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) <= 17 + 18 + 19 + 20  # all 20 pools would hold 210 threads
