"""Adapters that plug an :class:`~llm_embedder.Embedder` into other libraries.

Each adapter lives in its own module and needs its extra; importing it without the extra
raises an ImportError that names the extra to install:

- :mod:`llm_embedder.integrations.langchain`: ``LLMEmbedderEmbeddings``, a LangChain
  ``Embeddings`` (``pip install 'llm-embedder[langchain]'``);
- :mod:`llm_embedder.integrations.llamaindex`: ``LLMEmbedderEmbedding``, a LlamaIndex
  ``BaseEmbedding`` (``pip install 'llm-embedder[llamaindex]'``).

Queries get the task's query instruction and documents its key instruction, so an index built
through either library searches as ``Embedder.encode_queries`` / ``encode_keys`` would.

Example:
    >>> from llm_embedder.integrations.langchain import LLMEmbedderEmbeddings
    >>> len(LLMEmbedderEmbeddings(task="qa").embed_query("Who wrote Hamlet?"))
    384
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "LLMEmbedderEmbeddings": ".langchain",
    "LLMEmbedderEmbedding": ".llamaindex",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy, so `import llm_embedder.integrations` needs neither LangChain nor LlamaIndex.
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'llm_embedder.integrations' has no attribute {name!r}")


def load_embedder(model: Any = None, device: Any = None) -> Any:
    """An :class:`~llm_embedder.Embedder` from ``model``: an Embedder (returned as is), a
    model folder or hub id, or ``None`` for the packaged all-MiniLM-L6-v2.

    Example:
        >>> load_embedder("runs/model", device="cpu").dim
        384
    """
    from ..embedder import Embedder

    if isinstance(model, Embedder):
        return model
    return Embedder.from_pretrained(model, device=device)
