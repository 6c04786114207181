"""Labelling: rewards match the reference, labelling is resumable, shardable and validated.

The LLM tests load the packaged SmolLM2-135M once per session and label only a few queries
with N=3 samples and short keys, so they stay small on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from llm_embedder.config import ConfigError
from llm_embedder.data import DataError, load_corpus, load_labelled, load_queries
from llm_embedder.io import OutputLockedError
from llm_embedder.label import (
    REWARDS,
    LabelConfig,
    Reward,
    compact_labelled,
    expand_labelled,
    label,
    merge_labelled,
    reward_report,
)
from llm_embedder.llm import LLMBackend, stable_seed
from llm_embedder.tasks import get_task

# A small labelling configuration shared by every LLM test (and its reference run).
SMALL = {"num_samples": 3, "num_negatives": 2, "max_key_tokens": 64, "max_new_tokens": 12,
             "show_progress": False, "seed": 7}


def _slice(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def qa_files(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    queries = _slice(shared_data / "qa/xquad/queries.train.jsonl", folder / "queries.jsonl", 4)
    return queries, shared_data / "qa/xquad/corpus.jsonl"


@pytest.fixture(scope="module")
def reference(llm, qa_files, tmp_path_factory):
    """An uninterrupted run over the first 3 qa queries: the file every variant must equal."""
    queries, corpus = qa_files
    out = tmp_path_factory.mktemp("ref") / "qa.jsonl"
    summary = label("qa", queries, corpus, out, llm=llm, limit=3, **SMALL)
    return out, summary


def _records(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _rank_reward_reference(target: float, samples: np.ndarray) -> float:
    """docs/method.md's rank-aware reward in plain Python (independent of the native kernel)."""
    n = len(samples)
    rank = 1 + np.sum(samples > target) + 0.5 * np.sum(samples == target)
    gap = target - samples.max() if n else 0.0
    return (n + 1 - rank + 1 / (1 + math.exp(-gap))) / (n + 1)


# ----------------------------------------------------------------------------- no LLM needed

def test_malformed_queries_file_names_file_line_and_field(tmp_path, shared_data):
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": "a", "text": "Who?", "answers": ["x"]}\n'
                       '{"id": "b", "answers": ["y"]}\n', encoding="utf-8")
    corpus = shared_data / "qa/xquad/corpus.jsonl"
    with pytest.raises(DataError, match=r"queries\.jsonl:2: missing field 'text'"):
        label("qa", queries, corpus, tmp_path / "out.jsonl", show_progress=False)
    queries.write_text('{"id": "a", "text": "Who?", "answers": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"queries\.jsonl:1: field 'answers' is empty"):
        label("qa", queries, corpus, tmp_path / "out.jsonl", show_progress=False)
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_unknown_positive_id_is_named(tmp_path, shared_data):
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": "a", "text": "Who?", "answers": ["x"], "positive_ids": ["nope"]}\n',
                       encoding="utf-8")
    with pytest.raises(DataError, match="positive id 'nope' is not in the corpus"):
        label("qa", queries, shared_data / "qa/xquad/corpus.jsonl", tmp_path / "o.jsonl",
              method="labels", show_progress=False)
    assert not (tmp_path / "o.jsonl").exists()  # nothing written before the inputs check out


def test_bad_arguments_are_rejected(tmp_path, qa_files):
    queries, corpus = qa_files
    with pytest.raises(ValueError, match="shard"):
        label("qa", queries, corpus, tmp_path / "o.jsonl", shard=2, num_shards=2)
    with pytest.raises(ValueError, match="method"):
        label("qa", queries, corpus, tmp_path / "o.jsonl", method="oracle")
    with pytest.raises(ValueError, match="negatives"):
        label("qa", queries, corpus, tmp_path / "o.jsonl", negatives="random")


def test_labels_mode_gives_one_to_positives_and_zero_to_mined_negatives(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "labels.jsonl"
    summary = label("qa", queries, corpus, out, method="labels", num_negatives=5,
                    show_progress=False)
    records = _records(out)
    assert len(records) == 4 == summary.queries
    for record, query in zip(records, load_queries(queries)):
        ids = [c["id"] for c in record["candidates"]]
        assert record["query_id"] == query.id and record["llm"] == "labels"
        assert ids[0] in query.positive_ids and ids[-1] == ""
        assert len(ids) == len(set(ids)) == 1 + 5 + 1
        assert record["rank_rewards"] == [1.0] + [0.0] * 6 == record["likelihood_rewards"]
        assert record["positive_ids"] == query.positive_ids
    assert summary.top_positive_share == 1.0 and summary.candidates_per_query == 7


def test_labels_mode_passes_over_negatives_that_contain_the_answer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": "gold", "text": "The Eiffel Tower was completed in March 1889 in Paris."},
            {"id": "also", "text": "Paris saw the Eiffel Tower finished in March 1889."},
            {"id": "near", "text": "The Eiffel Tower in Paris is 330 metres tall."},
            {"id": "far", "text": "Paris hosts the Louvre and the Eiffel Tower."},
            {"id": "off", "text": "Bread is baked from flour, water and yeast."}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q", "text": "When was the Eiffel Tower in Paris "
                                   "completed?", "answers": ["March 1889"],
                                   "positive_ids": ["gold"]}) + "\n", encoding="utf-8")

    def candidate_ids(**kwargs):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        label("qa", queries, corpus, out, method="labels", num_negatives=3,
              show_progress=False, **kwargs)
        return [c["id"] for c in _records(out)[0]["candidates"]]

    filtered = candidate_ids()
    assert filtered[0] == "gold" and "also" not in filtered  # holds the answer: no negative
    assert sorted(filtered[1:4]) == ["far", "near", "off"] and filtered[4] == ""  # still 3
    assert "also" in candidate_ids(skip_answer_negatives=False)


