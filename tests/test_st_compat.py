"""Sentence-transformers habits: saved prompts, encode's ST keywords, and the model card.

Each check runs the real installed sentence-transformers on a folder written by
``Embedder.save_pretrained``; vectors are compared with ``Embedder`` to 1e-5.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llm_embedder import TASKS, Embedder
from llm_embedder.config import ConfigError
from llm_embedder.embedder import ModelCard, task_prompts, write_model_card
from llm_embedder.tasks import Task, register_task, unregister_task

QUERIES = ["Who won Super Bowl 50?", "what does pandas read_csv do", "ok",
           "Speaker 1: I adopted a puppy!\nSpeaker 2: What is its name?"]
DOCUMENTS = ["The Denver Broncos defeated the Carolina Panthers 24-10 in Super Bowl 50.",
             "pandas.read_csv(filepath): read a comma-separated values file into a DataFrame.",
             "Hamlet is a tragedy by William Shakespeare."]
RESULTS = {
    "qa": {"base": {"ndcg@10": 0.512, "recall@5": 0.801},
           "trained": {"ndcg@10": 0.634, "recall@5": 0.902}},
    "tool": {"bm25": {"ndcg@5": 0.25}, "trained": {"ndcg@5": 0.771}},
    "average": {"trained": {"primary": 0.7025}},
}


@pytest.fixture(scope="module")
def saved(minilm, tmp_path_factory) -> Path:
    return minilm.save_pretrained(tmp_path_factory.mktemp("st") / "model")


@pytest.fixture(scope="module")
def st_model(saved):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(saved), device="cpu")


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    assert match, "the card starts with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1))


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


# ---- prompts in config_sentence_transformers.json ------------------------------------------


def test_saved_prompts_name_the_qa_sides_and_every_task_and_side(saved):
    config = json.loads((saved / "config_sentence_transformers.json").read_text())
    prompts = config["prompts"]
    assert config["default_prompt_name"] is None
    assert prompts["query"] == TASKS["qa"].query_instruction
    assert prompts["document"] == TASKS["qa"].key_instruction
    for name, task in TASKS.items():
        assert prompts[f"{name}_query"] == task.query_instruction
        assert prompts[f"{name}_document"] == task.key_instruction
        assert prompts[f"{name}_key"] == task.key_instruction
    assert prompts == task_prompts()
    assert len(prompts) == 2 + 3 * len(TASKS)


def test_st_encode_query_equals_encode_queries_of_qa(minilm, st_model):
    ours = minilm.encode_queries(QUERIES, task="qa")
    theirs = st_model.encode_query(QUERIES, batch_size=3)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # the prompt matters: without it the vectors differ
    assert not np.allclose(st_model.encode(QUERIES), ours, atol=1e-3)


def test_st_encode_document_equals_encode_keys_of_qa(minilm, st_model):
    np.testing.assert_allclose(st_model.encode_document(DOCUMENTS),
                               minilm.encode_keys(DOCUMENTS, task="qa"), atol=1e-5)


@pytest.mark.parametrize("prompt_name,task,side", [
    ("tool_query", "tool", "query"), ("tool_document", "tool", "key"),
    ("chat_key", "chat", "key"), ("icl_query", "icl", "query"),
    ("convsearch_document", "convsearch", "key"), ("lrlm_query", "lrlm", "query"),
])
def test_st_prompt_name_equals_encode_of_that_task_and_side(minilm, st_model, prompt_name,
                                                            task, side):
    expected = minilm.encode(QUERIES + DOCUMENTS, task=task, side=side)
    np.testing.assert_allclose(st_model.encode(QUERIES + DOCUMENTS, prompt_name=prompt_name),
                               expected, atol=1e-5)
    # the Embedder takes the same names
    np.testing.assert_allclose(minilm.encode(QUERIES + DOCUMENTS, prompt_name=prompt_name),
                               expected, atol=1e-6)


def test_a_registered_task_is_saved_as_prompts_too(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    register_task(Task("faq_st", "Query for the FAQ: ", "FAQ entry: ", "{key}\n{query}",
                       "{query}", loss="contrastive", primary_metric="mrr@10"))
    try:
        folder = minilm.save_pretrained(tmp_path / "model")
        st = SentenceTransformer(str(folder), device="cpu")
        assert st.prompts["faq_st_document"] == "FAQ entry: "
        np.testing.assert_allclose(st.encode(QUERIES, prompt_name="faq_st_query"),
                                   minilm.encode_queries(QUERIES, task="faq_st"), atol=1e-5)
        card = (folder / "README.md").read_text()
        assert "| faq_st | `Query for the FAQ: ` | `FAQ entry: ` |" in card
    finally:
        unregister_task("faq_st")


# ---- encode: prompt_name, normalize_embeddings, convert_to_tensor --------------------------


def test_encode_prompt_name_query_and_document_are_the_qa_sides(minilm):
    np.testing.assert_allclose(minilm.encode(QUERIES, prompt_name="query"),
                               minilm.encode_queries(QUERIES, task="qa"), atol=1e-6)
    np.testing.assert_allclose(minilm.encode(DOCUMENTS, prompt_name="document"),
                               minilm.encode_keys(DOCUMENTS, task="qa"), atol=1e-6)
    # prompt_name replaces task/side
    np.testing.assert_allclose(minilm.encode(DOCUMENTS, task="chat", side="query",
                                             prompt_name="tool_key"),
                               minilm.encode_keys(DOCUMENTS, task="tool"), atol=1e-6)


def test_unknown_prompt_name_lists_the_known_ones(minilm):
    with pytest.raises(ValueError, match=r"unknown prompt_name 'qa_passage'.*query, document, "
                                         r"qa_query, qa_document, qa_key.*tool_key"):
        minilm.encode(QUERIES, prompt_name="qa_passage")


def test_prompt_name_and_instruction_together_are_refused(minilm):
    with pytest.raises(ValueError, match="prompt_name or instruction, not both"):
        minilm.encode(QUERIES, prompt_name="query", instruction="query: ")


def test_normalize_embeddings_switches_normalisation_like_normalize(minilm):
    default = minilm.encode(QUERIES)
    np.testing.assert_allclose(np.linalg.norm(default, axis=1), 1.0, atol=1e-5)
    raw = minilm.encode(QUERIES, normalize_embeddings=False)
    np.testing.assert_allclose(raw, minilm.encode(QUERIES, normalize=False), atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(minilm.encode(QUERIES, normalize_embeddings=True), default,
                               atol=1e-6)
    np.testing.assert_allclose(minilm.encode(QUERIES, normalize=False,
                                             normalize_embeddings=False), raw, atol=1e-6)


def test_disagreeing_normalize_flags_are_refused(minilm):
    with pytest.raises(ValueError, match="normalize=False and normalize_embeddings=True"):
        minilm.encode(QUERIES, normalize=False, normalize_embeddings=True)


def test_convert_to_tensor_returns_a_tensor_on_the_device(minilm):
    tensor = minilm.encode(QUERIES, prompt_name="query", convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float32 and tensor.device == minilm.device
    assert tensor.shape == (len(QUERIES), minilm.dim)
    np.testing.assert_allclose(tensor.cpu().numpy(), minilm.encode_queries(QUERIES), atol=1e-6)
    # wins over convert_to_numpy=True, as in sentence-transformers; one string: one vector
    vector = minilm.encode(QUERIES[0], convert_to_numpy=True, convert_to_tensor=True)
    assert isinstance(vector, torch.Tensor) and vector.shape == (minilm.dim,)
    assert isinstance(minilm.encode(QUERIES), np.ndarray)


def test_convert_to_tensor_matches_st(minilm, st_model):
    ours = minilm.encode_queries(QUERIES, convert_to_tensor=True)
    theirs = st_model.encode_query(QUERIES, convert_to_tensor=True)
    assert isinstance(theirs, torch.Tensor)
    torch.testing.assert_close(ours, theirs.to(ours.device), atol=1e-5, rtol=0)


# ---- model card ----------------------------------------------------------------------------


def test_model_card_is_written_with_front_matter_and_every_instruction(saved):
    card = (saved / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "sentence-transformers"
    assert front["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "llm-embedder"} <= set(front["tags"])
    assert "\n# model\n" in card
    for name, task in TASKS.items():
        assert (f"| {name} | `{task.query_instruction}` | `{task.key_instruction}` | "
                f"`{name}_query`, `{name}_document`, `{name}_key` |") in card
    for heading in ("### llm-embedder", "### sentence-transformers", "### transformers"):
        assert heading in card
    assert "encode_query(" in card and "encode_document(" in card and "prompt_name=" in card
    assert "## Training" not in card and "## Evaluation" not in card
    assert str(saved.parent) not in card and "/tmp" not in card


def test_model_card_snippets_run_and_agree(minilm, saved, monkeypatch):
    blocks = _python_blocks((saved / "README.md").read_text())
    assert len(blocks) == 3
    monkeypatch.chdir(saved.parent)  # the snippets load the folder by its name
    spaces = []
    for block in blocks:
        space: dict = {}
        exec(compile(block, "README.md", "exec"), space)
        spaces.append(space)
    ours, st, plain = spaces
    expected = minilm.encode_queries(["Who wrote Hamlet?"], task="qa")
    np.testing.assert_allclose(ours["queries"], expected, atol=1e-5)
    np.testing.assert_allclose(st["queries"], expected, atol=1e-5)
    np.testing.assert_allclose(plain["embeddings"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(st["documents"], ours["documents"], atol=1e-5)


def test_model_card_metadata_gives_training_and_evaluation_sections(minilm, tmp_path):
    card_meta = {
        "model_id": "someone/llm-embedder-minilm",
        "description": "MiniLM trained on the bundled slices.",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "mit", "language": "en", "tags": ["rag"],
        "training_data": ["qa: 2,000 labelled queries from /home/someone/runs/qa/labelled.jsonl"],
        "training": {"llm": "SmolLM2-135M-Instruct", "steps": 300, "lr": 2.0e-5,
                     "losses": ["graded", "kl"], "data": "C:\\Users\\someone\\data\\qa.jsonl"},
        "results": RESULTS,
    }
    folder = minilm.save_pretrained(tmp_path / "model", card=card_meta)
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["license"] == "mit" and front["language"] == "en" and "rag" in front["tags"]
    assert "\n# someone/llm-embedder-minilm\n\nMiniLM trained on the bundled slices." in card
    assert 'Embedder.from_pretrained("hf:someone/llm-embedder-minilm")' in card
    assert 'SentenceTransformer("someone/llm-embedder-minilm")' in card
    assert "- qa: 2,000 labelled queries from labelled.jsonl" in card
    assert "| steps | 300 |" in card and "| losses | graded, kl |" in card
    assert "| data | qa.jsonl |" in card
    assert "| task (metric) | BM25 | base (instr.) | trained |" in card
    assert "| qa (ndcg@10) | - | 0.512 | 0.634 |" in card
    assert "| tool (ndcg@5) | 0.250 | - | 0.771 |" in card
    assert "| average | - | - | 0.703 |" in card
    assert "| recall@5 | 0.801 | 0.902 |" in card
    for machine_path in ("/home/someone", "Users\\someone", str(tmp_path)):
        assert machine_path not in card
    assert "https://pypi.org/project/llm-embedder/" in card


def test_card_accepts_a_model_card_and_a_yaml_file(minilm, tmp_path):
    as_object = minilm.save_pretrained(tmp_path / "a", card=ModelCard(model_id="x/y"))
    assert "\n# x/y\n" in (as_object / "README.md").read_text()
    spec = tmp_path / "card.yaml"
    spec.write_text("model_id: x/z\ntraining_data:\n  - \"tool: gorilla slice\"\n")
    as_file = minilm.save_pretrained(tmp_path / "b", card=spec)
    assert "- tool: gorilla slice" in (as_file / "README.md").read_text()


@pytest.mark.parametrize("bad,key", [
    ({"modelid": "x"}, "modelid"),
    ({"tags": "rag"}, "tags"),
    ({"tags": ["ok", 3]}, r"tags\[1\]"),
    ({"training": {"steps": {"nested": 1}}}, "training.steps"),
    ({"results": {"qa": {"trained": {"ndcg@10": "high"}}}}, "results.qa.trained.ndcg@10"),
    ({"results": {"qa": [0.5]}}, "results.qa"),
    ({"results": {"average": {"trained": {"ndcg@10": 0.5}}}}, "results.average.trained"),
])
def test_bad_card_metadata_names_the_key_and_writes_nothing(minilm, tmp_path, bad, key):
    with pytest.raises(ConfigError, match=key):
        minilm.save_pretrained(tmp_path / "model", card=bad)
    assert list(tmp_path.iterdir()) == []


def test_write_model_card_adds_results_to_a_saved_model(minilm, tmp_path):
    folder = minilm.save_pretrained(tmp_path / "model")
    assert "## Evaluation" not in (folder / "README.md").read_text()
    path = write_model_card(folder, {"results": RESULTS})
    assert path == folder / "README.md"
    card = path.read_text()
    assert "## Evaluation" in card and "| qa (ndcg@10) | - | 0.512 | 0.634 |" in card
    assert "\n# model\n" in card
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(FileNotFoundError, match="llm_embedder.json not found"):
        write_model_card(tmp_path)


def test_cls_pooling_card_shows_cls_pooling(tmp_path):
    cls_model = Embedder.from_pretrained(device="cpu", pooling="cls")
    card = (cls_model.save_pretrained(tmp_path / "cls") / "README.md").read_text()
    assert "CLS pooling" in card and "F.normalize(hidden[:, 0], dim=-1)" in card
