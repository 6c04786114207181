"""LangChain and LlamaIndex adapters against the real packaged MiniLM: sides, tasks, a vector
store round trip each, async paths, and the ImportError that names the missing extra."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from llm_embedder.integrations.langchain import LLMEmbedderEmbeddings  # noqa: E402
from llm_embedder.integrations.llamaindex import LLMEmbedderEmbedding  # noqa: E402

DOCS = [
    "Paris is the capital and most populous city of France.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "pandas.read_csv reads a comma-separated values file into a DataFrame.",
]
QUESTIONS = ["Who wrote Hamlet?", "What is the capital of France?", "How do I load a csv file?"]
EXPECTED = [DOCS[1], DOCS[0], DOCS[2]]


@pytest.fixture(scope="module")
def langchain_embeddings(minilm) -> LLMEmbedderEmbeddings:
    return LLMEmbedderEmbeddings(minilm, task="qa")


@pytest.fixture(scope="module")
def llamaindex_embedding(minilm) -> LLMEmbedderEmbedding:
    return LLMEmbedderEmbedding(minilm, task="qa")


# ---- LangChain --------------------------------------------------------------------------------


def test_langchain_query_and_documents_use_the_query_and_key_sides(minilm,
                                                                   langchain_embeddings):
    query = np.array(langchain_embeddings.embed_query(QUESTIONS[0]))
    docs = np.array(langchain_embeddings.embed_documents(DOCS))
    np.testing.assert_allclose(query, minilm.encode_queries([QUESTIONS[0]], task="qa")[0],
                               atol=1e-5)
    np.testing.assert_allclose(docs, minilm.encode_keys(DOCS, task="qa"), atol=1e-5)
    assert not np.allclose(query, minilm.encode_keys([QUESTIONS[0]], task="qa")[0], atol=1e-3)


def test_langchain_task_selects_its_instructions(minilm):
    tool = LLMEmbedderEmbeddings(minilm, task="tool")
    np.testing.assert_allclose(tool.embed_query(QUESTIONS[2]),
                               minilm.encode_queries([QUESTIONS[2]], task="tool")[0], atol=1e-5)
    np.testing.assert_allclose(tool.embed_documents(DOCS[2:]),
                               minilm.encode_keys(DOCS[2:], task="tool"), atol=1e-5)


def test_langchain_unknown_task_is_rejected_naming_the_known_ones(minilm):
    with pytest.raises(ValueError, match="unknown task 'nope'.*qa"):
        LLMEmbedderEmbeddings(minilm, task="nope")


def test_langchain_empty_document_list_gives_no_vectors(langchain_embeddings):
    assert langchain_embeddings.embed_documents([]) == []


def test_langchain_async_matches_sync(langchain_embeddings):
    async def both():
        return (await langchain_embeddings.aembed_query(QUESTIONS[0]),
                await langchain_embeddings.aembed_documents(DOCS))

    query, docs = asyncio.run(both())
    np.testing.assert_allclose(query, langchain_embeddings.embed_query(QUESTIONS[0]), atol=1e-6)
    np.testing.assert_allclose(docs, langchain_embeddings.embed_documents(DOCS), atol=1e-6)


def test_langchain_in_memory_vector_store_round_trip(langchain_embeddings):
    # README "Integrations" (LangChain), with the model already loaded
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore.from_texts(DOCS, langchain_embeddings)
    for question, expected in zip(QUESTIONS, EXPECTED):
        assert store.similarity_search(question, k=1)[0].page_content == expected


# ---- LlamaIndex -------------------------------------------------------------------------------


def test_llamaindex_query_and_text_use_the_query_and_key_sides(minilm, llamaindex_embedding):
    np.testing.assert_allclose(llamaindex_embedding.get_query_embedding(QUESTIONS[0]),
                               minilm.encode_queries([QUESTIONS[0]], task="qa")[0], atol=1e-5)
    np.testing.assert_allclose(llamaindex_embedding.get_text_embedding(DOCS[0]),
                               minilm.encode_keys([DOCS[0]], task="qa")[0], atol=1e-5)
    np.testing.assert_allclose(llamaindex_embedding.get_text_embedding_batch(DOCS),
                               minilm.encode_keys(DOCS, task="qa"), atol=1e-5)


def test_llamaindex_async_matches_sync(llamaindex_embedding):
    async def all_async():
        return (await llamaindex_embedding.aget_query_embedding(QUESTIONS[0]),
                await llamaindex_embedding.aget_text_embedding(DOCS[0]),
                await llamaindex_embedding.aget_text_embedding_batch(DOCS))

    query, text, batch = asyncio.run(all_async())
    np.testing.assert_allclose(query, llamaindex_embedding.get_query_embedding(QUESTIONS[0]),
                               atol=1e-6)
    np.testing.assert_allclose(text, llamaindex_embedding.get_text_embedding(DOCS[0]), atol=1e-6)
    np.testing.assert_allclose(batch, llamaindex_embedding.get_text_embedding_batch(DOCS),
                               atol=1e-6)


def test_llamaindex_unknown_task_is_rejected(minilm):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        LLMEmbedderEmbedding(minilm, task="nope")


def test_llamaindex_vector_store_index_round_trip(llamaindex_embedding):
    # README "Integrations" (LlamaIndex): no LLM is needed to retrieve
    from llama_index.core import Document, VectorStoreIndex

    index = VectorStoreIndex.from_documents([Document(text=text) for text in DOCS],
                                            embed_model=llamaindex_embedding)
    retriever = index.as_retriever(similarity_top_k=1)
    for question, expected in zip(QUESTIONS, EXPECTED):
        assert retriever.retrieve(question)[0].node.text == expected


def test_llamaindex_async_retrieval_round_trip(llamaindex_embedding):
    from llama_index.core import Document, VectorStoreIndex

    index = VectorStoreIndex.from_documents([Document(text=text) for text in DOCS],
                                            embed_model=llamaindex_embedding)
    hits = asyncio.run(index.as_retriever(similarity_top_k=1).aretrieve(QUESTIONS[0]))
    assert hits[0].node.text == EXPECTED[0]


# ---- README "Integrations", run verbatim ------------------------------------------------------

def _readme_snippets() -> list:
    """The python blocks of the README's "Integrations" section, as a user copies them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Integrations\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_both_integration_examples():
    snippets = _readme_snippets()
    assert [("langchain" in s, "llama_index" in s) for s in snippets] == [(True, False),
                                                                           (False, True)]


@pytest.mark.parametrize("position", [0, 1], ids=["langchain", "llamaindex"])
def test_readme_integration_examples_run_as_written(position, capsys):
    exec(compile(_readme_snippets()[position], "README.md", "exec"), {})
    assert capsys.readouterr().out == "Hamlet is a tragedy by William Shakespeare.\n"


# ---- extras -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module, missing, extra", [
    ("llm_embedder.integrations.langchain", "langchain_core.embeddings", "llm-embedder[langchain]"),
    ("llm_embedder.integrations.llamaindex", "llama_index.core.base.embeddings.base",
     "llm-embedder[llamaindex]"),
])
def test_adapter_without_its_extra_names_the_extra(monkeypatch, module, missing, extra):
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, missing, None)  # import of it now raises ImportError
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)


def test_integrations_package_exposes_both_adapters_lazily():
    import llm_embedder.integrations as integrations

    assert integrations.LLMEmbedderEmbeddings is LLMEmbedderEmbeddings
    assert integrations.LLMEmbedderEmbedding is LLMEmbedderEmbedding
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        integrations.Nope  # noqa: B018
