"""``llm-embedder convert``: FlagEmbedding's fine-tuning data (written here from its documented
fields) to and from queries/corpus and labelled files, round trips, and bad inputs."""

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from llm_embedder.cli import main
from llm_embedder.data import load_corpus, load_labelled, load_queries
from llm_embedder.flag import (
    flag_to_labelled,
    flag_to_queries,
    labelled_to_flag,
    passage_id,
    queries_to_flag,
    read_flag,
)

# FlagEmbedding (bge) records: pos/neg with pos_scores/neg_scores, prompt and type.
BGE = [
    {"query": "capital of France?", "pos": ["Paris is the capital of France."],
     "neg": ["Berlin is in Germany.", "Rome is in Italy."], "pos_scores": [0.9],
     "neg_scores": [0.2, 0.1], "prompt": "Represent this sentence for searching: ",
     "type": "normal"},
    {"query": "largest ocean?", "pos": ["The Pacific is the largest ocean."],
     "neg": ["Berlin is in Germany.", "The Nile is a river."], "pos_scores": [0.8],
     "neg_scores": [0.3, 0.05], "prompt": "Represent this sentence for searching: ",
     "type": "normal"},
]
# LLM-Embedder records: teacher_scores over pos + neg, answers, task, query_id; and a memory
# record whose candidates are the conversation's history.
LLM_EMBEDDER = [
    {"query": "Who wrote Hamlet?", "pos": ["Hamlet is a tragedy by William Shakespeare."],
     "neg": ["Macbeth is set in Scotland.", "Goethe wrote Faust."],
     "teacher_scores": [-0.5, -2.25, -3.0], "answers": ["William Shakespeare"], "task": "qa",
     "query_id": 7},
    {"query": "Are you still in the army?", "history": [
        "Speaker 1: Where did you travel?\nSpeaker 2: All over, I'm in the army.",
        "Speaker 1: Nice.\nSpeaker 2: I like kittens."],
     "teacher_scores": [-1.5, -2.75], "answers": ["No, I left the army last year."],
     "task": "chat", "query_id": 8},
]
# Unscored FlagEmbedding data, as most users have it.
PLAIN = [
    {"query": "capital of France?", "pos": ["Paris is the capital of France."],
     "neg": ["Berlin is in Germany.", "Rome is in Italy.", "Madrid is in Spain."]},
    {"query": "largest ocean?", "pos": ["The Pacific is the largest ocean."],
     "neg": ["Berlin is in Germany.", "The Nile is a river.", "Everest is a mountain."]},
]


