"""LangChain ``Embeddings`` backed by an :class:`~llm_embedder.Embedder`.

``embed_query`` prepends the task's query instruction, ``embed_documents`` its key
instruction, so any LangChain vector store searches the way the model was trained. Needs the
``langchain`` extra: ``pip install 'llm-embedder[langchain]'``.

Example:
    >>> from langchain_core.vectorstores import InMemoryVectorStore
    >>> from llm_embedder.integrations.langchain import LLMEmbedderEmbeddings
    >>> store = InMemoryVectorStore.from_texts(
    ...     ["Paris is the capital of France.", "Hamlet is a tragedy by William Shakespeare."],
    ...     LLMEmbedderEmbeddings(task="qa"))
    >>> store.similarity_search("Who wrote Hamlet?", k=1)[0].page_content
    'Hamlet is a tragedy by William Shakespeare.'
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Union

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:
    raise ImportError(f"llm_embedder.integrations.langchain needs the 'langchain' extra "
                      f"({exc.name} is missing): pip install 'llm-embedder[langchain]'") from exc

from ..tasks import get_task
from . import load_embedder

__all__ = ["LLMEmbedderEmbeddings"]


class LLMEmbedderEmbeddings(Embeddings):
    """LangChain embeddings: queries on the query side of ``task``, documents on its key side.

    Args:
        model: an :class:`~llm_embedder.Embedder`, a model folder or hub id, or ``None`` for the
            packaged all-MiniLM-L6-v2.
        task: the task whose instructions are prepended (``qa``, ``tool``, ``chat``, ...).
        device: where a loaded model runs; default the GPU when there is one.
        batch_size: texts per forward pass.

    Vectors are L2-normalised lists of floats (cosine = inner product). The async methods
    (``aembed_query``, ``aembed_documents``) run these in a thread (LangChain's default).

    Example:
        >>> embeddings = LLMEmbedderEmbeddings("runs/model", task="tool")
        >>> embeddings.embed_query("convert a csv file to a dataframe")[:3]
    """

    def __init__(self, model: Union[Any, str, "os.PathLike[str]", None] = None,
                 task: str = "qa", *, device: Optional[str] = None,
                 batch_size: int = 32) -> None:
        get_task(task)  # an unknown task fails here, listing the known ones
        self.embedder = load_embedder(model, device)
        self.task = task
        self.batch_size = batch_size

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        """Key-side vectors of ``texts`` (one list of floats each).

        Example:
            >>> LLMEmbedderEmbeddings().embed_documents(["Paris is in France."])[0][:2]
        """
        if not texts:
            return []
        return self.embedder.encode_keys(list(texts), task=self.task,
                                         batch_size=self.batch_size,
                                         show_progress_bar=False).tolist()

    def embed_query(self, text: str) -> List[float]:
        """Query-side vector of ``text``.

        Example:
            >>> LLMEmbedderEmbeddings().embed_query("Where is Paris?")[:2]
        """
        return self.embedder.encode_queries([text], task=self.task,
                                            show_progress_bar=False)[0].tolist()
