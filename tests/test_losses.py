"""Losses against plain per-query loop implementations of docs/method.md."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_embedder.losses import (
    LOSSES,
    ContrastiveLoss,
    EmbeddingLoss,
    GradedDistillationLoss,
    KLDistillationLoss,
    build_loss,
    gather_with_grad,
    register_loss,
)

TAU = 0.01


def _batch(seed: int, batch: int = 5, group: int = 4, dim: int = 8, *, pad: bool = True,
           dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, group, dim, generator=gen), dim=-1)
    rewards = torch.rand(batch, group, generator=gen)
    mask = torch.ones(batch, group, dtype=torch.bool)
    if pad:
        for b in range(batch):
            mask[b, int(torch.randint(1, group + 1, (1,), generator=gen)):] = False
    # Few distinct ids so that some keys of other queries duplicate a query's own candidates.
    ids = torch.randint(0, batch * group // 2, (batch, group), generator=gen)
    return q.to(dtype), k.to(dtype), rewards, mask, ids


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _other_keys(q, k, mask, ids, b, extra=None):
    """Scores of query b against keys of other queries that are not one of b's candidates."""
    own_ids = {int(ids[b, j]) for j in range(k.shape[1]) if mask[b, j]}
    pool = [(k[c, j], int(ids[c, j])) for c in range(k.shape[0]) if c != b
            for j in range(k.shape[1]) if mask[c, j]]
    if extra is not None:
        ek, emask, eids = extra
        pool += [(ek[c, j], int(eids[c, j])) for c in range(ek.shape[0])
                 for j in range(ek.shape[1]) if emask[c, j]]
    return [float(q[b].double() @ key.double()) / TAU for key, kid in pool if kid not in own_ids]


def reference_graded(q, k, rewards, mask, ids, teacher_temperature, in_batch=True, extra=None):
    losses = []
    for b in range(q.shape[0]):
        cand = [j for j in range(k.shape[1]) if mask[b, j]]
        cand.sort(key=lambda j: -float(rewards[b, j]))  # stable: ties keep index order
        scores = [float(q[b].double() @ k[b, j].double()) / TAU for j in cand]
        scaled = [float(rewards[b, j]) / teacher_temperature for j in cand]
        norm = _lse(scaled)
        weights = [math.exp(v - norm) for v in scaled]
        others = _other_keys(q, k, mask, ids, b, extra) if in_batch else []
        loss = 0.0
        for i in range(len(cand)):
            loss += weights[i] * (_lse(scores[i:] + others) - scores[i])
        losses.append(loss)
    return sum(losses) / len(losses)


def reference_infonce(q, k, positive, mask, ids, in_batch=True):
    losses = []
    for b in range(q.shape[0]):
        scores = [float(q[b].double() @ k[b, j].double()) / TAU
                  for j in range(k.shape[1]) if mask[b, j]]
        pos = float(q[b].double() @ k[b, positive[b]].double()) / TAU
        others = _other_keys(q, k, mask, ids, b) if in_batch else []
        losses.append(_lse(scores + others) - pos)
    return sum(losses) / len(losses)


