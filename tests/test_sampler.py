"""Homogeneous batching with resumable positions and DDP shares; self-paced lr factors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llm_embedder.sampler import HomogeneousBatchSampler, SelfPacedScheduler


def _data(n: int = 203, tasks: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, tasks, n), rng.integers(5, 400, n)


def _epoch(sampler):
    return [b.copy() for b in sampler]


def test_every_batch_holds_one_task_and_every_example_is_used_once_per_epoch():
    task_ids, lengths = _data()
    sampler = HomogeneousBatchSampler(task_ids, lengths, batch_size=8, seed=3)
    for _ in range(2):
        batches = _epoch(sampler)
        assert len(batches) == len(sampler)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(task_ids)))
        for batch in batches:
            assert len(set(task_ids[batch].tolist())) == 1
            assert sampler.task_of(batch) == task_ids[batch[0]]


def test_epochs_differ_and_the_seed_fixes_the_order():
    task_ids, lengths = _data()
    a = HomogeneousBatchSampler(task_ids, lengths, 8, seed=1)
    b = HomogeneousBatchSampler(task_ids, lengths, 8, seed=1)
    first, second = _epoch(a), _epoch(a)
    assert [x.tolist() for x in first] == [x.tolist() for x in _epoch(b)]
    assert [x.tolist() for x in first] != [x.tolist() for x in second]
    other = HomogeneousBatchSampler(task_ids, lengths, 8, seed=2)
    assert [x.tolist() for x in _epoch(other)] != [x.tolist() for x in first]


def test_batches_group_similar_lengths():
    task_ids = np.zeros(512, dtype=np.int64)
    lengths = np.random.default_rng(0).integers(1, 1000, 512)
    batches = _epoch(HomogeneousBatchSampler(task_ids, lengths, 16, seed=0))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    shuffled = np.random.default_rng(1).permutation(512).reshape(-1, 16)
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in shuffled])


@pytest.mark.parametrize("stop", [1, 7, 27, 30])  # 27 batches an epoch
def test_a_resumed_sampler_continues_with_the_next_batch(stop):
    task_ids, lengths = _data()
    reference = HomogeneousBatchSampler(task_ids, lengths, 8, seed=5)
    want = [b.tolist() for b in itertools.islice(itertools.chain(_epoch(reference),
                                                                  _epoch(reference)), 40)]
    first = HomogeneousBatchSampler(task_ids, lengths, 8, seed=5)
    got = []
    while len(got) < stop:
        for batch in first:
            got.append(batch.tolist())
            if len(got) == stop:
                break
    state = first.state_dict()
    resumed = HomogeneousBatchSampler(task_ids, lengths, 8, seed=5)
    resumed.load_state_dict(state)
    while len(got) < 40:
        for batch in resumed:
            got.append(batch.tolist())
            if len(got) == 40:
                break
    assert got == want


def test_resume_refuses_a_different_batching():
    task_ids, lengths = _data()
    state = HomogeneousBatchSampler(task_ids, lengths, 8, seed=5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        HomogeneousBatchSampler(task_ids, lengths, 16, seed=5).load_state_dict(state)


def test_ranks_split_each_batch_and_train_the_same_task_at_each_step():
    task_ids, lengths = _data(101)
    ranks = [HomogeneousBatchSampler(task_ids, lengths, 4, seed=0, rank=r, world_size=3)
             for r in range(3)]
    global_batches = ranks[0].global_batches(0)
    for step, shares in enumerate(zip(*(_epoch(s) for s in ranks))):
        assert all(len(share) >= 1 for share in shares)
        assert len({int(task_ids[share[0]]) for share in shares}) == 1
        if len(global_batches[step]) >= 3:
            assert np.concatenate(shares).tolist() == global_batches[step].tolist()
        else:  # too small for the world: repeated so that every rank steps
            assert set(np.concatenate(shares).tolist()) == set(global_batches[step].tolist())
    assert max(len(b) for b in global_batches) == 12


def test_mixed_batches_pool_tasks_and_still_cover_every_example():
    task_ids, lengths = _data(300)
    sampler = HomogeneousBatchSampler(task_ids, lengths, 16, seed=0, mixed=True)
    batches = _epoch(sampler)
    assert sorted(np.concatenate(batches).tolist()) == list(range(300))
    assert sum(sampler.task_of(b) == -1 for b in batches) > len(batches) // 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="equal size"):
        HomogeneousBatchSampler([0, 1], [3], 2)
    with pytest.raises(ValueError, match="batch_size"):
        HomogeneousBatchSampler([0], [3], 0)
    with pytest.raises(ValueError, match="rank"):
        HomogeneousBatchSampler([0], [3], 1, rank=2, world_size=2)


# ----------------------------------------------------------------------------- self-paced


def _quickstart_like():
    """Sizes of the quickstart's tasks (qa, tool, chat, icl): icl is the small one."""
    task_ids = np.repeat(np.arange(4), [784, 600, 429, 75])
    return task_ids, np.random.default_rng(0).integers(5, 400, len(task_ids))


