"""Training objectives (docs/method.md, Losses): contrastive, graded and KL distillation.

Losses live in a registry (:data:`LOSSES`, name -> class): ``build_loss(name, **kwargs)``
builds one, and a new loss is one :class:`EmbeddingLoss` subclass plus ``@register_loss(name)``.
All of them take the same inputs, so a task can switch objective without touching the data
path:

- ``query_emb`` [B, d]: L2-normalised query embeddings;
- ``key_emb`` [B, G, d]: the G candidates of each query (padded; ``mask`` marks real ones);
- ``rewards`` [B, G]: the frozen LLM's reward of each candidate (higher is better);
- ``mask`` [B, G] bool (optional): False on padding;
- ``key_ids`` [B, G] int64 (optional): one id per distinct key text. A key of another query that
  is also one of this query's candidates is never used as an in-batch negative (queries of one
  passage, tool or demo often share a batch, and their positive must not push them apart).

Scores are ``cos(q, k) / score_temperature`` computed in float32 whatever the input dtype, and
masked with ``-inf`` in float32 (never ``dtype.min``, which overflows in bf16/fp16 arithmetic).
Keys of the other queries in the batch, and under ``torch.distributed`` those of every other
rank (:func:`gather_with_grad`), serve as extra negatives when ``in_batch_negatives`` is on.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "EmbeddingLoss",
    "GradedDistillationLoss",
    "KLDistillationLoss",
    "build_loss",
    "gather_with_grad",
    "register_loss",
]

_NEG_INF = float("-inf")

#: ``teacher_temperature="auto"``: T of each query is this times the standard deviation of its
#: candidates' rewards (``teacher_spread`` overrides it), so one reward's scale (rank-aware
#: rewards step by 1/(N+1), likelihoods by fractions of a nat) sets no sharpness of its own.
DEFAULT_TEACHER_SPREAD = 0.5
#: Rewards whose within-query standard deviation is below this carry no order to learn.
_FLAT_REWARD_STD = 1e-6


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: Tensor) -> Tuple[Tensor, int]:
    """Concatenate ``tensor`` (dim 0) from every rank, keeping the local slice differentiable.

    ``all_gather`` returns detached copies; the own rank's copy is replaced by the local tensor
    so gradients flow into this rank's encoder (those of other ranks' slices are computed on
    their own ranks). Ranks may hold different dim-0 sizes (the last batch of an epoch).
    Returns ``(gathered, offset)`` with ``offset`` the index of this rank's first row.
    Without an initialised process group it returns ``(tensor, 0)``.

    Example:
        >>> keys, offset = gather_with_grad(local_keys)  # [sum of B_r, d]
    """
    if not _distributed():
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.detach()
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([padded, pad], dim=0)
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous())
    parts: List[Tensor] = [buf[:n] for buf, n in zip(buffers, counts)]
    parts[rank] = tensor
    return torch.cat(parts, dim=0), sum(counts[:rank])


def _check_inputs(query_emb: Tensor, key_emb: Tensor, rewards: Optional[Tensor],
                  mask: Optional[Tensor], key_ids: Optional[Tensor]) -> Tensor:
    if query_emb.dim() != 2:
        raise ValueError(f"query_emb must be [B, d], got shape {tuple(query_emb.shape)}")
    if key_emb.dim() != 3 or key_emb.shape[0] != query_emb.shape[0] \
            or key_emb.shape[2] != query_emb.shape[1]:
        raise ValueError(f"key_emb must be [B, G, d] = [{query_emb.shape[0]}, G, "
                         f"{query_emb.shape[1]}], got shape {tuple(key_emb.shape)}")
    shape = key_emb.shape[:2]
    if rewards is not None and rewards.shape != shape:
        raise ValueError(f"rewards must be [B, G] = {tuple(shape)}, got {tuple(rewards.shape)}")
    if key_ids is not None and key_ids.shape != shape:
        raise ValueError(f"key_ids must be [B, G] = {tuple(shape)}, got {tuple(key_ids.shape)}")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=key_emb.device)
    elif mask.shape != shape:
        raise ValueError(f"mask must be [B, G] = {tuple(shape)}, got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        empty = int((~mask.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"query {empty} of the batch has no candidate (mask all False)")
    if rewards is not None and not bool(torch.isfinite(rewards[mask]).all()):
        raise ValueError("rewards hold NaN or inf at unmasked candidates")
    return mask


def _sort_by_reward(rewards: Tensor, mask: Tensor) -> Tensor:
    """Per query, candidate order by reward descending, padding last (stable for ties)."""
    keyed = rewards.float().masked_fill(~mask, _NEG_INF)
    return torch.sort(keyed, dim=1, descending=True, stable=True).indices


#: The loss registry: name -> loss class (an ``nn.Module`` taking the keywords of
#: :class:`EmbeddingLoss`). Tasks, ``TrainConfig.loss`` and the ablations pick losses by name.
LOSSES: Dict[str, Type[nn.Module]] = {}

L = TypeVar("L", bound=Type[nn.Module])


def register_loss(name: str, *, overwrite: bool = False) -> Callable[[L], L]:
    """Class decorator adding a loss to :data:`LOSSES` under ``name``.

    Example:
        >>> @register_loss("top1")
        ... class Top1Loss(EmbeddingLoss):
        ...     def forward(self, q, k, rewards, mask=None, key_ids=None):
        ...         return self._reduce(-self._own_scores(q, k)[:, 0])
    """

    def add(cls: L) -> L:
        if name in LOSSES and LOSSES[name] is not cls and not overwrite:
            raise ValueError(f"loss {name!r} is already registered ({LOSSES[name].__name__}); "
                             f"pass overwrite=True to replace it")
        LOSSES[name] = cls
        return cls

    return add


class EmbeddingLoss(nn.Module):
    """Base of the registered losses: the shared constructor vocabulary and the scoring.

    Every loss takes the same keywords, so ``build_loss(name, **kwargs)`` builds any of them:

    - ``score_temperature`` (tau): scores are ``s = cos(q, k) / tau``;
    - ``teacher_temperature`` (T): the teacher distribution is ``softmax(r / T)`` over a
      query's candidates (graded and KL distillation; contrastive ignores it). ``"auto"``: T
      of each query is ``teacher_spread`` times the standard deviation of its rewards, i.e.
      ``softmax(z / teacher_spread)`` of the rewards' z-scores, whatever the reward's scale;
      a query whose rewards are all equal has nothing to teach and gets loss 0;
    - ``in_batch_negatives``: keys of the other queries in the batch are extra negatives (KL
      ignores it: it compares each query with its own candidates only);
    - ``cross_device``: under ``torch.distributed`` those of every rank too;
    - ``reduction``: ``"mean"`` over queries, or ``"none"`` for the loss of each query ([B]).

    A new loss subclasses this, implements ``forward(query_emb, key_emb, rewards, mask,
    key_ids)`` and is registered with :func:`register_loss`.

    Example:
        >>> loss_fn = GradedDistillationLoss(score_temperature=0.01, teacher_temperature=0.1)
    """

    def __init__(self, score_temperature: float = 0.01,
                 teacher_temperature: Union[float, str] = 0.1, *,
                 teacher_spread: float = DEFAULT_TEACHER_SPREAD,
                 in_batch_negatives: bool = True, cross_device: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        if not score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0, got {score_temperature}")
        if teacher_temperature != "auto" and not (
                isinstance(teacher_temperature, (int, float)) and teacher_temperature > 0):
            raise ValueError(f"teacher_temperature must be > 0 or 'auto', got "
                             f"{teacher_temperature!r}")
        if not teacher_spread > 0:
            raise ValueError(f"teacher_spread must be > 0, got {teacher_spread}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.score_temperature = float(score_temperature)
        self.teacher_temperature: Union[float, str] = (
            "auto" if teacher_temperature == "auto" else float(teacher_temperature))
        self.teacher_spread = float(teacher_spread)
        self.in_batch_negatives = in_batch_negatives
        self.cross_device = cross_device

    def _reduce(self, per_query: Tensor) -> Tensor:
        return per_query.mean() if self.reduction == "mean" else per_query

    def _teacher_logits(self, rewards: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
        """([B, G] float32 ``r / T`` with -inf on padding, [B] bool: the query teaches)."""
        reward = rewards.float()
        if self.teacher_temperature == "auto":
            count = valid.sum(dim=1, keepdim=True).clamp_min(1)
            mean = reward.masked_fill(~valid, 0.0).sum(dim=1, keepdim=True) / count
            var = ((reward - mean) ** 2).masked_fill(~valid, 0.0).sum(dim=1, keepdim=True) / count
            std = var.sqrt()
            teaches = std[:, 0] > _FLAT_REWARD_STD
            scaled = (reward - mean) / (self.teacher_spread * std.clamp_min(_FLAT_REWARD_STD))
        else:
            teaches = torch.ones(reward.shape[0], dtype=torch.bool, device=reward.device)
            scaled = reward / self.teacher_temperature
        return scaled.masked_fill(~valid, _NEG_INF), teaches

    def _own_scores(self, query_emb: Tensor, key_emb: Tensor) -> Tensor:
        """[B, G] float32 scores of each query against its own candidates."""
        q, k = query_emb.float(), key_emb.float()
        return torch.einsum("bd,bgd->bg", q, k) / self.score_temperature

    def _other_scores(self, query_emb: Tensor, key_emb: Tensor, mask: Tensor,
                      key_ids: Optional[Tensor]) -> Optional[Tensor]:
        """[B, N] float32 scores against every key of the other queries (all ranks), with -inf
        on padding, on the query's own candidates and on keys equal to one of them."""
        if not self.in_batch_negatives:
            return None
        batch, group, dim = key_emb.shape
        flat = key_emb.reshape(batch * group, dim)
        flat_mask = mask.reshape(-1)
        flat_ids = key_ids.reshape(-1) if key_ids is not None else None
        offset = 0
        if self.cross_device and _distributed():
            flat, offset = gather_with_grad(flat)
            # gloo has no bool all_gather
            flat_mask = gather_with_grad(flat_mask.to(torch.uint8))[0].to(torch.bool)
            if flat_ids is not None:
                flat_ids, _ = gather_with_grad(flat_ids)
        scores = query_emb.float() @ flat.float().T / self.score_temperature  # [B, N]
        position = torch.arange(flat.shape[0], device=flat.device)
        own_start = offset + torch.arange(batch, device=flat.device) * group
        own = (position[None, :] >= own_start[:, None]) & \
              (position[None, :] < own_start[:, None] + group)
        exclude = own | ~flat_mask[None, :]
        if flat_ids is not None:
            same = (flat_ids[None, None, :] == key_ids[:, :, None]) & mask[:, :, None]
            exclude |= same.any(dim=1)
        return scores.masked_fill(exclude, _NEG_INF)


