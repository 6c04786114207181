"""llm-embedder: one embedding model for every retrieval need of an LLM.

Knowledge, memory, in-context examples and tools, trained from a frozen LLM's rank-aware
feedback. The public API is imported lazily so ``import llm_embedder`` stays fast.

Example:
    >>> from llm_embedder import Embedder, Index
    >>> model = Embedder.from_pretrained()
    >>> keys = model.encode_keys(["Paris is the capital of France."], task="qa")
    >>> index = Index(keys.shape[1]); index.add(keys, ["doc-0"])
    >>> index.search(model.encode_queries(["capital of France?"], task="qa"), k=1)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .tasks import TASKS, Task, get_task, register_task

__version__ = "0.1.0"

_LAZY = {
    "Embedder": ".embedder",
    "Index": ".index",
    "label": ".label",
    "FrozenLLM": ".llm",
    "train": ".train",
    "TrainConfig": ".train",
    "evaluate": ".evaluate",
}

__all__ = ["TASKS", "Task", "get_task", "register_task", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'llm_embedder' has no attribute {name!r}")
