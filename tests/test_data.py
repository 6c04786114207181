import json

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


# ----------------------------------------------------------------------------- bad inputs

_QUERY = {"id": "q1", "text": "who?", "answers": ["x"], "positive_ids": ["a"]}
_PASSAGE = {"id": "a", "text": "alpha"}


@pytest.mark.parametrize("loader,record,message", [
    ("queries", {**_QUERY, "answers": [True, 3]},
     ":1: field 'answers'[0] must be a string, got bool true"),
    ("queries", {**_QUERY, "answers": ["x", None]},
     ":1: field 'answers'[1] must be a string, got NoneType null"),
    ("queries", {**_QUERY, "answers": {"text": "x"}},
     ":1: field 'answers' must be a list of strings, got dict {\"text\": \"x\"}"),
    ("queries", {**_QUERY, "id": 7}, ":1: field 'id' must be a string, got int 7"),
    ("queries", {**_QUERY, "id": ["q1"]}, ":1: field 'id' must be a string, got list [\"q1\"]"),
    ("queries", {**_QUERY, "positive_ids": [1.5]},
     ":1: field 'positive_ids'[0] must be a string, got float 1.5"),
    ("queries", {**_QUERY, "options": ["yes", False]},
     ":1: field 'options'[1] must be a string, got bool false"),
    ("corpus", {**_PASSAGE, "id": 1.5}, ":1: field 'id' must be a string, got float 1.5"),
    ("corpus", {**_PASSAGE, "id": True}, ":1: field 'id' must be a string, got bool true"),
    ("corpus", {**_PASSAGE, "group": [1]}, ":1: field 'group' must be a string, got list [1]"),
    ("labelled", json.loads(labelled_line("q1", query_id=3)),
     ":1: field 'query_id' must be a string, got int 3"),
    ("labelled", json.loads(labelled_line("q1", samples=["a", True])),
     ":1: field 'samples'[1] must be a string, got bool true"),
    ("labelled", json.loads(labelled_line("q1", positive_ids=[False])),
     ":1: field 'positive_ids'[0] must be a string, got bool false"),
])
def test_values_of_the_wrong_type_name_file_line_and_field(tmp_path, loader, record, message):
    path = write(tmp_path / f"{loader}.jsonl", [json.dumps(record)])
    load = {"queries": load_queries, "corpus": load_corpus, "labelled": load_labelled}[loader]
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value) == f"{path}{message}"


@pytest.mark.parametrize("loader,first", [
    ("queries", json.dumps(_QUERY)),
    ("corpus", json.dumps(_PASSAGE)),
    ("labelled", labelled_line("q1")),
])
def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, loader, first):
    path = tmp_path / f"{loader}.jsonl"
    path.write_bytes(first.encode() + b'\n{"id": "caf\xe9", "text": "x"}\n')
    load = {"queries": load_queries, "corpus": load_corpus, "labelled": load_labelled}[loader]
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value) == (f"{path}:2: not UTF-8 text (byte 0xe9 at column 12): save the "
                               f"file as UTF-8")


def test_integer_passage_ids_and_answers_read_as_their_digits(tmp_path):
    corpus = write(tmp_path / "c.jsonl", [json.dumps({"id": 12, "text": "x", "group": 3})])
    assert (load_corpus(corpus)[0].id, load_corpus(corpus)[0].group) == ("12", "3")
    queries = write(tmp_path / "q.jsonl", [json.dumps({**_QUERY, "answers": [1889],
                                                       "positive_ids": [12]})])
    assert load_queries(queries)[0].answers == ["1889"]
    assert load_queries(queries)[0].positive_ids == ["12"]


def test_labelled_file_keeps_one_record_per_query_id(tmp_path):
    path = write(tmp_path / "l.jsonl", [labelled_line("q1"), labelled_line("q2"),
                                        labelled_line("q1")])
    assert [r.query_id for r in load_labelled(path)] == ["q1", "q2"]


def test_labelled_file_with_a_query_labelled_differently_twice_is_an_error(tmp_path):
    path = write(tmp_path / "l.jsonl", [labelled_line("q1"), labelled_line("q2"),
                                        labelled_line("q1", rank_rewards=[0.9, 0.1])])
    with pytest.raises(DataError, match=r"l\.jsonl:3: query 'q1' is labelled again, "
                                        r"differently from line 1"):
        load_labelled(path)
