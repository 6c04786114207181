"""Multi-task batching and self-paced learning rates (docs/method.md).

:class:`HomogeneousBatchSampler` turns (task, length) per example into batches that each hold
one task (so in-batch negatives are real negatives), with similar lengths together (less
padding), tasks interleaved in proportion to their size, every example used once per epoch and
the order fixed by the seed. The batches come from the native ``bucket_batches``; this class
adds epochs, a resumable position and the split of each batch over distributed ranks.

:class:`SelfPacedScheduler` keeps per task the initial loss L⁰ and an EMA L̄ and gives the lr
factor clip(L̄ / L⁰, s_min, 1): tasks already learnt slow down, the others keep their pace.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["HomogeneousBatchSampler", "SelfPacedScheduler"]

IntArray = npt.NDArray[np.int64]


class HomogeneousBatchSampler:
    """Batches of example indices, one task per batch, resumable and split across ranks.

    Args:
        task_ids: int task id per example.
        lengths: a length per example (tokens or characters): examples of similar length are
            batched together.
        batch_size: examples per batch *per rank*; a global batch holds
            ``batch_size * world_size`` examples of one task and every rank takes a contiguous
            share, so all ranks train on the same task at the same step.
        seed: the order of epoch e is fixed by ``seed + e``.
        mixed: pool all tasks (the ablation of homogeneous batching): batches are then drawn
            uniformly at random, without length bucketing, which would otherwise sort
            examples by task wherever tasks differ in length.
        task_temperature: 1 draws tasks in proportion to their size, larger is more uniform.
        min_share: task id -> the least share of an epoch's batches it should get (e.g.
            ``{3: 0.15}``): a task below it is repeated whole, as many times as it takes (each
            copy batched on its own, so no batch holds an example twice; an epoch then uses
            that task's examples that many times). See :meth:`task_repeats`.
        bucket_factor: batches per length-sorting pool (larger: less padding, less random).
        rank, world_size: this process's share (default: from ``torch.distributed`` when
            initialised, else 0 and 1).

    Iterating yields the local index arrays of the rest of the current epoch; the next
    iteration starts the next epoch. :meth:`state_dict` records the position (epoch and batches
    already yielded), so a resumed run continues with the very next batch.

    Example:
        >>> sampler = HomogeneousBatchSampler(task_ids, lengths, batch_size=32, seed=0)
        >>> for indices in sampler:
        ...     train_step(indices)  # all of one task
    """

    def __init__(self, task_ids: Sequence[int], lengths: Sequence[int], batch_size: int,
                 seed: int = 0, *, mixed: bool = False, task_temperature: float = 1.0,
                 min_share: Optional[Dict[int, float]] = None,
                 bucket_factor: int = 16, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        self.task_ids = np.ascontiguousarray(task_ids, dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if self.task_ids.ndim != 1 or self.task_ids.shape != self.lengths.shape:
            raise ValueError(f"task_ids and lengths must be 1-D of equal size, got shapes "
                             f"{self.task_ids.shape} and {self.lengths.shape}")
        if len(self.task_ids) == 0:
            raise ValueError("no examples to batch")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.mixed = mixed
        self.task_temperature = float(task_temperature)
        self.bucket_factor = 1 if mixed else int(bucket_factor)
        self.rank, self.world_size = rank, world_size
        self.min_share = dict(min_share or {})
        for task, share in self.min_share.items():
            if not 0 <= share < 1:
                raise ValueError(f"min_share of task {task} must be in [0, 1), got {share}")
        self.repeats = self.task_repeats()
        self.epoch = 0
        self.position = 0  # global batches of `epoch` already yielded
        self._cache: Dict[int, List[IntArray]] = {}

    # ---- batches --------------------------------------------------------------------------

    def task_repeats(self) -> Dict[int, int]:
        """Copies per epoch of each task (1 unless ``min_share`` asks for more): the fewest
        with which the task's share of the first draws, ``copies * batches^(1/T)`` over the
        sum of all, reaches its minimum (draws follow remaining batches^(1/T))."""
        tasks, counts = np.unique(self.task_ids, return_counts=True)
        size = self.batch_size * self.world_size
        weight = {int(t): math.ceil(int(n) / size) ** (1.0 / self.task_temperature)
                  for t, n in zip(tasks, counts)}
        repeats = {t: 1 for t in weight}
        if self.mixed:
            return repeats
        for task, share in self.min_share.items():
            if task not in weight or share <= 0:
                continue
            others = sum(w * repeats[t] for t, w in weight.items() if t != task)
            # copies * w / (copies * w + others) >= share
            repeats[task] = max(1, math.ceil(share * others / ((1 - share) * weight[task])))
        return repeats

    def global_batches(self, epoch: int) -> List[IntArray]:
        """All ranks' batches of ``epoch`` (each ``batch_size * world_size`` or fewer)."""
        if epoch not in self._cache:
            from . import _native

            # Copies of a repeated task are pseudo-tasks of their own (ids past the real ones).
            pool = np.arange(len(self.task_ids), dtype=np.int64)
            pseudo = np.zeros_like(self.task_ids) if self.mixed else self.task_ids.copy()
            next_id = int(self.task_ids.max()) + 1
            for task, copies in self.repeats.items():
                mine = np.flatnonzero(self.task_ids == task)
                for _ in range(copies - 1):
                    pool = np.concatenate([pool, mine])
                    pseudo = np.concatenate([pseudo, np.full(len(mine), next_id)])
                    next_id += 1
            batches = _native.bucket_batches(
                np.ascontiguousarray(pseudo), np.ascontiguousarray(self.lengths[pool]),
                self.batch_size * self.world_size, (self.seed + epoch) % 2**63, shuffle=True,
                bucket_factor=self.bucket_factor, task_temperature=self.task_temperature)
            self._cache = {epoch: [pool[np.asarray(b, dtype=np.int64)] for b in batches]}
        return self._cache[epoch]

    def local_share(self, batch: IntArray) -> IntArray:
        """This rank's contiguous part of a global batch; a batch smaller than the world is
        repeated cyclically first so that no rank is left without data (DDP needs every rank
        to step)."""
        if self.world_size == 1:
            return batch
        if len(batch) < self.world_size:
            batch = np.resize(batch, self.world_size)
        return np.array_split(batch, self.world_size)[self.rank]

    def __len__(self) -> int:
        """Batches (steps) per epoch."""
        return len(self.global_batches(self.epoch))

    def __iter__(self) -> Iterator[IntArray]:
        if self.position >= len(self.global_batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        batches = self.global_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield self.local_share(batch)

    def task_of(self, indices: IntArray) -> int:
        """The task id of a homogeneous batch (-1 when it mixes tasks)."""
        tasks = np.unique(self.task_ids[indices])
        return int(tasks[0]) if len(tasks) == 1 else -1

    # ---- resume ---------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "mixed": self.mixed, "num_examples": len(self.task_ids),
                "repeats": {str(t): n for t, n in self.repeats.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a saved position; the batching itself must be configured the same."""
        for key in ("seed", "batch_size", "world_size", "mixed", "num_examples", "repeats"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                raise ValueError(f"cannot resume the batch order: {key} was {state[key]!r} and "
                                 f"is now {mine!r} (same data, batch size, seed and number of "
                                 f"processes are needed)")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def _dist_rank_world() -> "tuple[int, int]":
    try:
        import torch.distributed as dist
    except ImportError:  # torch is a dependency; this only keeps the sampler importable alone
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SelfPacedScheduler:
    """Per-task learning-rate factor clip(L̄_t / L⁰_t, s_min, 1) (docs/method.md).

    L⁰_t is the mean loss of task t's first ``init_batches`` batches (the factor is 1 until
    then); from there L̄_t starts at L⁰_t and follows an EMA with decay ``ema``. ``mode="fixed"``
    always gives 1 (the ablation) while still tracking the losses for the log.

    Example:
        >>> pace = SelfPacedScheduler(["qa", "chat"], s_min=0.1)
        >>> lr_factor = pace.update("qa", loss.item())
    """

    def __init__(self, tasks: Sequence[str], mode: str = "self_paced", s_min: float = 0.1,
                 ema: float = 0.9, init_batches: int = 3) -> None:
        if mode not in ("self_paced", "fixed"):
            raise ValueError(f"mode must be 'self_paced' or 'fixed', got {mode!r}")
        if not 0 < s_min <= 1:
            raise ValueError(f"s_min must be in (0, 1], got {s_min}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if init_batches < 1:
            raise ValueError(f"init_batches must be >= 1, got {init_batches}")
        self.mode = mode
        self.s_min = float(s_min)
        self.ema = float(ema)
        self.init_batches = int(init_batches)
        self.tasks = list(tasks)
        self._first: Dict[str, List[float]] = {t: [] for t in self.tasks}
        self.initial: Dict[str, Optional[float]] = {t: None for t in self.tasks}
        self.average: Dict[str, Optional[float]] = {t: None for t in self.tasks}

    def _check(self, task: str) -> None:
        if task not in self._first:
            raise ValueError(f"unknown task {task!r}; scheduled tasks: {self.tasks}")

    def update(self, task: str, loss: float) -> float:
        """Record a batch loss of ``task``; return the task's factor for this step."""
        self._check(task)
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss of task {task!r} is {loss}; cannot pace on it")
        if self.initial[task] is None:
            self._first[task].append(loss)
            if len(self._first[task]) >= self.init_batches:
                self.initial[task] = sum(self._first[task]) / len(self._first[task])
                self.average[task] = self.initial[task]
        else:
            self.average[task] = self.ema * self.average[task] + (1 - self.ema) * loss
        return self.scale(task)

    def scale(self, task: str) -> float:
        """The current factor of ``task`` (1 before L⁰ is known, and always in fixed mode)."""
        self._check(task)
        initial, average = self.initial[task], self.average[task]
        if self.mode == "fixed" or initial is None or average is None:
            return 1.0
        if initial <= 0:  # a task that starts at zero loss has nothing to learn
            return self.s_min
        return min(1.0, max(self.s_min, average / initial))

    def scales(self) -> Dict[str, float]:
        return {t: self.scale(t) for t in self.tasks}

    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "s_min": self.s_min, "ema": self.ema,
                "init_batches": self.init_batches, "first": {t: list(v) for t, v in
                                                              self._first.items()},
                "initial": dict(self.initial), "average": dict(self.average)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = set(self.tasks) - set(state["initial"])
        if missing:
            raise ValueError(f"self-paced state has no entry for task(s) {sorted(missing)}")
        self._first = {t: list(state["first"].get(t, [])) for t in self.tasks}
        self.initial = {t: state["initial"].get(t) for t in self.tasks}
        self.average = {t: state["average"].get(t) for t in self.tasks}
