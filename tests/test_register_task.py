"""``register_task(...)`` alone makes a new task labelable, trainable and evaluable, and its
``downstream`` kind picks the downstream LLM metric."""

import json
from pathlib import Path

import numpy as np
import pytest
from llm_embedder.data import bundled_task_files, iter_jsonl
from llm_embedder.evaluate import evaluate
from llm_embedder.label import label
from llm_embedder.tasks import Task, register_task, unregister_task
from llm_embedder.train import train

NAME = "faq-slice-test"


@pytest.fixture()
def registered():
    """Registers tasks for one test and removes them afterwards, whatever happens."""
    names = []

    def add(**fields):
        fields.setdefault("name", NAME)
        names.append(fields["name"])
        return register_task(Task(**fields))

    yield add
    for name in names:
        unregister_task(name)


def _slice(folder: Path) -> dict:
    """20 training and 10 test queries cut from the bundled knowledge slice, with a corpus of
    their positives and 30 other passages: a new task's own data."""
    files = bundled_task_files("qa")
    train_rows = [obj for _, obj in iter_jsonl(files["train"])][::39][:20]
    test_rows = [obj for _, obj in iter_jsonl(files["test"])][::17][:10]
    wanted = {pid for row in train_rows + test_rows for pid in row["positive_ids"]}
    corpus_rows = [obj for i, (_, obj) in enumerate(iter_jsonl(files["corpus"]))
                   if obj["id"] in wanted or i < 30]
    folder.mkdir(parents=True)
    paths = {}
    for name, rows in (("corpus", corpus_rows), ("train", train_rows), ("test", test_rows)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def test_a_registered_task_is_labelled_trained_and_evaluated(registered, tmp_path):
    registered(query_instruction="Find the FAQ entry for: ", key_instruction="FAQ entry: ",
               prompt_template="Entry: {key}\nAsked: {query}\nReply:",
               empty_template="Asked: {query}\nReply:", loss="contrastive",
               primary_metric="mrr@10", downstream=None, downstream_k=2, max_new_tokens=8)
    paths = _slice(tmp_path / "data")

    labelled = tmp_path / "labelled.jsonl"
    summary = label(NAME, paths["train"], paths["corpus"], labelled, method="labels",
                    num_negatives=3, show_progress=False)
    assert summary.queries == 20
    assert {json.loads(line)["task"] for line in labelled.read_text().splitlines()} == {NAME}

    model = train({"tasks": {NAME: str(labelled)}, "output_dir": str(tmp_path / "run"),
                   "max_steps": 2, "batch_size": 4, "group_size": 3, "query_max_length": 32,
                   "key_max_length": 64, "save_steps": 0, "device": "cpu", "plot": False,
                   "progress_bar": False})

    results = evaluate(model, tasks=[NAME], systems=["bm25", "trained"], downstream=False,
                       data={NAME: {"corpus": str(paths["corpus"]), "test": str(paths["test"])}},
                       device="cpu", verbose=False)
    trained = results[NAME]["trained"]
    assert 0.0 <= trained["mrr@10"] <= 1.0
    assert results["average"]["trained"]["primary"] == trained["mrr@10"]  # its own metric
    assert results["average"]["bm25"]["primary"] == results[NAME]["bm25"]["mrr@10"]


class FakeLLM:
    """Likes an output whose words occur in the prompt; greedy 'answers' with the prompt's last
    word. No model: enough to tell which downstream metric ran."""

    name = "fake"

    def score(self, prompts, outputs):
        return np.array([sum(w in p for w in o.split()) / max(len(o.split()), 1) - 1.0
                         for p, o in zip(prompts, outputs)], np.float32)

    def score_grouped(self, prompts, outputs_per_prompt):
        return [self.score([p] * len(outs), outs) for p, outs in zip(prompts, outputs_per_prompt)]

    def generate(self, prompts, max_new_tokens=16):
        return [" " + p.split()[-1] for p in prompts]


def _tiny(folder: Path, choice: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [{"id": "p0", "text": "the capital of France is Paris"},
              {"id": "p1", "text": "bananas are yellow"},
              {"id": "p2", "text": "review: a great film. label: Positive"}]
    extra = {"options": ["Negative", "Positive"], "answers": ["Positive"]} if choice else {}
    queries = [{"id": "q0", "text": "capital of France?", "answers": ["Paris"],
                "positive_ids": ["p0"], **extra},
               {"id": "q1", "text": "what colour are bananas?", "answers": ["yellow"],
                "positive_ids": ["p1"], **extra}]
    paths = {"corpus": folder / "corpus.jsonl", "test": folder / "test.jsonl"}
    for key, rows in (("corpus", corpus), ("test", queries)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("kind,metrics", [
    ("answer", {"answer_ll", "answer_ppl", "em"}),
    ("perplexity", {"answer_ll", "answer_ppl"}),
    ("choice", {"accuracy"}),
])
def test_the_downstream_kind_picks_the_llm_metric(kind, metrics, registered, tmp_path):
    registered(query_instruction="q: ", key_instruction="k: ",
               prompt_template="{key}\n{query}", empty_template="{query}", downstream=kind,
               downstream_k=1)
    data = {NAME: _tiny(tmp_path, choice=kind == "choice")}
    results = evaluate(None, tasks=[NAME], systems=["bm25"], data=data, llm=FakeLLM(),
                       verbose=False)
    assert set(results[NAME]["none"]) == metrics
    assert metrics <= set(results[NAME]["bm25"])
    if kind == "choice":
        assert set(results[NAME]) == {"none", "bm25"}  # only the systems asked for


def test_a_task_without_downstream_never_needs_an_llm(registered, tmp_path):
    registered(query_instruction="q: ", key_instruction="k: ",
               prompt_template="{key}\n{query}", empty_template="{query}", downstream=None)
    data = {NAME: _tiny(tmp_path, choice=False)}
    # llm=None would load the packaged LLM if anything asked for it; nothing may.
    results = evaluate(None, tasks=[NAME], systems=["bm25"], data=data, verbose=False)
    assert set(results[NAME]) == {"bm25"} and "answer_ll" not in results[NAME]["bm25"]
