"""LlamaIndex ``BaseEmbedding`` backed by an :class:`~llm_embedder.Embedder`.

Query embeddings get the task's query instruction, text (node) embeddings its key
instruction. Sync and async methods; the async ones run the encoder in a thread so the event
loop keeps serving. Needs the ``llamaindex`` extra: ``pip install 'llm-embedder[llamaindex]'``.

Example:
    >>> from llama_index.core import Document, VectorStoreIndex
    >>> from llm_embedder.integrations.llamaindex import LLMEmbedderEmbedding
    >>> index = VectorStoreIndex.from_documents(
    ...     [Document(text="Hamlet is a tragedy by William Shakespeare.")],
    ...     embed_model=LLMEmbedderEmbedding(task="qa"))
    >>> index.as_retriever(similarity_top_k=1).retrieve("Who wrote Hamlet?")[0].node.text
    'Hamlet is a tragedy by William Shakespeare.'
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, List, Optional, Union

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
except ImportError as exc:
    raise ImportError(f"llm_embedder.integrations.llamaindex needs the 'llamaindex' extra "
                      f"({exc.name} is missing): pip install 'llm-embedder[llamaindex]'") from exc

from ..tasks import get_task
from . import load_embedder

__all__ = ["LLMEmbedderEmbedding"]


class LLMEmbedderEmbedding(BaseEmbedding):
    """LlamaIndex embedding model: queries on the query side of ``task``, texts on its key side.

    Args:
        model: an :class:`~llm_embedder.Embedder`, a model folder or hub id, or ``None`` for the
            packaged all-MiniLM-L6-v2.
        task: the task whose instructions are prepended (``qa``, ``tool``, ``chat``, ...).
        device: where a loaded model runs; default the GPU when there is one.
        embed_batch_size: texts per call (LlamaIndex batches nodes by this).

    Example:
        >>> from llama_index.core import Settings
        >>> Settings.embed_model = LLMEmbedderEmbedding("runs/model", task="qa")
    """

    task: str = Field(default="qa", description="llm-embedder task whose instructions are used")
    _embedder: Any = PrivateAttr()

    def __init__(self, model: Union[Any, str, "os.PathLike[str]", None] = None,
                 task: str = "qa", *, device: Optional[str] = None, embed_batch_size: int = 32,
                 **kwargs: Any) -> None:
        get_task(task)  # an unknown task fails here, listing the known ones
        embedder = load_embedder(model, device)
        name = kwargs.pop("model_name", None) or (
            Path(os.fspath(model)).name if isinstance(model, (str, os.PathLike))
            else "llm-embedder")
        super().__init__(model_name=name, task=task, embed_batch_size=embed_batch_size,
                         **kwargs)
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serialises this class under."""
        return "LLMEmbedderEmbedding"

    def _encode(self, texts: List[str], side: str) -> List[List[float]]:
        if not texts:
            return []
        vectors = self._embedder.encode(list(texts), task=self.task, side=side,
                                        batch_size=self.embed_batch_size,
                                        show_progress_bar=False)
        return vectors.tolist()

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._encode([query], "query")[0]

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._encode([text], "key")[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._encode(texts, "key")

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return (await asyncio.to_thread(self._encode, [query], "query"))[0]

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return (await asyncio.to_thread(self._encode, [text], "key"))[0]

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await asyncio.to_thread(self._encode, texts, "key")