@register_loss("contrastive")
class ContrastiveLoss(EmbeddingLoss):
    """InfoNCE: the best-rewarded candidate against the query's other candidates and all
    in-batch (and cross-device) keys of other queries.

    Without ``rewards`` the candidate at index 0 is the positive. ``teacher_temperature`` is
    not used (the target is one candidate, not a distribution).

    Example:
        >>> loss = ContrastiveLoss()(q, k, rewards, mask)  # q [B, d], k [B, G, d]
    """

    def forward(self, query_emb: Tensor, key_emb: Tensor, rewards: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, key_ids: Optional[Tensor] = None) -> Tensor:
        mask = _check_inputs(query_emb, key_emb, rewards, mask, key_ids)
        own = self._own_scores(query_emb, key_emb).masked_fill(~mask, _NEG_INF)
        if rewards is None:
            if not bool(mask[:, 0].all()):
                raise ValueError("without rewards, candidate 0 (the positive) must be unmasked")
            target = torch.zeros(own.shape[0], dtype=torch.long, device=own.device)
        else:
            target = _sort_by_reward(rewards, mask)[:, 0]
        other = self._other_scores(query_emb, key_emb, mask, key_ids)
        logits = own if other is None else torch.cat([own, other], dim=1)
        return self._reduce(F.cross_entropy(logits, target, reduction="none"))


