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
    """Homogeneous, length-bucketed batches: one task per batch, every index exactly once."""

def topk(
    queries: npt.NDArray[np.float32],
    keys: npt.NDArray[np.float32],
    k: int,
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact inner-product top-k: (scores [Q, k] descending, indices [Q, k]; ties: lower index)."""