@pytest.mark.parametrize("share", [0.15, 0.2, 0.3])
def test_a_small_task_gets_its_minimum_share_of_the_first_steps(share):
    task_ids, lengths = _quickstart_like()
    plain = HomogeneousBatchSampler(task_ids, lengths, batch_size=24, seed=1,
                                    task_temperature=2.0)
    sampler = HomogeneousBatchSampler(task_ids, lengths, batch_size=24, seed=1,
                                      task_temperature=2.0, min_share={3: share})
    first = list(itertools.islice(iter(plain), 44))
    assert sum(plain.task_of(b) == 3 for b in first) / 44 < 0.15  # without it: too few
    assert plain.task_repeats() == {0: 1, 1: 1, 2: 1, 3: 1}
    epoch = _epoch(sampler)
    copies = sampler.task_repeats()[3]
    assert copies >= 2 and {t: n for t, n in sampler.task_repeats().items() if t != 3} == \
        {0: 1, 1: 1, 2: 1}
    icl_share = sum(sampler.task_of(b) == 3 for b in epoch[:44]) / 44
    assert icl_share >= share - 0.05  # the share of the draws, up to their randomness
    used = np.concatenate(epoch)
    counts = np.bincount(used, minlength=len(task_ids))
    assert (counts[task_ids == 3] == copies).all() and (counts[task_ids != 3] == 1).all()
    for batch in epoch:  # homogeneous, and no example twice in a batch
        assert len(set(task_ids[batch].tolist())) == 1 and len(set(batch.tolist())) == len(batch)


def test_min_share_is_checked_and_part_of_the_resume_state():
    task_ids, lengths = _quickstart_like()
    with pytest.raises(ValueError, match="min_share of task 3 must be in"):
        HomogeneousBatchSampler(task_ids, lengths, batch_size=24, min_share={3: 1.0})
    sampler = HomogeneousBatchSampler(task_ids, lengths, batch_size=24, min_share={3: 0.3})
    other = HomogeneousBatchSampler(task_ids, lengths, batch_size=24)
    with pytest.raises(ValueError, match="repeats"):
        other.load_state_dict(sampler.state_dict())


def test_self_paced_scale_falls_for_a_task_whose_loss_falls_and_not_for_a_flat_one():
    pace = SelfPacedScheduler(["learnt", "hard"], s_min=0.1, ema=0.8, init_batches=3)
    rng = np.random.default_rng(0)
    for step in range(60):
        learnt = pace.update("learnt", 3.0 * 0.95 ** step)
        hard = pace.update("hard", 3.0 + 0.05 * rng.standard_normal())
    assert learnt < 0.25
    assert hard > 0.97
    assert pace.scales()["learnt"] == pytest.approx(learnt)


def test_scale_is_one_until_the_initial_loss_is_known_and_clipped_to_its_bounds():
    pace = SelfPacedScheduler(["t"], s_min=0.2, ema=0.0, init_batches=2)
    assert pace.update("t", 2.0) == 1.0
    assert pace.update("t", 2.0) == 1.0  # L0 = 2
    assert pace.update("t", 1.0) == pytest.approx(0.5)
    assert pace.update("t", 0.01) == pytest.approx(0.2)  # s_min
    assert pace.update("t", 5.0) == 1.0  # never above 1


def test_fixed_mode_always_gives_one():
    pace = SelfPacedScheduler(["t"], mode="fixed", init_batches=1)
    assert all(pace.update("t", 3.0 / (i + 1)) == 1.0 for i in range(20))


def test_self_paced_state_round_trips():
    pace = SelfPacedScheduler(["a", "b"], init_batches=2)
    for loss in (3.0, 2.5, 2.0):
        pace.update("a", loss)
    pace.update("b", 1.0)
    restored = SelfPacedScheduler(["a", "b"], init_batches=2)
    restored.load_state_dict(pace.state_dict())
    for loss in (1.5, 1.2, 0.9):
        assert restored.update("a", loss) == pace.update("a", loss)
        assert restored.update("b", loss) == pace.update("b", loss)


def test_self_paced_rejects_unknown_tasks_and_nan():
    pace = SelfPacedScheduler(["a"])
    with pytest.raises(ValueError, match="unknown task"):
        pace.update("b", 1.0)
    with pytest.raises(ValueError, match="nan"):
        pace.update("a", float("nan"))