def reference_kl(q, k, rewards, mask, teacher_temperature):
    losses = []
    for b in range(q.shape[0]):
        cand = [j for j in range(k.shape[1]) if mask[b, j]]
        scores = [float(q[b].double() @ k[b, j].double()) / TAU for j in cand]
        teacher = [float(rewards[b, j]) / teacher_temperature for j in cand]
        ls, lt = _lse(scores), _lse(teacher)
        losses.append(sum(math.exp(t - lt) * ((t - lt) - (s - ls))
                          for t, s in zip(teacher, scores)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("in_batch", [True, False])
def test_graded_distillation_equals_loop_reference(seed, in_batch):
    q, k, rewards, mask, ids = _batch(seed)
    loss_fn = GradedDistillationLoss(TAU, teacher_temperature=0.2, in_batch_negatives=in_batch)
    got = loss_fn(q, k, rewards, mask, ids)
    want = reference_graded(q, k, rewards, mask, ids, 0.2, in_batch)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_graded_distillation_gradient_equals_reference_gradient():
    q, k, rewards, mask, ids = _batch(11)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    q32, k32 = q.clone().requires_grad_(), k.clone().requires_grad_()
    GradedDistillationLoss(TAU, 0.3)(q32, k32, rewards, mask, ids).backward()
    # Same maths in float64 through torch ops of the reference's shape: loop over queries.
    total = 0
    for b in range(q.shape[0]):
        cand = sorted((j for j in range(k.shape[1]) if mask[b, j]),
                      key=lambda j: -float(rewards[b, j]))
        own = torch.stack([q64[b] @ k64[b, j] for j in cand]) / TAU
        others = [q64[b] @ k64[c, j] / TAU for c in range(q.shape[0]) if c != b
                  for j in range(k.shape[1]) if mask[c, j]
                  and int(ids[c, j]) not in {int(ids[b, i]) for i in cand}]
        others = torch.stack(others) if others else own.new_zeros(0)
        w = torch.softmax(rewards[b, cand].double() / 0.3, 0)
        for i in range(len(cand)):
            total = total + w[i] * (torch.logsumexp(torch.cat([own[i:], others]), 0) - own[i])
    (total / q.shape[0]).backward()
    assert torch.allclose(q32.grad.double(), q64.grad, atol=1e-3)
    assert torch.allclose(k32.grad.double(), k64.grad, atol=1e-3)
    assert torch.all(k32.grad[~mask] == 0)


@pytest.mark.parametrize("seed", range(3))
def test_graded_distillation_with_one_hot_rewards_is_infonce(seed):
    q, k, _, mask, ids = _batch(seed, pad=False)
    gen = torch.Generator().manual_seed(seed)
    positive = torch.randint(0, k.shape[1], (k.shape[0],), generator=gen)
    one_hot = F.one_hot(positive, k.shape[1]).float()
    graded = GradedDistillationLoss(TAU, teacher_temperature=1e-4)(q, k, one_hot, mask, ids)
    contrastive = ContrastiveLoss(TAU)(q, k, one_hot, mask, ids)
    want = reference_infonce(q, k, positive, mask, ids)
    assert graded.item() == pytest.approx(want, rel=1e-4)
    assert contrastive.item() == pytest.approx(want, rel=1e-4)


def test_contrastive_without_rewards_uses_candidate_zero():
    q, k, _, _, ids = _batch(3, pad=False)
    mask = torch.ones(k.shape[:2], dtype=torch.bool)
    got = ContrastiveLoss(TAU, in_batch_negatives=False)(q, k)
    want = reference_infonce(q, k, [0] * q.shape[0], mask, ids, in_batch=False)
    assert got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_kl_distillation_equals_loop_reference(seed):
    q, k, rewards, mask, ids = _batch(seed)
    got = KLDistillationLoss(TAU, teacher_temperature=0.1)(q, k, rewards, mask, ids)
    assert got.item() == pytest.approx(reference_kl(q, k, rewards, mask, 0.1), rel=1e-4, abs=1e-5)


def test_kl_distillation_is_zero_when_student_matches_teacher():
    q = F.normalize(torch.randn(2, 4), dim=-1)
    k = F.normalize(torch.randn(2, 3, 4), dim=-1)
    scores = torch.einsum("bd,bgd->bg", q, k)
    rewards = scores / TAU * 0.1  # softmax(r / 0.1) == softmax(s / TAU)
    loss = KLDistillationLoss(TAU, teacher_temperature=0.1)(q, k, rewards)
    assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize("name", ["graded", "kl", "contrastive"])
def test_masking_stays_finite_with_bf16_inputs(name):
    q, k, rewards, mask, ids = _batch(5, dtype=torch.bfloat16)
    q.requires_grad_()
    k.requires_grad_()
    loss = build_loss(name)(q, k, rewards, mask, ids)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()
    full = build_loss(name)(q.detach().float(), k.detach().float(), rewards, mask, ids)
    assert loss.item() == pytest.approx(full.item(), rel=0.05, abs=0.05)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(1, 3))
def test_graded_distillation_is_invariant_to_candidate_order(seed, shift):
    q, k, rewards, mask, ids = _batch(seed, pad=False)
    perm = torch.roll(torch.arange(k.shape[1]), shift)
    before = GradedDistillationLoss(TAU)(q, k, rewards, mask, ids)
    after = GradedDistillationLoss(TAU)(q, k[:, perm], rewards[:, perm], mask, ids[:, perm])
    assert after.item() == pytest.approx(before.item(), rel=1e-5)


def test_flat_rewards_weight_every_rank_equally():
    q, k, _, mask, ids = _batch(2, pad=False)
    flat = torch.full(k.shape[:2], 0.5)
    got = GradedDistillationLoss(TAU, 0.1, in_batch_negatives=False)(q, k, flat, mask, ids)
    want = reference_graded(q, k, flat, mask, ids, 0.1, in_batch=False)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_bad_inputs_name_the_argument():
    q, k, rewards, mask, _ = _batch(0, pad=False)
    with pytest.raises(ValueError, match="key_emb"):
        GradedDistillationLoss()(q, k[:, :, :3], rewards, mask)
    with pytest.raises(ValueError, match="rewards"):
        GradedDistillationLoss()(q, k, rewards[:, :2], mask)
    bad_mask = mask.clone()
    bad_mask[1] = False
    with pytest.raises(ValueError, match="no candidate"):
        KLDistillationLoss()(q, k, rewards, bad_mask)
    nan = rewards.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GradedDistillationLoss()(q, k, nan, mask)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")


# ----------------------------------------------------------------------------- cross-device

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cross_device_worker(rank: int, world: int, port: int, errors) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = [2, 3]  # uneven, as the last batch of an epoch can be
        batches = [_batch(100 + r, batch=sizes[r]) for r in range(world)]
        q, k, rewards, mask, ids = batches[rank]
        flat = k.reshape(-1, k.shape[-1]).clone().requires_grad_()
        gathered, offset = gather_with_grad(flat)
        assert offset == sum(sizes[:rank]) * k.shape[1]
        want = torch.cat([b[1].reshape(-1, k.shape[-1]) for b in batches])
        assert torch.equal(gathered.detach(), want)
        gathered.sum().backward()
        assert torch.equal(flat.grad, torch.ones_like(flat))  # local slice keeps its gradient

        _, ok, _, omask, oids = batches[1 - rank]
        got = GradedDistillationLoss(TAU, 0.2)(q, k, rewards, mask, ids)
        ref = reference_graded(q, k, rewards, mask, ids, 0.2, extra=(ok, omask, oids))
        assert got.item() == pytest.approx(ref, rel=1e-4), (got.item(), ref)
        local = GradedDistillationLoss(TAU, 0.2, cross_device=False)(q, k, rewards, mask, ids)
        assert local.item() < got.item()  # more negatives, larger loss
    except BaseException as err:  # surface the failure in the parent
        errors.put(f"rank {rank}: {err!r}")
        raise
    finally:
        dist.destroy_process_group()


def test_cross_device_negatives_under_two_gloo_processes():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_cross_device_worker, args=(2, _free_port(), errors), nprocs=2,
                       start_method="spawn")
    assert errors.empty()