def _write(path: Path, rows: List[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _scored(row: Dict[str, Any]) -> Dict[str, Any]:
    """``row`` as labelled -> flag writes it: both score layouts, history as neg."""
    out = dict(row)
    if "history" in out:
        out["pos"], out["neg"] = [], out.pop("history")
    if "teacher_scores" in out:
        n = len(out["pos"])
        out["pos_scores"], out["neg_scores"] = out["teacher_scores"][:n], out["teacher_scores"][n:]
    else:
        out["teacher_scores"] = out["pos_scores"] + out["neg_scores"]
    return out


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("rows", [BGE, LLM_EMBEDDER], ids=["bge", "llm-embedder"])
def test_flag_to_labelled_and_back_keeps_every_field(rows, tmp_path):
    flag_in = _write(tmp_path / "train.jsonl", rows)
    assert main(["convert", "--from", "flag", "--to", "labelled", str(flag_in), "--out",
                 str(tmp_path / "l.jsonl")] + ([] if "task" in rows[0] else
                                               ["--task", "qa"])) == 0
    assert main(["convert", "--from", "labelled", "--to", "flag", str(tmp_path / "l.jsonl"),
                 "--out", str(tmp_path / "back.jsonl")]) == 0
    assert _read(tmp_path / "back.jsonl") == [_scored(r) for r in rows]


def test_flag_to_labelled_fills_every_reward_with_the_teacher_scores(tmp_path):
    flag_to_labelled(_write(tmp_path / "t.jsonl", LLM_EMBEDDER), tmp_path / "l.jsonl")
    qa, chat = load_labelled(tmp_path / "l.jsonl")
    assert (qa.task, chat.task) == ("qa", "chat")
    assert qa.rank_rewards == qa.likelihood_rewards == [-0.5, -2.25, -3.0]
    assert qa.positive_ids == [passage_id("Hamlet is a tragedy by William Shakespeare.")]
    assert [c["text"] for c in qa.candidates][1:] == LLM_EMBEDDER[0]["neg"]
    assert qa.answer == "William Shakespeare" and qa.extra["method"] == "flag"
    assert qa.query_id == "7" and chat.positive_ids == [] and len(chat.candidates) == 2
    # history turns are the query's own: ids scoped to it, unlike shared passages
    assert chat.candidates[0]["id"] == passage_id(LLM_EMBEDDER[1]["history"][0], "8")


def test_flag_to_queries_and_back_keeps_texts_answers_and_fields(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("pos_scores", "neg_scores")} for r in BGE]
    rows[0]["answers"] = ["Paris"]
    flag_in = _write(tmp_path / "train.jsonl", rows)
    q, c = tmp_path / "q.jsonl", tmp_path / "c.jsonl"
    assert main(["convert", "--from", "flag", "--to", "queries", str(flag_in), "--queries",
                 str(q), "--corpus", str(c)]) == 0
    corpus = load_corpus(c)
    assert len(corpus) == 5  # "Berlin is in Germany." is in both records, kept once
    assert all(p.id == passage_id(p.text) for p in corpus)
    first = load_queries(q)[0]
    assert first.answers == ["Paris"] and first.positive_ids == [passage_id(rows[0]["pos"][0])]
    assert first.extra["negative_ids"] == [passage_id(t) for t in rows[0]["neg"]]
    assert main(["convert", "--from", "queries", "--to", "flag", str(q), "--corpus", str(c),
                 "--out", str(tmp_path / "back.jsonl")]) == 0
    assert _read(tmp_path / "back.jsonl") == rows


def test_converting_twice_gives_the_same_ids_and_bytes(tmp_path):
    flag_in = _write(tmp_path / "train.jsonl", PLAIN)
    for name in ("a", "b"):
        flag_to_queries(flag_in, tmp_path / f"{name}.q.jsonl", tmp_path / f"{name}.c.jsonl")
    assert (tmp_path / "a.q.jsonl").read_bytes() == (tmp_path / "b.q.jsonl").read_bytes()
    assert (tmp_path / "a.c.jsonl").read_bytes() == (tmp_path / "b.c.jsonl").read_bytes()


def test_score_own_data_with_label_then_back_to_flag(tmp_path, capsys):
    # The FlagEmbedding user's chain: convert -> label -> convert. --pool query makes the
    # labeller score exactly the given negatives.
    flag_in = _write(tmp_path / "train.jsonl", PLAIN)
    q, c, lab = tmp_path / "q.jsonl", tmp_path / "c.jsonl", tmp_path / "l.jsonl"
    assert main(["convert", "--from", "flag", "--to", "queries", str(flag_in), "--queries",
                 str(q), "--corpus", str(c), "--pool", "query"]) == 0
    assert "--num-negatives 3" in capsys.readouterr().out
    assert main(["label", "--task", "qa", "--method", "labels", "--queries", str(q),
                 "--corpus", str(c), "--out", str(lab), "--num-negatives", "3",
                 "--keep-answer-negatives"]) == 0
    out = tmp_path / "scored.jsonl"
    assert main(["convert", "--from", "labelled", "--to", "flag", str(lab), "--queries", str(q),
                 "--out", str(out)]) == 0
    for row, original in zip(_read(out), PLAIN):
        assert row["query"] == original["query"] and row["pos"] == original["pos"]
        assert sorted(row["neg"]) == sorted(original["neg"])
        assert row["pos_scores"] == [1.0] and row["neg_scores"] == [0.0, 0.0, 0.0]
        assert row["teacher_scores"] == row["pos_scores"] + row["neg_scores"]
        assert set(row) == {"query", "pos", "neg", "pos_scores", "neg_scores",
                            "teacher_scores"}  # nothing of ours leaks into their file


def test_labelled_file_from_label_becomes_llm_embedder_data(tmp_path):
    # Data that never was FlagEmbedding's gets LLM-Embedder's query_id, answers and task.
    _write(tmp_path / "c.jsonl", [{"id": "d1", "text": "alpha beta"},
                                  {"id": "d2", "text": "gamma delta"}])
    _write(tmp_path / "q.jsonl", [{"id": "q1", "text": "alpha?", "answers": ["beta"],
                                   "positive_ids": ["d1"]}])
    assert main(["label", "--task", "tool", "--method", "labels", "--queries",
                 str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "l.jsonl")]) == 0
    labelled_to_flag(tmp_path / "l.jsonl", tmp_path / "f.jsonl", reward="likelihood")
    assert _read(tmp_path / "f.jsonl") == [{
        "query": "alpha?", "pos": ["alpha beta"], "neg": ["gamma delta"], "pos_scores": [1.0],
        "neg_scores": [0.0], "teacher_scores": [1.0, 0.0], "query_id": "q1",
        "answers": ["beta"], "task": "tool"}]
    # and back: the same texts and rewards under content ids, no empty context
    flag_to_labelled(tmp_path / "f.jsonl", tmp_path / "l2.jsonl")
    again = load_labelled(tmp_path / "l2.jsonl")[0]
    assert [c["text"] for c in again.candidates] == ["alpha beta", "gamma delta"]
    assert again.rank_rewards == [1.0, 0.0] and again.task == "tool"