def test_embedder_negatives_are_the_nearest_non_positive_passages(tmp_path, qa_files, minilm):
    queries, full_corpus = qa_files
    corpus_path = _slice(full_corpus, tmp_path / "corpus.jsonl", 24)  # holds their positives
    out = tmp_path / "dense.jsonl"
    label("qa", queries, corpus_path, out, method="labels", negatives="embedder",
          embedder=minilm, num_negatives=3, limit=2, show_progress=False)
    corpus = load_corpus(corpus_path)
    keys = minilm.encode_keys([p.full_text for p in corpus], task="qa")
    for record, query in zip(_records(out), load_queries(queries)):
        scores = keys @ minilm.encode_queries([query.text], task="qa")[0]
        ranked = [corpus[i].id for i in np.argsort(-scores, kind="stable")]
        expected = [pid for pid in ranked if pid not in query.positive_ids][:3]
        assert [c["id"] for c in record["candidates"][1:-1]] == expected
    both = tmp_path / "both.jsonl"
    label("qa", queries, corpus_path, both, method="labels", negatives="both",
          embedder=minilm, num_negatives=4, limit=2, show_progress=False)
    for record in _records(both):
        ids = [c["id"] for c in record["candidates"]]
        assert len(ids) == 1 + 4 + 1 and len(set(ids)) == len(ids)


def test_labels_mode_skips_queries_without_positives(tmp_path, shared_data):
    queries = _slice(shared_data / "icl/fewshot5/queries.train.jsonl", tmp_path / "q.jsonl", 3)
    summary = label("icl", queries, shared_data / "icl/fewshot5/corpus.jsonl",
                    tmp_path / "o.jsonl", method="labels", show_progress=False)
    assert summary.skipped_no_positive == 3 and summary.queries == 0


def test_memory_candidates_stay_inside_the_query_conversation(tmp_path, shared_data):
    queries = _slice(shared_data / "chat/locomo/queries.train.jsonl", tmp_path / "q.jsonl", 3)
    corpus_path = shared_data / "chat/locomo/corpus.jsonl"
    out = tmp_path / "o.jsonl"
    label("chat", queries, corpus_path, out, method="labels", num_negatives=4,
          show_progress=False)
    group_of = {p.id: p.group for p in load_corpus(corpus_path)}
    for record, query in zip(_records(out), load_queries(queries)):
        assert {group_of[c["id"]] for c in record["candidates"] if c["id"]} == {query.group}


def test_labels_mode_sharding_and_merge_equal_the_unsharded_file(tmp_path, qa_files):
    queries, corpus = qa_files
    whole = tmp_path / "whole.jsonl"
    label("qa", queries, corpus, whole, method="labels", show_progress=False)
    shards = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for i, path in enumerate(shards):
        label("qa", queries, corpus, path, method="labels", shard=i, num_shards=3,
              show_progress=False)
    assert [len(_records(p)) for p in shards] == [2, 1, 1]
    merged = tmp_path / "merged.jsonl"
    assert merge_labelled(shards, merged) == 4
    assert merged.read_bytes() == whole.read_bytes()


def test_merge_rejects_a_query_labelled_differently_twice(tmp_path, qa_files):
    queries, corpus = qa_files
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    label("qa", queries, corpus, a, method="labels", limit=1, show_progress=False)
    label("qa", queries, corpus, b, method="labels", limit=1, num_negatives=3,
          show_progress=False)
    with pytest.raises(DataError, match="labelled differently"):
        merge_labelled([a, b], tmp_path / "m.jsonl")
    assert merge_labelled([a, a], tmp_path / "m.jsonl") == 1


def test_a_damaged_middle_line_is_named_not_skipped(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "o.jsonl"
    label("qa", queries, corpus, out, method="labels", limit=2, show_progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0][:20] + "\n" + lines[1])
    with pytest.raises(DataError, match=r"o\.jsonl:1: invalid JSON"):
        label("qa", queries, corpus, out, method="labels", show_progress=False)