@register_loss("graded")
class GradedDistillationLoss(EmbeddingLoss):
    """Graded distillation (docs/method.md): a reward-weighted cascade of masked cross-entropies.

    Candidates of query b are sorted by reward, descending; w_b = softmax(r_b / T) with T the
    ``teacher_temperature``. For each rank i the loss is CE over the scores with b's
    higher-ranked candidates (positions < i) masked to -inf, target candidate i, with in-batch
    keys of other queries as extra negatives; L_b = sum_i w_{b,i} CE_i, averaged over b. A
    polarised reward (all weight on i = 0) gives InfoNCE; a flat one a listwise
    (Plackett-Luce-like) loss.

    Example:
        >>> loss = GradedDistillationLoss(teacher_temperature=0.1)(q, k, rewards, mask)
    """

    def forward(self, query_emb: Tensor, key_emb: Tensor, rewards: Tensor,
                mask: Optional[Tensor] = None, key_ids: Optional[Tensor] = None) -> Tensor:
        if rewards is None:
            raise ValueError("GradedDistillationLoss needs rewards")
        mask = _check_inputs(query_emb, key_emb, rewards, mask, key_ids)
        order = _sort_by_reward(rewards, mask)
        valid = torch.gather(mask, 1, order)
        reward = torch.gather(rewards.float(), 1, order)
        # Padding gets a finite dummy score so that its own (zero-weight) row stays finite.
        own = torch.gather(self._own_scores(query_emb, key_emb), 1, order)
        own = own.masked_fill(~valid, 0.0)
        logits, teaches = self._teacher_logits(reward, valid)
        weights = torch.softmax(logits, dim=1)
        group = own.shape[1]
        rank = torch.arange(group, device=own.device)
        # keep[b, i, j]: candidate j competes in row i (not ranked above i, not padding);
        # j == i is always kept so every row holds its own finite target.
        keep = ((rank[None, :] >= rank[:, None])[None] & valid[:, None, :]) | \
            torch.eye(group, dtype=torch.bool, device=own.device)[None]
        rows = own[:, None, :].expand(-1, group, -1).masked_fill(~keep, _NEG_INF)
        other = self._other_scores(query_emb, key_emb, mask, key_ids)
        if other is not None:
            rows = torch.cat([rows, other[:, None, :].expand(-1, group, -1)], dim=2)
        cross_entropy = torch.logsumexp(rows, dim=2) - own  # [B, G]
        per_query = (weights * cross_entropy.masked_fill(~valid, 0.0)).sum(dim=1)
        return self._reduce(per_query * teaches)