@pytest.mark.parametrize("name", ["graded", "kl", "contrastive"])
def test_reduction_none_gives_one_loss_per_query(name):
    q, k, rewards, mask, ids = _batch(8)
    per_query = build_loss(name, reduction="none")(q, k, rewards, mask, ids)
    assert per_query.shape == (q.shape[0],)
    assert per_query.mean().item() == pytest.approx(build_loss(name)(q, k, rewards, mask,
                                                                      ids).item(), rel=1e-6)


# ----------------------------------------------------------------------------- registry


def test_every_registered_loss_takes_the_shared_keywords():
    q, k, rewards, mask, ids = _batch(9)
    for name in LOSSES:
        loss_fn = build_loss(name, score_temperature=0.05, teacher_temperature=0.2,
                             in_batch_negatives=False, cross_device=False, reduction="none")
        assert loss_fn.score_temperature == 0.05 and loss_fn.teacher_temperature == 0.2
        assert loss_fn(q, k, rewards, mask, ids).shape == (q.shape[0],)


def test_a_registered_loss_is_built_by_name():
    class Top1Loss(EmbeddingLoss):
        def forward(self, query_emb, key_emb, rewards, mask=None, key_ids=None):
            return self._reduce(-self._own_scores(query_emb, key_emb)[:, 0])

    try:
        register_loss("top1")(Top1Loss)
        q, k, rewards, mask, ids = _batch(3, pad=False)
        loss_fn = build_loss("top1", score_temperature=0.5)
        assert isinstance(loss_fn, Top1Loss)
        want = -(q * k[:, 0]).sum(-1).mean() / 0.5
        assert loss_fn(q, k, rewards, mask, ids).item() == pytest.approx(want.item(), rel=1e-6)
        with pytest.raises(ValueError, match="'top1' is already registered"):
            register_loss("top1")(ContrastiveLoss)
    finally:
        LOSSES.pop("top1", None)