def test_output_of_another_task_is_not_appended_to(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "o.jsonl"
    label("qa", queries, corpus, out, method="labels", limit=1, show_progress=False)
    with pytest.raises(DataError, match="field 'task' is 'qa'"):
        label("tool", queries, corpus, out, method="labels", show_progress=False)


# ----------------------------------------------------------------------------- with the LLM

@pytest.mark.slow
def test_label_writes_candidates_rewards_and_samples(reference, qa_files):
    out, summary = reference
    records = _records(out)
    queries = load_queries(qa_files[0])
    assert [r["query_id"] for r in records] == [q.id for q in queries[:3]]
    for record, query in zip(records, queries):
        m = len(record["candidates"])
        assert m == 1 + 2 + 1 and record["candidates"][-1] == {"id": "", "text": ""}
        assert record["candidates"][0]["id"] in query.positive_ids
        assert record["answer"] == query.answers[0]
        assert len(record["likelihood_rewards"]) == len(record["rank_rewards"]) == m
        assert all(0 < r < 1 for r in record["rank_rewards"])
        assert "rank_rewards_shift" not in record  # dead field: nothing read it
        assert len(record["samples"]) <= 3
        assert all(len(row) == len(record["samples"]) for row in record["sample_likelihoods"])
        assert record["answer"].casefold() not in [s.casefold() for s in record["samples"]]
        assert record["llm"].startswith("SmolLM2") and record["task"] == "qa"
    assert summary.queries == 3 and summary.labelled_now == 3
    assert summary.candidates_per_query == 4 and summary.top_positive_share is not None
    assert summary.tokens_per_s > 0 and summary.pairs_per_s > 0


@pytest.mark.slow
def test_batched_rewards_equal_unbatched_one_pair_at_a_time_scoring(llm, reference):
    out, _ = reference
    task = get_task("qa")
    for record in _records(out)[:2]:
        keys = llm.truncate([c["text"] for c in record["candidates"][:-1]], SMALL["max_key_tokens"])
        prompts = [task.format_prompt(record["query"], k) for k in keys]
        prompts.append(task.format_prompt(record["query"], None))
        outputs = [task.answer_prefix + o for o in [record["answer"], *record["samples"]]]
        flat = llm.score([p for p in prompts for _ in outputs], outputs * len(prompts),
                         batch_size=1, max_prompt_tokens=512, max_output_tokens=64)
        table = flat.reshape(len(prompts), len(outputs))
        np.testing.assert_allclose(record["likelihood_rewards"], table[:, 0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(record["sample_likelihoods"]).reshape(
            len(prompts), -1), table[:, 1:], atol=1e-4, rtol=0)
        expected = [_rank_reward_reference(row[0], row[1:]) for row in table.astype(np.float64)]
        np.testing.assert_allclose(record["rank_rewards"], expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_interrupted_and_resumed_run_gives_the_same_file(llm, reference, qa_files, tmp_path):
    ref_path, _ = reference
    queries, corpus = qa_files
    out = tmp_path / "qa.jsonl"
    label("qa", queries, corpus, out, llm=llm, limit=1, **SMALL)  # stopped after one query
    # ...then killed while writing the second: half a line, no newline.
    second = ref_path.read_text(encoding="utf-8").splitlines()[1]
    with out.open("a", encoding="utf-8") as handle:
        handle.write(second[: len(second) // 2])
    summary = label("qa", queries, corpus, out, llm=llm, limit=3, **SMALL)
    assert summary.labelled_now == 2 and summary.skipped_existing == 1
    assert out.read_bytes() == ref_path.read_bytes()
    again = label("qa", queries, corpus, out, llm=llm, limit=3, **SMALL)
    assert again.labelled_now == 0 and out.read_bytes() == ref_path.read_bytes()


@pytest.mark.slow
def test_llm_shards_merge_into_the_unsharded_file(llm, reference, qa_files, tmp_path):
    ref_path, _ = reference
    queries, corpus = qa_files
    shards = [tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"]
    for i, path in enumerate(shards):
        label("qa", queries, corpus, path, llm=llm, limit=3, shard=i, num_shards=2, **SMALL)
    merge_labelled(shards, tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == ref_path.read_bytes()


@pytest.mark.slow
def test_icl_candidates_are_mined_demonstrations_without_the_query_itself(llm, shared_data,
                                                                          tmp_path):
    queries = _slice(shared_data / "icl/fewshot5/queries.train.jsonl", tmp_path / "q.jsonl", 1)
    out = tmp_path / "icl.jsonl"
    label("icl", queries, shared_data / "icl/fewshot5/corpus.jsonl", out, llm=llm,
          **{**SMALL, "num_negatives": 3})
    (record,) = _records(out)
    query = load_queries(queries)[0]
    assert record["positive_ids"] == [] and len(record["candidates"]) == 4
    assert all(c["id"].startswith(query.subset) for c in record["candidates"][:-1])
    assert all(not c["text"].startswith(query.text) for c in record["candidates"])
    assert all("\n" not in s for s in record["samples"])


def test_a_file_labelled_by_another_llm_is_not_appended_to(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "o.jsonl"
    label("qa", queries, corpus, out, method="labels", limit=1, show_progress=False)
    record = json.loads(out.read_text())
    record["llm"] = "some-other-llm"
    out.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"o\.jsonl:1: labelled by 'some-other-llm'"):
        label("qa", queries, corpus, out, method="labels", limit=2, show_progress=False)


# ----------------------------------------------------------------------------- LabelConfig

# label()'s keyword defaults before LabelConfig existed: the config must keep every one.
OLD_DEFAULTS = {"method": "llm", "num_samples": 8, "num_negatives": 7, "negatives": "bm25",
                "limit": None, "shard": 0, "num_shards": 1, "max_key_tokens": 192,
                "max_prompt_tokens": 512, "max_output_tokens": 64, "max_new_tokens": None,
                "sampling_temperature": 1.0, "top_p": 0.95, "max_batch_tokens": None, "seed": 0,
                "device": None, "skip_answer_negatives": True, "show_progress": True,
                # new: samples also drawn with the top candidates as context (docs/method.md)
                "sample_contexts": 2, "oversample": 2.0,
                # new: candidates' prompt prefixes reused through the LLM's prefix cache
                "reuse_prefixes": True, "query_batch": 4}


def test_label_config_defaults_are_the_old_keyword_defaults():
    assert LabelConfig().to_dict() == OLD_DEFAULTS


def test_label_config_reads_yaml_and_json(tmp_path):
    (tmp_path / "label.yaml").write_text("num_samples: 4\nlimit: 10\nsampling_temperature: 0.7\n")
    (tmp_path / "label.json").write_text('{"negatives": "both", "seed": 3}')
    assert LabelConfig.load(tmp_path / "label.yaml") == LabelConfig(
        num_samples=4, limit=10, sampling_temperature=0.7)
    assert LabelConfig.load(tmp_path / "label.json") == LabelConfig(negatives="both", seed=3)


@pytest.mark.parametrize("values,key", [
    ({"num_samples": "8"}, "num_samples"),
    ({"top_p": "high"}, "top_p"),
    ({"show_progress": "no"}, "show_progress"),
    ({"limit": 1.5}, "limit"),
    ({"method": "oracle"}, "method"),
    ({"negatives": "random"}, "negatives"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_negatives": -1}, "num_negatives"),
    ({"limit": -1}, "limit"),
    ({"shard": 2, "num_shards": 2}, "shard"),
    ({"num_shards": 0}, "num_shards"),
    ({"max_key_tokens": 0}, "max_key_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_batch_tokens": 0}, "max_batch_tokens"),
    ({"sampling_temperature": 0.0}, "sampling_temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"num_sample": 8}, "num_sample"),
])
def test_bad_label_config_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        LabelConfig.load(values)


def test_labels_mode_needs_no_samples():
    assert LabelConfig.load({"method": "labels", "num_samples": 0}).num_samples == 0


def test_temperature_is_a_deprecated_name_of_sampling_temperature():
    with pytest.warns(DeprecationWarning, match="sampling_temperature"):
        assert LabelConfig.load({"temperature": 0.5}).sampling_temperature == 0.5
    with pytest.raises(ConfigError, match="both given"):
        LabelConfig.load({"temperature": 0.5, "sampling_temperature": 0.7})


# ----------------------------------------------------------------------------- a fake LLM backend

class FakeLLM:
    """The smallest LLM backend: no model. An output scores higher the more of its words the
    prompt holds (so a passage holding the answer wins); deterministic everywhere."""

    name = "fake-llm"

    def __init__(self, on_sample=None):
        self.stats = {"forward_tokens": 0, "pairs_scored": 0, "generated_tokens": 0}
        self.on_sample = on_sample
        self.calls = []

    def sample(self, prompts, n, *, max_new_tokens=32, temperature=1.0, top_p=0.95, seed=0,
               stop_at_newline=True, max_prompt_tokens=None):
        self.calls.append({"temperature": temperature, "top_p": top_p, "seed": seed})
        if self.on_sample is not None:
            self.on_sample()
        return [[f"guess {seed % 1000} {k}" for k in range(n)] for _ in prompts]

    def score(self, prompts, outputs, **kwargs):
        scores = []
        for prompt, output in zip(prompts, outputs):
            words, seen = output.casefold().split(), set(prompt.casefold().split())
            scores.append(-1.0 - len(words) / 10 + sum(w in seen for w in words) / len(words))
        self.stats["pairs_scored"] += len(outputs)
        self.stats["forward_tokens"] += sum(len((p + o).split()) for p, o in zip(prompts, outputs))
        return np.array(scores, dtype=np.float32)

    def score_grouped(self, prompts, outputs_per_prompt, **kwargs):
        return [self.score([p] * len(outs), outs) for p, outs in zip(prompts, outputs_per_prompt)]

    def generate(self, prompts, max_new_tokens=32, **kwargs):
        return ["guess" for _ in prompts]

    def truncate(self, texts, max_tokens):
        return [" ".join(t.split()[:max_tokens]) for t in texts]

    def count_tokens(self, text):
        return len(text.split())


FAKE = {"num_samples": 3, "num_negatives": 2, "show_progress": False, "seed": 7}


def _fake_table(record, max_key_tokens=LabelConfig.max_key_tokens):
    """The LLM table the labeller must have built for ``record``, from the fake's scores."""
    fake, task = FakeLLM(), get_task(record["task"])
    keys = fake.truncate([c["text"] for c in record["candidates"][:-1]], max_key_tokens)
    prompts = [task.format_prompt(record["query"], k) for k in keys]
    prompts.append(task.format_prompt(record["query"], None))
    outputs = [task.answer_prefix + o for o in [record["answer"], *record["samples"]]]
    return np.stack(fake.score_grouped(prompts, [outputs] * len(prompts)))


def test_a_ten_line_fake_backend_is_an_llm_backend():
    assert isinstance(FakeLLM(), LLMBackend)


def test_label_runs_end_to_end_with_a_fake_backend(tmp_path, qa_files):
    queries, corpus = qa_files
    fake = FakeLLM()
    out = tmp_path / "fake.jsonl"
    summary = label("qa", queries, corpus, out, llm=fake, **FAKE)
    records = _records(out)
    assert summary.queries == summary.labelled_now == len(records) == 4
    assert summary.llm == "fake-llm" and summary.pairs_per_s > 0
    for record in records:
        table = _fake_table(record)
        assert record["llm"] == "fake-llm" and len(record["candidates"]) == 4
        assert record["likelihood_rewards"] == [round(float(v), 6) for v in table[:, 0]]
        expected = [_rank_reward_reference(row[0], row[1:]) for row in table.astype(np.float64)]
        np.testing.assert_allclose(record["rank_rewards"], expected, atol=1e-6, rtol=0)
        assert record["sample_likelihoods"] == [[round(float(v), 6) for v in row]
                                                for row in table[:, 1:]]
        assert "rank_rewards_shift" not in record and record["method"] == "llm"
    # Per query: one draw without context and one with its top candidates as context.
    assert [c["temperature"] for c in fake.calls] == [1.0] * 8


def test_every_registered_reward_is_written_to_its_field(tmp_path, qa_files, monkeypatch):
    queries, corpus = qa_files
    monkeypatch.setitem(REWARDS, "margin", Reward(
        "margin", lambda t: t[:, 0] - t[:, 1:].max(1), "margin_rewards"))
    label("qa", queries, corpus, tmp_path / "llm.jsonl", llm=FakeLLM(), limit=2, **FAKE)
    for record in _records(tmp_path / "llm.jsonl"):
        table = _fake_table(record)
        assert record["margin_rewards"] == [round(float(v), 6)
                                            for v in table[:, 0] - table[:, 1:].max(1)]
    label("qa", queries, corpus, tmp_path / "labels.jsonl", method="labels", limit=2,
          show_progress=False)
    for record in _records(tmp_path / "labels.jsonl"):
        assert record["margin_rewards"] == record["rank_rewards"] == [1.0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_config_and_keyword_overrides_give_the_same_file(tmp_path, qa_files):
    queries, corpus = qa_files
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    label("qa", queries, corpus, a, llm=FakeLLM(), limit=3, **FAKE)
    label("qa", queries, corpus, b, llm=FakeLLM(), config=LabelConfig(limit=3, **FAKE))
    (tmp_path / "label.yaml").write_text("limit: 1\nnum_samples: 3\nnum_negatives: 5\nseed: 7\n")
    label("qa", queries, corpus, c, llm=FakeLLM(), config=tmp_path / "label.yaml", limit=3,
          num_negatives=2, show_progress=False)  # keywords override the file's values
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_old_temperature_keyword_still_sets_the_sampling_temperature(tmp_path, qa_files):
    queries, corpus = qa_files
    fake = FakeLLM()
    with pytest.warns(DeprecationWarning, match="'temperature' is deprecated"):
        label("qa", queries, corpus, tmp_path / "o.jsonl", llm=fake, limit=1, temperature=0.5,
              **FAKE)
    assert fake.calls[0]["temperature"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        label("qa", queries, corpus, tmp_path / "p.jsonl", llm=fake, limit=1,
              sampling_temperature=0.5, **FAKE)
    assert fake.calls[1]["temperature"] == 0.5


def test_fake_backend_run_resumes_to_the_uninterrupted_file(tmp_path, qa_files):
    queries, corpus = qa_files
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    label("qa", queries, corpus, whole, llm=FakeLLM(), **FAKE)
    label("qa", queries, corpus, out, llm=FakeLLM(), limit=1, **FAKE)
    second = whole.read_text().splitlines()[1]
    with out.open("a") as handle:  # killed while writing the second record
        handle.write(second[:40])
    summary = label("qa", queries, corpus, out, llm=FakeLLM(), **FAKE)
    assert summary.labelled_now == 3 and summary.skipped_existing == 1
    assert out.read_bytes() == whole.read_bytes()


# ----------------------------------------------------------------------------- the output file

@pytest.mark.parametrize("content", [
    b"my notes\nline 2",  # no labelled file at all, last line without newline
    b'{"a": 1}\n{"b": 2',  # JSON, but not labelled records
    b"",  # placeholder: a valid labelled line followed by a foreign partial line (below)
])
def test_out_that_is_not_a_labelled_file_is_left_untouched(tmp_path, qa_files, content):
    queries, corpus = qa_files
    out = tmp_path / "out.jsonl"
    if not content:
        label("qa", queries, corpus, out, method="labels", limit=1, show_progress=False)
        content = out.read_bytes() + b"notes typed after the labels"
    out.write_bytes(content)
    with pytest.raises(DataError, match=r"out\.jsonl:\d"):
        label("qa", queries, corpus, out, method="labels", show_progress=False)
    assert out.read_bytes() == content


def test_a_partial_last_record_of_ours_is_cut_and_relabelled(tmp_path, qa_files):
    queries, corpus = qa_files
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    label("qa", queries, corpus, whole, method="labels", limit=2, show_progress=False)
    lines = whole.read_text().splitlines(keepends=True)
    for cut in (3, 40):  # shorter than, and longer than, the record's opening '{"query_id": '
        out.write_text(lines[0] + lines[1][:cut])
        label("qa", queries, corpus, out, method="labels", limit=2, show_progress=False)
        assert out.read_bytes() == whole.read_bytes()


def test_a_second_labeller_on_the_same_out_stops_at_once(tmp_path, qa_files):
    queries, corpus = qa_files
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    label("qa", queries, corpus, whole, llm=FakeLLM(), **FAKE)
    errors = []

    def second_labeller():  # starts while the first one is labelling its first query
        if not errors:
            try:
                label("qa", queries, corpus, out, llm=FakeLLM(), **FAKE)
            except OutputLockedError as err:
                errors.append(str(err))

    label("qa", queries, corpus, out, llm=FakeLLM(on_sample=second_labeller), **FAKE)
    assert errors == [f"another process is writing {out}; wait for it to finish or write to "
                      f"another file"]
    assert out.read_bytes() == whole.read_bytes()  # the first one's file is whole, once


def test_a_locked_out_is_not_trimmed_or_written(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "out.jsonl"
    label("qa", queries, corpus, out, method="labels", limit=1, show_progress=False)
    content = out.read_bytes() + b'{"query_id": "half'
    out.write_bytes(content)
    with out.open("rb") as other:  # another labeller's lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputLockedError, match="another process is writing"):
            label("qa", queries, corpus, out, method="labels", show_progress=False)
        assert out.read_bytes() == content


def test_a_query_labelled_twice_identically_counts_once(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "out.jsonl"
    label("qa", queries, corpus, out, method="labels", limit=2, show_progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[0])  # two old labellers both wrote query 1
    summary = label("qa", queries, corpus, out, method="labels", limit=3, show_progress=False)
    assert summary.queries == 3 and summary.labelled_now == 1 and summary.skipped_existing == 2
    assert [r.query_id for r in load_labelled(out)] == [q.id for q in load_queries(queries)[:3]]
    record = json.loads(lines[0])
    record["rank_rewards"][0] = 0.5
    out.write_text(lines[0] + lines[1] + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"out\.jsonl:3: query .* labelled again, differently "
                                        r"from line 1"):
        label("qa", queries, corpus, out, method="labels", show_progress=False)


def test_label_config_fields_are_label_keywords(tmp_path, qa_files):
    """Every LabelConfig field is accepted by label() by name (the CLI relies on it)."""
    queries, corpus = qa_files
    values = {f.name: getattr(LabelConfig(), f.name) for f in dataclasses.fields(LabelConfig)}
    values.update(method="labels", show_progress=False, limit=1)
    summary = label("qa", queries, corpus, tmp_path / "o.jsonl", **values)
    assert summary.queries == 1


# ----------------------------------------------------------------------------- samples with context

class RepetitiveLLM(FakeLLM):
    """Samples mostly repeat each other and the desired output: de-duplication is put to work."""

    def sample(self, prompts, n, **kwargs):
        super().sample(prompts, n, **kwargs)
        seed = kwargs["seed"] % 1000
        return [[answer for answer in ("Denver Broncos", f"guess {seed}", f"other {seed} {p}",
                                       f"third {seed} {p}")][:n] for p in range(len(prompts))]


class PerPromptLLM(FakeLLM):
    """Samples that differ per prompt, and a record of the prompts sampled from."""

    def sample(self, prompts, n, **kwargs):
        super().sample(prompts, n, **kwargs)
        self.calls[-1]["prompts"] = list(prompts)
        return [[f"guess {p} {k}" for k in range(n)] for p in prompts]


def test_samples_come_with_and_without_context_distinct_and_not_the_answer(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "llm.jsonl"
    fake = PerPromptLLM()
    label("qa", queries, corpus, out, llm=fake, **{**FAKE, "num_samples": 6})
    # Per query: 6 draws without context, then 3 with each of the two context candidates.
    assert [len(c["prompts"]) for c in fake.calls] == [1, 2] * 4
    for record in _records(out):
        assert len(record["samples"]) == 6 == len(set(record["samples"]))
        contexts = record["sample_contexts"]
        assert len(contexts) == 6 and contexts[0] == ""
        used = {c for c in contexts if c}
        ids = [c["id"] for c in record["candidates"]]
        # The first two non-empty candidates (the positive first) are the sampling contexts.
        assert used == set(ids[:2]) and ids[0] in record["positive_ids"]
        assert contexts.count("") == 3


def test_duplicates_and_the_desired_output_are_dropped_before_n_is_counted(tmp_path, qa_files):
    queries, corpus = qa_files
    out = tmp_path / "llm.jsonl"
    label("qa", queries, corpus, out, llm=RepetitiveLLM(), limit=1, **{**FAKE, "num_samples": 4})
    record = _records(out)[0]
    assert record["answer"] not in record["samples"]
    assert len(record["samples"]) == len(set(record["samples"])) == 4


def test_sample_contexts_zero_draws_without_context_only(tmp_path, qa_files):
    queries, corpus = qa_files
    fake = FakeLLM()
    out = tmp_path / "llm.jsonl"
    label("qa", queries, corpus, out, llm=fake, limit=2, sample_contexts=0, oversample=1.0,
          **FAKE)
    ids = [r["query_id"] for r in _records(out)]
    assert [c["seed"] for c in fake.calls] == [stable_seed(FAKE["seed"], q) for q in ids]
    assert all(set(r["sample_contexts"]) == {""} for r in _records(out))


# ----------------------------------------------------------------------------- prefix reuse

class SeededLLM(FakeLLM):
    """Draws per prompt from the seed FrozenLLM gives that prompt (``stable_seed(seed, k)``)."""

    def sample(self, prompts, n, *, max_new_tokens=32, temperature=1.0, top_p=0.95, seed=0,
               stop_at_newline=True, max_prompt_tokens=None):
        return self.draw(prompts, [n] * len(prompts),
                         [stable_seed(seed, k) for k in range(len(prompts))], max_new_tokens)

    def draw(self, prompts, counts, seeds, limits):
        self.calls.append({"prompts": len(prompts), "seeds": list(seeds), "temperature": 1.0})
        if isinstance(limits, int):
            limits = [limits] * len(prompts)
        return [[f"guess {s % 1000} {k} {m}" for k in range(c)]
                for c, s, m in zip(counts, seeds, limits)]


class PrefixLLM(SeededLLM):
    """SeededLLM with the optional prefix-reuse keywords; records the prefixes it is given."""

    def __init__(self):
        super().__init__()
        self.prefixes = []

    def sample(self, prompts, n, *, max_new_tokens=32, temperature=1.0, top_p=0.95, seed=0,
               stop_at_newline=True, max_prompt_tokens=None, seeds=None, prefixes=None):
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        seeds = seeds if seeds is not None else [stable_seed(seed, k)
                                                 for k in range(len(prompts))]
        self.prefixes.append(prefixes)
        return self.draw(prompts, counts, seeds, max_new_tokens)

    def score_grouped(self, prompts, outputs_per_prompt, prefixes=None, **kwargs):
        self.prefixes.append(prefixes)
        return super().score_grouped(prompts, outputs_per_prompt)


def test_prefix_reuse_batches_queries_and_passes_each_candidates_prefix(tmp_path, qa_files):
    queries, corpus = qa_files
    plain, joint, off = tmp_path / "plain.jsonl", tmp_path / "joint.jsonl", tmp_path / "off.jsonl"
    label("qa", queries, corpus, plain, llm=SeededLLM(), **FAKE)
    backend = PrefixLLM()
    label("qa", queries, corpus, joint, llm=backend, query_batch=3, **FAKE)
    # The same draws (per-prompt seeds) and scores: the same file, byte for byte.
    assert joint.read_bytes() == plain.read_bytes()
    # 4 queries in batches of 3 and 1: one sampling call per batch, 3 prompts per query.
    assert [c["prompts"] for c in backend.calls] == [9, 3]
    task = get_task("qa")
    sampled, scored = backend.prefixes[0], backend.prefixes[1]
    assert sampled[0] is None and len(scored) == 3 * 4  # 3 queries x (2 candidates + empty)
    for record, row in zip(_records(joint), [scored[k:k + 4] for k in range(0, 12, 4)]):
        keys = backend.truncate([c["text"] for c in record["candidates"][:-1]],
                                LabelConfig.max_key_tokens)
        assert row[-1] is None  # the empty context has no prefix
        for key, prefix in zip(keys, row):
            assert prefix == task.prompt_template.split("{query}")[0].format(key=key)
            assert task.format_prompt(record["query"], key).startswith(prefix)
    # Reuse off: the two calls per query of the plain path, and again the same file.
    legacy = PrefixLLM()
    label("qa", queries, corpus, off, llm=legacy, reuse_prefixes=False, **FAKE)
    assert off.read_bytes() == plain.read_bytes()
    assert [c["prompts"] for c in legacy.calls] == [1, 2] * 4
    assert all(p is None for p in legacy.prefixes)


@pytest.mark.slow
def test_prefix_reuse_gives_the_labels_of_plain_labelling(llm, reference, qa_files, tmp_path):
    """The reference run reuses prefixes (the default); labelling without reuse, and with one
    query per batch, must give the same samples and, within 1e-4, the same numbers."""
    ref_path, ref_summary = reference
    queries, corpus = qa_files
    runs = {}
    for name, options in {"plain": {"reuse_prefixes": False},
                          "one by one": {"query_batch": 1}}.items():
        out = tmp_path / f"{name}.jsonl"
        runs[name] = (label("qa", queries, corpus, out, llm=llm, limit=3, **options, **SMALL),
                      _records(out))
    expected = _records(ref_path)
    for name, (summary, records) in runs.items():
        assert len(records) == len(expected) == 3
        for got, want in zip(records, expected):
            for field in ("query_id", "candidates", "samples", "sample_contexts"):
                assert got[field] == want[field], (name, field)
            for field in ("likelihood_rewards", "rank_rewards", "sample_likelihoods"):
                np.testing.assert_allclose(got[field], want[field], atol=1e-4, rtol=0,
                                           err_msg=f"{name}: {field}")
        # The same work, whatever reuse spared: run + saved tokens equal the plain run's.
        assert summary.llm_tokens == ref_summary.llm_tokens, name
    assert runs["plain"][0].saved_tokens == 0 < ref_summary.saved_tokens


# ----------------------------------------------------------------------------- compact labels

def test_compact_labels_expand_to_the_labelled_file_byte_for_byte(tmp_path, qa_files):
    queries, corpus = qa_files
    for method in ("llm", "labels"):
        full = tmp_path / f"{method}.jsonl"
        label("qa", queries, corpus, full, method=method, llm=FakeLLM(), **FAKE)
        compact = tmp_path / f"{method}.compact.jsonl"
        assert compact_labelled(full, compact) == 4
        text = compact.read_text(encoding="utf-8")
        assert '"candidates"' not in text and '"query":' not in text
        assert len(text) < len(full.read_text(encoding="utf-8")) / 3
        again = tmp_path / f"{method}.again.jsonl"
        assert expand_labelled(compact, queries, corpus, again) == 4
        assert again.read_bytes() == full.read_bytes()
        one = tmp_path / "one.jsonl"
        first = _records(full)[0]["query_id"]
        assert expand_labelled(compact, queries, corpus, one, query_ids=[first]) == 1


def test_compact_labels_for_other_data_are_named(tmp_path, qa_files):
    queries, corpus = qa_files
    full, compact = tmp_path / "llm.jsonl", tmp_path / "compact.jsonl"
    label("qa", queries, corpus, full, llm=FakeLLM(), limit=2, **FAKE)
    compact_labelled(full, compact)
    lines = compact.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["candidate_ids"][1] = "no-such-passage"
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError,
                       match=r"bad.jsonl:2: candidate 'no-such-passage' is not in the corpus"):
        expand_labelled(tmp_path / "bad.jsonl", queries, corpus, tmp_path / "x.jsonl")
    bad = json.loads(lines[0])
    bad["query_id"] = "nobody"
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: query 'nobody' is not in the queries file"):
        expand_labelled(tmp_path / "bad.jsonl", queries, corpus, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_reward_report_counts_distinct_ranks_spread_and_positive_on_top(tmp_path):
    record = {"query_id": "q", "task": "qa", "query": "q?", "answer": "a", "llm": "x",
              "candidates": [{"id": "p", "text": "P"}, {"id": "n", "text": "N"},
                             {"id": "", "text": ""}],
              "positive_ids": ["p"], "samples": ["s1", "s2"], "sample_contexts": ["", "p"],
              "likelihood_rewards": [-1.0, -3.0, -2.0],
              # target above both samples / below both / between: three distinct ranks
              "sample_likelihoods": [[-2.0, -1.5], [-1.0, -2.0], [-1.0, -2.5]],
              "rank_rewards": [0.9, 0.1, 0.5], "method": "llm"}
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "query_id": "h",
                                                             "method": "labels"}) + "\n")
    report = reward_report(path)
    assert report["queries"] == 1 and report["distinct_ranks"] == 3
    assert report["samples"] == 2 and report["with_context"] == 0.5
    assert report["rank"]["distinct"] == 3 and report["rank"]["positive_on_top"] == 1.0
    assert report["likelihood"]["spread"] == pytest.approx(np.std([-1.0, -3.0, -2.0]))


def test_merge_keeps_query_order_when_a_shard_skipped_a_query(tmp_path, qa_files):
    queries, corpus = qa_files
    rows = [json.loads(line) for line in queries.read_text(encoding="utf-8").splitlines()]
    rows[1]["positive_ids"] = []  # the labels method skips it: shard 1 writes one record less
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    whole = tmp_path / "whole.jsonl"
    label("qa", path, corpus, whole, method="labels", show_progress=False)
    shards = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for i, shard in enumerate(shards):
        label("qa", path, corpus, shard, method="labels", shard=i, num_shards=2,
              show_progress=False)
    merged = tmp_path / "merged.jsonl"
    merge_labelled(shards, merged, order=[r["id"] for r in rows])
    assert merged.read_bytes() == whole.read_bytes()
    merge_labelled(shards, merged)  # without the order, round-robin cannot know
    assert merged.read_bytes() != whole.read_bytes()