def test_unscored_records_are_an_error_unless_labels_are_asked_for(tmp_path, capsys):
    flag_in = _write(tmp_path / "train.jsonl", PLAIN)
    out = tmp_path / "l.jsonl"
    assert main(["convert", "--from", "flag", "--to", "labelled", str(flag_in), "--task", "qa",
                 "--out", str(out)]) == 2
    assert "train.jsonl:1: no teacher scores" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", "--from", "flag", "--to", "labelled", str(flag_in), "--task", "qa",
                 "--unscored", "labels", "--out", str(out)]) == 0
    first = load_labelled(out)[0]
    assert first.rank_rewards == [1.0, 0.0, 0.0, 0.0] and first.extra["method"] == "labels"


def test_a_text_repeated_within_a_record_is_kept_once(tmp_path):
    row = {"query": "q?", "pos": ["same text"], "neg": ["same text", "other"],
           "pos_scores": [0.9], "neg_scores": [0.5, 0.1]}
    summary = flag_to_labelled(_write(tmp_path / "t.jsonl", [row]), tmp_path / "l.jsonl",
                               task="qa")
    record = load_labelled(tmp_path / "l.jsonl")[0]
    assert [c["text"] for c in record.candidates] == ["same text", "other"]
    assert record.rank_rewards == [0.9, 0.1] and summary.duplicates_dropped == 1


# ----------------------------------------------------------------------------- bad inputs

BAD = [
    ("missing query", {"pos": ["a"]}, "missing field 'query'"),
    ("empty query", {"query": " ", "pos": ["a"]}, "field 'query' must be a non-empty string"),
    ("pos not a list", {"query": "q", "pos": {"a": 1}}, "field 'pos' must be a list"),
    ("a neg that is not text", {"query": "q", "neg": ["a", 3.5]}, "field 'neg'[1] must be"),
    ("an empty pos text", {"query": "q", "pos": [""]}, "field 'pos'[0] is empty"),
    ("too few pos_scores", {"query": "q", "pos": ["a", "b"], "pos_scores": [1.0]},
     "field 'pos_scores' has 1 score(s) for 2 pos texts"),
    ("a NaN score", {"query": "q", "pos": ["a"], "neg": ["b"], "teacher_scores": [1.0, "x"]},
     "field 'teacher_scores'[1] must be a finite number"),
    ("teacher_scores of the wrong length", {"query": "q", "pos": ["a"], "neg": ["b"],
                                            "teacher_scores": [1.0]},
     "field 'teacher_scores' has 1 score(s) for 2 candidates"),
    ("pos_scores without neg_scores", {"query": "q", "pos": ["a"], "neg": ["b"],
                                       "pos_scores": [1.0]}, "'pos_scores' without"),
    ("scores that disagree", {"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [1.0],
                              "neg_scores": [0.0], "teacher_scores": [0.0, 1.0]}, "disagree"),
    ("history with pos", {"query": "q", "pos": ["a"], "history": ["b"]},
     "either 'history'"),
]


