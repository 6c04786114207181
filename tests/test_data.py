import json
import os

import pytest

from llm_embedder.data import (
    DataError,
    Passage,
    Query,
    candidate_pool,
    load_corpus,
    load_labelled,
    load_queries,
)
from llm_embedder.io import JsonlAppender, atomic_write_text


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_corpus_loads_fields_and_keeps_extras(tmp_path):
    path = write(tmp_path / "c.jsonl", [
        json.dumps({"id": "a", "text": "alpha", "title": "A", "group": "g1", "session": 3}),
        "",
        json.dumps({"id": 7, "text": "beta"}),
    ])
    corpus = load_corpus(path)
    assert [p.id for p in corpus] == ["a", "7"]
    assert corpus[0].full_text == "A: alpha" and corpus[0].extra == {"session": 3}
    assert corpus[1].full_text == "beta"


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "text": "x"', "line 2|:2: invalid JSON"),
    ('["not", "an", "object"]', ":2: expected a JSON object"),
    ('{"text": "x"}', ":2: missing field 'id'"),
    ('{"id": "b", "text": "   "}', ":2: field 'text' is empty"),
    ('{"id": "b", "text": 3}', ":2: field 'text' must be a string"),
    ('{"id": "a", "text": "dup"}', ":2: duplicate id 'a'"),
])
def test_malformed_corpus_line_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", ['{"id": "a", "text": "ok"}', line])
    with pytest.raises(DataError, match=message.split("|")[-1]) as info:
        load_corpus(path)
    assert str(path) in str(info.value)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_queries(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no queries"):
        load_queries(write(tmp_path / "empty.jsonl", []))


def test_queries_require_answers_when_asked(tmp_path):
    path = write(tmp_path / "q.jsonl", [json.dumps({"id": "q", "text": "t", "answers": [""]})])
    assert load_queries(path)[0].answers == [""]
    with pytest.raises(DataError, match=":1: field 'answers' is empty"):
        load_queries(path, require_answers=True)


def test_queries_read_group_subset_and_options(tmp_path):
    path = write(tmp_path / "q.jsonl", [json.dumps(
        {"id": "q", "text": "t", "answers": ["x"], "positive_ids": ["a"], "task": "sst2",
         "options": ["Negative", "Positive"], "category": 2})])
    (q,) = load_queries(path)
    assert q.subset == "sst2" and q.options == ["Negative", "Positive"]
    assert q.extra == {"category": 2}


def test_candidate_pool_restricts_to_group_then_subset():
    corpus = [Passage("a", "x", group="g1"), Passage("b", "y", group="g2"),
              Passage("c", "z", group="g1")]
    assert candidate_pool(Query("q", "t", group="g1"), corpus) == [0, 2]
    demos = [Passage("d0", "x", subset="sst2"), Passage("d1", "y", subset="trec")]
    assert candidate_pool(Query("q", "t", subset="trec"), demos) == [1]
    assert candidate_pool(Query("q", "t"), demos) == [0, 1]


def labelled_line(qid, n=2, **overrides):
    record = {"query_id": qid, "task": "qa", "query": "q", "answer": "a",
              "candidates": [{"id": str(i), "text": f"t{i}"} for i in range(n)],
              "likelihood_rewards": [-1.0] * n, "rank_rewards": [0.5] * n}
    record.update(overrides)
    return json.dumps(record)


def test_labelled_file_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(labelled_line("q1") + "\n" + labelled_line("q2")[:30])
    assert [r.query_id for r in load_labelled(path)] == ["q1"]


@pytest.mark.parametrize("overrides,message", [
    (dict(rank_rewards=[0.5]), "'rank_rewards' has 1 values for 2 candidates"),
    (dict(likelihood_rewards=[float("nan"), 0.0]), "non-finite"),
    (dict(candidates=[]), "'candidates' must be a non-empty list"),
    (dict(candidates=[{"id": "x"}, {"id": "y", "text": "t"}]), r"candidates\[0\]"),
])
def test_malformed_labelled_line_is_named(tmp_path, overrides, message):
    path = write(tmp_path / "l.jsonl", [labelled_line("q1"),
                                        labelled_line("q2", **overrides).replace("NaN", "NaN")])
    with pytest.raises(DataError, match=":2: .*" + message):
        load_labelled(path)


def test_appender_truncates_partial_line_left_by_a_kill(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"')
    with JsonlAppender(path) as out:
        out.append({"a": 3})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"a": 3}]


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
