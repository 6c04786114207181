"""Property tests of the native rank-aware reward and batch bucketing (docs/method.md)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from llm_embedder import _native

SETTINGS = settings(max_examples=60, deadline=None)

# Log-likelihoods on a grid of quarter nats: exact in float32, so adding an integer constant
# keeps every comparison exact and ties are frequent enough to exercise the half-count.
GRID = st.integers(-40, 0).map(lambda i: i / 4.0)


def reference_reward(t: float, s: np.ndarray) -> float:
    """docs/method.md's rank-aware reward written out plainly (NaN = missing sample, margin
    clipped at 8 nats)."""
    s = s[~np.isnan(s)]
    n = len(s)
    if n == 0:
        return 0.5
    rank = 1 + np.sum(s > t) + 0.5 * np.sum(s == t)
    gap = min(max(float(t) - float(s.max()), -8.0), 8.0)
    margin = 1.0 / (1.0 + math.exp(-gap))
    return (n + 1 - rank + margin) / (n + 1)


def rank_of(t: float, s: np.ndarray) -> float:
    s = s[~np.isnan(s)]
    return 1 + np.sum(s > t) + 0.5 * np.sum(s == t)


@st.composite
def reward_inputs(draw, max_q=3, max_m=4, max_n=6, nan=True):
    q = draw(st.integers(1, max_q))
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(0, max_n))
    target = draw(arrays(np.float32, (q, m), elements=GRID))
    samples = draw(arrays(np.float32, (q, m, n), elements=GRID))
    if nan and n:
        mask = draw(arrays(np.bool_, (q, m, n)))
        samples[mask] = np.nan
    return target, samples


# ---------------------------------------------------------------- rank-aware reward


def test_rank_reward_golden_case_by_hand():
    # t = -1 against samples -2, -1 (tie), 0 (better), NaN (missing): N = 3,
    # rank = 1 + 1 + 0.5 = 2.5, margin = sigmoid(-1 - 0) = 0.268941..., r = (4 - 2.5 + m) / 4
    target = np.array([[-1.0, -0.5]], np.float32)
    samples = np.array([[[-2.0, -1.0, 0.0, np.nan], [-2.0, -3.0, -1.0, -4.0]]], np.float32)
    got = _native.rank_aware_reward(target, samples)
    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    want0 = (4 - 2.5 + sig(-1.0)) / 4
    want1 = (5 - 1 + sig(0.5)) / 5  # best of all four samples: rank 1
    np.testing.assert_allclose(got, [[want0, want1]], rtol=0, atol=1e-7)
    assert got.dtype == np.float32 and got.shape == (1, 2)


@SETTINGS
@given(reward_inputs())
def test_rank_reward_matches_the_formula(inp):
    target, samples = inp
    got = _native.rank_aware_reward(target, samples)
    q, m = target.shape
    want = np.array(
        [[reference_reward(target[i, j], samples[i, j]) for j in range(m)] for i in range(q)]
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@SETTINGS
@given(reward_inputs(max_n=12))
def test_rank_reward_is_bounded_in_open_unit_interval(inp):
    target, samples = inp
    r = _native.rank_aware_reward(target, samples)
    assert np.all(r > 0.0) and np.all(r < 1.0)


@SETTINGS
@given(
    arrays(np.float32, (2,), elements=st.floats(-1e4, 1e4, width=32)),
    arrays(np.float32, (2, 5), elements=st.floats(-1e4, 1e4, width=32)),
)
def test_rank_reward_stays_bounded_for_extreme_gaps(target, samples):
    r = _native.rank_aware_reward(target[None], samples[None])
    assert np.all(r > 0.0) and np.all(r < 1.0)


@SETTINGS
@given(reward_inputs(max_q=1, max_m=6, max_n=8, nan=False))
def test_rank_reward_strictly_better_rank_gives_strictly_larger_reward(inp):
    target, samples = inp
    r = _native.rank_aware_reward(target, samples)[0]
    ranks = [rank_of(target[0, j], samples[0, j]) for j in range(target.shape[1])]
    for a in range(len(ranks)):
        for b in range(len(ranks)):
            if ranks[a] < ranks[b]:
                assert r[a] > r[b], (ranks[a], ranks[b], r[a], r[b])


@SETTINGS
@given(reward_inputs(), st.randoms(use_true_random=False))
def test_rank_reward_is_invariant_to_sample_order(inp, rnd):
    target, samples = inp
    perm = list(range(samples.shape[2]))
    rnd.shuffle(perm)
    a = _native.rank_aware_reward(target, samples)
    b = _native.rank_aware_reward(target, np.ascontiguousarray(samples[:, :, perm]))
    np.testing.assert_array_equal(a, b)


@SETTINGS
@given(reward_inputs(), st.data())
def test_rank_reward_is_invariant_to_a_constant_added_to_one_candidate(inp, data):
    target, samples = inp
    q, m = target.shape
    i = data.draw(st.integers(0, q - 1))
    j = data.draw(st.integers(0, m - 1))
    c = data.draw(st.integers(-50, 50))
    t2, s2 = target.copy(), samples.copy()
    t2[i, j] += c
    s2[i, j] += c  # NaN + c stays NaN: missing samples stay missing
    np.testing.assert_array_equal(
        _native.rank_aware_reward(target, samples), _native.rank_aware_reward(t2, s2)
    )


@SETTINGS
@given(reward_inputs(), st.data())
def test_rank_reward_shift_equals_position_minus_baseline_column(inp, data):
    target, samples = inp
    j = data.draw(st.integers(0, target.shape[1] - 1))
    pos = _native.rank_aware_reward(target, samples, mode="position")
    shift = _native.rank_aware_reward(target, samples, mode="shift", baseline=j)
    np.testing.assert_allclose(shift, pos - pos[:, [j]], rtol=0, atol=2e-7)
    assert np.all(shift[:, j] == 0.0)


@SETTINGS
@given(reward_inputs(nan=False), st.integers(1, 4), st.randoms(use_true_random=False))
def test_rank_reward_nan_padding_equals_dropping_the_samples(inp, pad, rnd):
    target, samples = inp
    q, m, n = samples.shape
    padded = np.full((q, m, n + pad), np.nan, np.float32)
    for i in range(q):
        for j in range(m):
            slots = sorted(rnd.sample(range(n + pad), n))
            padded[i, j, slots] = samples[i, j]
    np.testing.assert_array_equal(
        _native.rank_aware_reward(target, samples), _native.rank_aware_reward(target, padded)
    )


def test_rank_reward_is_deterministic_on_a_large_batch():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(64, 9)).astype(np.float32)
    samples = rng.normal(size=(64, 9, 7)).astype(np.float32)
    samples[rng.random(samples.shape) < 0.2] = np.nan
    a = _native.rank_aware_reward(target, samples)
    b = _native.rank_aware_reward(target, samples)
    np.testing.assert_array_equal(a, b)


def test_rank_reward_accepts_non_contiguous_views():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(4, 6)).astype(np.float32)
    samples = rng.normal(size=(4, 6, 5)).astype(np.float32)
    got = _native.rank_aware_reward(target[:, ::2], samples[:, ::2, :])
    want = _native.rank_aware_reward(
        np.ascontiguousarray(target[:, ::2]), np.ascontiguousarray(samples[:, ::2, :])
    )
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- bucket_batches


@st.composite
def bucket_inputs(draw):
    n = draw(st.integers(0, 300))
    n_tasks = draw(st.integers(1, 4))
    tasks = draw(arrays(np.int64, (n,), elements=st.integers(0, n_tasks - 1)))
    # arbitrary task ids, not just 0..T-1
    tasks = tasks * 7 - 3
    lengths = draw(arrays(np.int64, (n,), elements=st.integers(0, 512)))
    batch_size = draw(st.integers(1, 17))
    factor = draw(st.integers(1, 8))
    return tasks, lengths, batch_size, factor


@SETTINGS
@given(bucket_inputs(), st.integers(0, 2**63), st.booleans())
def test_bucket_batches_partition_one_task_per_batch(inp, seed, shuffle):
    tasks, lengths, bs, factor = inp
    batches = _native.bucket_batches(
        tasks, lengths, batch_size=bs, seed=seed, shuffle=shuffle, bucket_factor=factor
    )
    flat = np.concatenate(batches) if batches else np.array([], np.int64)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(tasks)))
    short = {}
    for b in batches:
        assert b.dtype == np.int64 and 1 <= len(b) <= bs
        assert len(set(tasks[b])) == 1
        if len(b) < bs:
            short[tasks[b[0]]] = short.get(tasks[b[0]], 0) + 1
    assert all(c == 1 for c in short.values())  # only a task's last cut is smaller


@SETTINGS
@given(bucket_inputs(), st.integers(0, 2**63))
def test_bucket_batches_same_seed_same_batches(inp, seed):
    tasks, lengths, bs, factor = inp
    a = _native.bucket_batches(tasks, lengths, bs, seed, bucket_factor=factor)
    b = _native.bucket_batches(tasks, lengths, bs, seed, bucket_factor=factor)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bucket_batches_different_seeds_give_different_batches():
    rng = np.random.default_rng(0)
    tasks = rng.integers(0, 3, 500)
    lengths = rng.integers(1, 300, 500)
    orders = set()
    for seed in range(8):
        batches = _native.bucket_batches(tasks, lengths, 16, seed)
        orders.add(tuple(np.concatenate(batches).tolist()))
    assert len(orders) == 8


def test_bucket_batches_group_similar_lengths():
    rng = np.random.default_rng(1)
    n, bs = 4096, 16
    tasks = rng.integers(0, 2, n)
    lengths = rng.integers(1, 512, n)
    batches = _native.bucket_batches(tasks, lengths, bs, seed=3, bucket_factor=16)
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_batches = np.array_split(rng.permutation(n), n // bs)
    random_spread = np.mean([np.ptp(lengths[b]) for b in random_batches])
    assert spread < 0.15 * random_spread, (spread, random_spread)
    # padding actually saved: tokens in padded batches vs random batching
    padded = sum(len(b) * lengths[b].max() for b in batches)
    padded_random = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * padded_random


def test_bucket_batches_unshuffled_order_is_sorted_and_seed_free():
    rng = np.random.default_rng(2)
    tasks = rng.integers(0, 3, 200)
    lengths = rng.integers(1, 50, 200)
    a = _native.bucket_batches(tasks, lengths, 8, seed=0, shuffle=False)
    b = _native.bucket_batches(tasks, lengths, 8, seed=99, shuffle=False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    flat = np.concatenate(a)
    want = np.lexsort((np.arange(200), lengths, tasks))
    np.testing.assert_array_equal(flat, want)


def test_bucket_batches_draw_tasks_in_proportion_to_size():
    tasks = np.array([0] * 3000 + [1] * 1000)
    lengths = np.arange(4000) % 97
    share_first_half = []
    for seed in range(20):
        batches = _native.bucket_batches(tasks, lengths, 10, seed)
        first = batches[: len(batches) // 2]
        share_first_half.append(np.mean([tasks[b[0]] == 0 for b in first]))
    # proportional sampling keeps the 3:1 mix throughout the epoch
    assert abs(np.mean(share_first_half) - 0.75) < 0.03


def test_bucket_batches_high_temperature_draws_tasks_uniformly():
    tasks = np.array([0] * 3000 + [1] * 1000)
    lengths = np.arange(4000) % 97
    shares = []
    for seed in range(20):
        batches = _native.bucket_batches(tasks, lengths, 10, seed, task_temperature=1e6)
        shares.append(np.mean([tasks[b[0]] == 0 for b in batches[:100]]))
    # uniform draws until the small task runs out: about half of the first 100 batches
    assert abs(np.mean(shares) - 0.5) < 0.05