@pytest.mark.parametrize("name,row,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_record_names_the_file_line_and_field(name, row, message, tmp_path, capsys):
    good = {"query": "fine", "pos": ["x"], "neg": ["y"], "pos_scores": [1.0], "neg_scores": [0.0]}
    flag_in = _write(tmp_path / "train.jsonl", [good, row])
    out = tmp_path / "q.jsonl"
    code = main(["convert", "--from", "flag", "--to", "queries", str(flag_in), "--queries",
                 str(out), "--corpus", str(tmp_path / "c.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "train.jsonl:2: " in err and message in err, err
    assert not out.exists()


def test_other_bad_inputs_are_one_line_errors(tmp_path, capsys):
    ok = _write(tmp_path / "ok.jsonl", BGE)
    dup = _write(tmp_path / "dup.jsonl", [dict(LLM_EMBEDDER[0]), dict(LLM_EMBEDDER[0])])
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text('{"query": "q", "pos": [\n', encoding="utf-8")
    cases = [
        (["--from", "flag", "--to", "labelled", str(ok), "--out", "o"], "ok.jsonl:1: no field "
                                                                        "'task'"),
        (["--from", "flag", "--to", "labelled", str(dup), "--out", "o"], "duplicate record id"),
        (["--from", "flag", "--to", "queries", str(notjson), "--queries", "q", "--corpus", "c"],
         "bad.jsonl:1: invalid JSON"),
        (["--from", "flag", "--to", "queries", str(ok), "--queries", "q"], "needs --corpus"),
        (["--from", "queries", "--to", "labelled", str(ok), "--out", "o"], "cannot convert"),
        (["--from", "labelled", "--to", "flag", str(ok), "--out", "o"], "ok.jsonl:1: field "
                                                                        "'candidates'"),
        (["--from", "labelled", "--to", "flag", str(tmp_path / "none.jsonl"), "--out", "o"],
         "none.jsonl: labelled file not found"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (argv, err)


def test_an_unknown_record_task_names_the_line_and_the_fix(tmp_path):
    row = dict(LLM_EMBEDDER[0], task="mytask")
    with pytest.raises(ValueError, match=r"t.jsonl:1: field 'task': unknown task 'mytask'.*"
                                         r"--tasks-file"):
        flag_to_labelled(_write(tmp_path / "t.jsonl", [row]), tmp_path / "l.jsonl")


def test_read_flag_numbers_records_without_ids(tmp_path):
    assert [r.id for r in read_flag(_write(tmp_path / "t.jsonl", PLAIN))] == ["q0", "q1"]
    with pytest.raises(ValueError, match="no records"):
        read_flag(_write(tmp_path / "empty.jsonl", []))


def test_queries_to_flag_names_a_missing_corpus_id(tmp_path):
    _write(tmp_path / "c.jsonl", [{"id": "d1", "text": "alpha"}])
    _write(tmp_path / "q.jsonl", [{"id": "q1", "text": "a?", "positive_ids": ["d9"]}])
    with pytest.raises(ValueError, match=r"query 'q1': positive_ids \['d9'\] not in the corpus"):
        queries_to_flag(tmp_path / "q.jsonl", tmp_path / "c.jsonl", tmp_path / "f.jsonl")
