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
from typing import TYPE_CHECKING, Any

from .tasks import TASKS, Task, get_task, register_task

if TYPE_CHECKING:  # type checkers see the real types; at run time they load on first use
    from .embedder import Embedder
    from .evaluate import EvalConfig, evaluate
    from .index import Index
    from .label import LabelConfig, label, register_reward
    from .llm import FrozenLLM, LLMBackend
    from .losses import register_loss
    from .train import TrainConfig, Trainer, train

__version__ = "0.1.0"

_LAZY = {
    "Embedder": ".embedder",
    "Index": ".index",
    "label": ".label",
    "LabelConfig": ".label",
    "register_reward": ".label",
    "FrozenLLM": ".llm",
    "LLMBackend": ".llm",
    "train": ".train",
    "TrainConfig": ".train",
    "Trainer": ".train",
    "register_loss": ".losses",
    "evaluate": ".evaluate",
    "EvalConfig": ".evaluate",
}

__all__ = [
    "TASKS", "Task", "get_task", "register_task",
    "Embedder", "Index", "label", "LabelConfig", "register_reward", "FrozenLLM", "LLMBackend",
    "train", "TrainConfig", "Trainer", "register_loss", "evaluate", "EvalConfig",
]
assert set(__all__) == {"TASKS", "Task", "get_task", "register_task", *_LAZY}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'llm_embedder' has no attribute {name!r}")
