"""Types of the Rust extension ``llm_embedder._native`` (rust/src). Private: use the Python API."""

from typing import List, Optional, Tuple

import numpy as np
import numpy.typing as npt

def rank_aware_reward(
    target_ll: npt.NDArray[np.float32],
    sample_ll: npt.NDArray[np.float32],
    mode: str = "position",
    baseline: Optional[int] = None,
) -> npt.NDArray[np.float32]:
    """Rank-aware reward (DESIGN.md §3) for Q queries x M candidates x N samples.

    target_ll [Q, M]: mean log-likelihood of the desired output under each candidate.
    sample_ll [Q, M, N]: the same for the N sampled outputs; NaN marks a missing sample.
    Returns [Q, M] in (0, 1); mode="shift" subtracts column ``baseline`` (the empty context).
    The margin's argument t - max(s) is clipped to +-8 nats so rewards stay strictly inside
    (0, 1) and strictly ordered by rank in float32; with no present sample the reward is 0.5.
    ValueError on wrong ndim/shape, NaN/inf in target_ll, inf in sample_ll, a bad mode or baseline.
    """

def bucket_batches(
    task_ids: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    bucket_factor: int = 16,
    task_temperature: float = 1.0,
) -> List[npt.NDArray[np.int64]]:
    """Homogeneous, length-bucketed batches: one task per batch, every index exactly once.

    shuffle=True: per task, seeded shuffle, pools of batch_size*bucket_factor sorted by length
    and cut into batches, batches shuffled; tasks interleaved with probability proportional to
    remaining_batches ** (1 / task_temperature). shuffle=False: no randomness, tasks in
    ascending id order, each sorted by (length, index). Same seed, same batches on every machine;
    any int in [-2**63, 2**64) is a seed (negative ones wrap to their 64 bits).
    """

def topk(
    queries: npt.NDArray[np.float32],
    keys: npt.NDArray[np.float32],
    k: int,
    threads: Optional[int] = None,
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact inner-product top-k: (scores [Q, k] descending, indices [Q, k]; ties: lower index).

    threads: worker threads for this call, 1 to 65535 (None: the ``set_num_threads`` default,
    else one per core or RAYON_NUM_THREADS). ValueError naming the argument on non-2D or
    non-float32 input, dimension mismatch, non-finite values, a score that overflows float32,
    k < 1 or k > N; RuntimeError when the worker threads cannot start.
    """

def topk_scores(
    scores: npt.NDArray[np.float32],
    k: int,
    threads: Optional[int] = None,
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k columns of each row of a score matrix [Q, N], in ``topk``'s order: (scores [Q, k]
    descending, columns [Q, k]; ties: lower column). The selection behind ``rank_pool``.

    ValueError naming the argument on non-2D/non-float32 input, NaN/inf, k < 1 or k > N;
    RuntimeError when the worker threads cannot start.
    """

def set_num_threads(threads: int) -> None:
    """Threads for top-k calls that name none; 0 restores the default (RAYON_NUM_THREADS, else
    one per core). Thread pools are kept for the four most recently used thread counts."""

def get_num_threads() -> int:
    """Threads a top-k call that names none will use."""

class _Bench:
    """``llm_embedder._native.bench``: functions only benches/bench_topk.py uses."""

    @staticmethod
    def topk_f16(
        queries: npt.NDArray[np.float32],
        keys: npt.NDArray[np.float16],
        k: int,
        threads: Optional[int] = None,
    ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``topk`` over float16 keys: half the bytes to stream, products summed in float32."""

    @staticmethod
    def stream_sum(x: npt.NDArray[np.float32], threads: Optional[int] = None) -> float:
        """Sum of a 1-D C-contiguous float32 array read once: the streaming-bandwidth probe."""

bench: _Bench