def test_unknown_loss_and_bad_temperatures_are_named():
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; known losses: \['contrastive'"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="score_temperature must be > 0"):
        build_loss("graded", score_temperature=0.0)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        build_loss("kl", teacher_temperature=-1.0)
    with pytest.raises(TypeError, match="temperature"):
        build_loss("graded", temperature=0.01)  # the old name is gone: one naming scheme


# ---- teacher_temperature="auto": T per query from the spread of its rewards -----------------


@pytest.mark.parametrize("name", ["graded", "kl"])
# (ranges where float32 still resolves the rewards: a tiny spread on a large offset does not)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e2), shift=st.floats(-5, 5))
@settings(max_examples=25, deadline=None)
def test_auto_teacher_ignores_the_rewards_scale_and_offset(name, seed, scale, shift):
    q, k, rewards, mask, ids = _batch(seed)
    loss_fn = build_loss(name, score_temperature=TAU, teacher_temperature="auto",
                         reduction="none")
    want = loss_fn(q, k, rewards, mask, ids)
    got = loss_fn(q, k, rewards * scale + shift, mask, ids)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["graded", "kl"])
def test_auto_teacher_is_the_fixed_teacher_at_spread_times_std(name):
    q, k, rewards, mask, ids = _batch(3, pad=False)
    auto = build_loss(name, score_temperature=TAU, teacher_temperature="auto",
                      teacher_spread=0.7, reduction="none")(q, k, rewards, mask, ids)
    for b in range(q.shape[0]):
        temperature = 0.7 * float(rewards[b].std(unbiased=False))
        fixed = build_loss(name, score_temperature=TAU, teacher_temperature=temperature,
                           reduction="none")(q, k, rewards, mask, ids)
        assert float(auto[b]) == pytest.approx(float(fixed[b]), rel=1e-4)


@pytest.mark.parametrize("name", ["graded", "kl"])
def test_auto_teacher_skips_queries_whose_rewards_are_all_equal(name):
    q, k, rewards, mask, ids = _batch(4, pad=False)
    rewards[1] = 0.25  # a tie everywhere: no order to learn
    q.requires_grad_(True)
    losses = build_loss(name, score_temperature=TAU, teacher_temperature="auto",
                        reduction="none")(q, k, rewards, mask, ids)
    assert float(losses[1].detach()) == 0.0 and bool((losses[[0, 2, 3, 4]] > 0).all())
    losses.sum().backward()
    assert float(q.grad[1].abs().sum()) == 0.0  # and no gradient from it
    with pytest.raises(ValueError, match="teacher_temperature must be > 0 or 'auto'"):
        build_loss(name, teacher_temperature="spread")
    with pytest.raises(ValueError, match="teacher_spread must be > 0"):
        build_loss(name, teacher_temperature="auto", teacher_spread=0.0)