@register_loss("kl")
class KLDistillationLoss(EmbeddingLoss):
    """KL(softmax(r / T) || softmax(s)) over each query's own candidates, averaged over
    queries — for tasks without a shared corpus (chat, lrlm), where in-batch keys of other
    queries are no meaningful negatives (``in_batch_negatives`` and ``cross_device`` are not
    used).

    Example:
        >>> loss = KLDistillationLoss(teacher_temperature=0.1)(q, k, rewards, mask)
    """

    def forward(self, query_emb: Tensor, key_emb: Tensor, rewards: Tensor,
                mask: Optional[Tensor] = None, key_ids: Optional[Tensor] = None) -> Tensor:
        if rewards is None:
            raise ValueError("KLDistillationLoss needs rewards")
        mask = _check_inputs(query_emb, key_emb, rewards, mask, key_ids)
        own = self._own_scores(query_emb, key_emb).masked_fill(~mask, _NEG_INF)
        log_student = torch.log_softmax(own, dim=1).masked_fill(~mask, 0.0)
        logits, teaches = self._teacher_logits(rewards, mask)
        teacher = torch.softmax(logits, dim=1)
        kl = torch.xlogy(teacher, teacher) - teacher * log_student
        return self._reduce(kl.sum(dim=1) * teaches)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """The registered loss called ``name``, built with the shared keywords of
    :class:`EmbeddingLoss` (``score_temperature``, ``teacher_temperature``, ``teacher_spread``,
    ``in_batch_negatives``, ``cross_device``, ``reduction``).

    ``reduction="none"`` returns the loss of each query ([B]) instead of their mean.

    Example:
        >>> loss_fn = build_loss("graded", teacher_temperature=0.1, reduction="none")
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None
    return cls(**kwargs)
