"""BEIR reader and full-corpus evaluation: graded nDCG@10, Recall@100, file:line errors, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest
from llm_embedder.beir import (
    evaluate_beir,
    graded_ndcg_at_k,
    graded_recall_at_k,
    load_beir,
    load_qrels,
)
from llm_embedder.cli import main
from llm_embedder.data import DataError

SPLIT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scifact_split.py"
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scifact_train.py"

# 110 filler documents sit between the topical ones and "dz", the last document: a query
# whose words "dz" lacks ranks it after 116 zero-score ties, outside the top 100.
FILLERS = [{"_id": f"f{i}", "title": "", "text": f"filler passage {i:03d}"} for i in range(110)]
CORPUS = [
    {"_id": "d1", "title": "Apple trees", "text": "They grow in orchards."},
    {"_id": "d2", "title": "", "text": "Pears are green fruit."},
    {"_id": "d3", "title": "Bananas", "text": "Bananas are yellow."},
    {"_id": "d4", "title": "Apple pie", "text": "A pie with cinnamon."},
    {"_id": "z1", "title": "", "text": "zebra stripes pattern"},
    {"_id": "z2", "title": "", "text": "zebra stripes in the savanna at dusk"},
    *FILLERS,
    {"_id": "dz", "title": "", "text": "Completely unrelated text about kites."},
]
QUERIES = [
    {"_id": "q1", "text": "apple pie"},
    {"_id": "q2", "text": "yellow bananas"},
    {"_id": "q3", "text": "a query nobody judged"},
    {"_id": "q4", "text": "judged, nothing relevant"},
    {"_id": "z1", "text": "zebra stripes"},  # shares its id with a document
]
QRELS = ("query-id\tcorpus-id\tscore\n"
         "q1\td1\t2\nq1\td4\t1\nq1\td2\t0\n"
         "q2\td3\t1\nq2\tdz\t1\n"
         "q4\td2\t0\n"
         "z1\tz2\t1\n")


def _jsonl(rows: List[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _beir_folder(root: Path, files: Optional[Dict[str, Optional[str]]] = None) -> Path:
    default = {"corpus.jsonl": _jsonl(CORPUS), "queries.jsonl": _jsonl(QUERIES),
               "qrels/test.tsv": QRELS}
    for rel, text in {**default, **(files or {})}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture()
def beir_dir(tmp_path) -> Path:
    return _beir_folder(tmp_path / "tiny")


# ----------------------------------------------------------------------------- metrics


def test_graded_ndcg_matches_a_hand_computation():
    # ranking d4 (grade 1), d1 (grade 2): DCG = 1/log2(2) + 2/log2(3); ideal 2/1 + 1/log2(3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert graded_ndcg_at_k(["d4", "d1", "d2"], {"d1": 2, "d4": 1, "d2": 0}, 10) == \
        pytest.approx(expected)
    assert graded_ndcg_at_k(["d1", "d4"], {"d1": 2, "d4": 1}, 10) == pytest.approx(1.0)
    # a relevant document below the cutoff earns nothing, but the ideal still counts it
    assert graded_ndcg_at_k(["x", "a"], {"a": 1, "b": 3}, 1) == 0.0
    assert graded_ndcg_at_k(["b", "a"], {"a": 1, "b": 3}, 1) == pytest.approx(1.0)


def test_graded_recall_counts_documents_of_grade_one_or_more():
    grades = {"a": 2, "b": 1, "c": 0}
    assert graded_recall_at_k(["a", "c", "x"], grades, 100) == 0.5
    assert graded_recall_at_k(["x", "a", "b"], grades, 2) == 0.5
    assert graded_recall_at_k(["b", "a"], grades, 100) == 1.0


def test_metrics_reject_a_query_without_relevant_documents():
    with pytest.raises(ValueError, match="relevant"):
        graded_ndcg_at_k(["a"], {"a": 0}, 10)
    with pytest.raises(ValueError, match="relevant"):
        graded_recall_at_k(["a"], {}, 100)


# ----------------------------------------------------------------------------- reader


def test_reader_keeps_grades_and_only_queries_with_a_relevant_document(beir_dir):
    data = load_beir(beir_dir, "test")
    assert [q.id for q in data.queries] == ["q1", "q2", "z1"]
    assert data.qrels["q1"] == {"d1": 2, "d4": 1, "d2": 0}
    assert data.skipped == 1  # q4: judged, grade 0 only
    assert len(data.corpus) == len(CORPUS)
    assert data.corpus[0].title == "Apple trees" and data.corpus[1].title is None
    assert [q.id for q in load_beir(beir_dir, "test", max_queries=2).queries] == ["q1", "q2"]


def test_bm25_full_corpus_metrics_match_hand_computation(beir_dir):
    results = evaluate_beir(beir_dir, systems=["bm25"], verbose=False)
    per_query = results["per_query"]["bm25"]
    # q1: d4 (apple + pie) then d1 (apple), as in the hand computation above
    assert per_query["q1"]["ndcg@10"] == pytest.approx(
        (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert per_query["q1"]["recall@100"] == 1.0
    # q2: d3 first; dz ties at zero with 116 earlier documents, so it misses the top 100
    assert per_query["q2"]["ndcg@10"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert per_query["q2"]["recall@100"] == 0.5
    # z1: document z1 is the query itself and is left out, so z2 ranks first
    assert per_query["z1"]["ndcg@10"] == pytest.approx(1.0)
    mean = results["systems"]["bm25"]
    assert mean["ndcg@10"] == pytest.approx(sum(m["ndcg@10"] for m in per_query.values()) / 3)
    assert mean["recall@100"] == pytest.approx(2.5 / 3)
    assert results["queries"] == 3 and results["documents"] == len(CORPUS)


def test_project_layout_gives_the_same_numbers_as_the_beir_layout(tmp_path, beir_dir):
    own = tmp_path / "own"
    own.mkdir()
    (own / "corpus.jsonl").write_text(_jsonl(
        [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in CORPUS]))
    (own / "queries.test.jsonl").write_text(_jsonl([
        {"id": "q2", "text": "yellow bananas", "positive_ids": ["d3", "dz"]},
        {"id": "q3", "text": "a query nobody judged", "positive_ids": []},
        {"id": "z1", "text": "zebra stripes", "positive_ids": ["z2"]}]))
    ours = evaluate_beir(own, systems=["bm25"], verbose=False)["per_query"]["bm25"]
    theirs = evaluate_beir(beir_dir, systems=["bm25"], verbose=False)["per_query"]["bm25"]
    assert sorted(ours) == ["q2", "z1"]
    assert ours == {qid: theirs[qid] for qid in ours}


def test_trained_model_equal_to_the_base_scores_the_same(beir_dir, minilm):
    results = evaluate_beir(beir_dir, model=minilm, base_model=minilm, verbose=False)
    systems = results["systems"]
    assert list(systems) == ["bm25", "base_noinstr", "base", "trained_noinstr", "trained"]
    assert results["per_query"]["trained"] == results["per_query"]["base"]
    assert results["per_query"]["trained_noinstr"] == results["per_query"]["base_noinstr"]
    assert results["per_query"]["trained"] != results["per_query"]["trained_noinstr"]
    for metrics in systems.values():
        assert 0 <= metrics["ndcg@10"] <= 1 and 0 <= metrics["recall@100"] <= 1
    # both apple documents rank in the top 10 of 117 for "apple pie", for any sentence encoder
    assert results["per_query"]["base_noinstr"]["q1"]["ndcg@10"] > 0.7


def test_key_max_length_truncates_documents(beir_dir, minilm):
    full = evaluate_beir(beir_dir, base_model=minilm, systems=["base_noinstr"], verbose=False)
    cut = evaluate_beir(beir_dir, base_model=minilm, systems=["base_noinstr"], verbose=False,
                        key_max_length=3)  # [CLS] + 1 token + [SEP]: almost nothing left
    assert cut["per_query"] != full["per_query"]
    with pytest.raises(ValueError, match="query_max_length must be a positive int"):
        evaluate_beir(beir_dir, base_model=minilm, systems=["base"], query_max_length=0,
                      verbose=False)


class Bad(NamedTuple):
    name: str
    files: Dict[str, Optional[str]]  # replaces the default file (None: left out)
    message: str  # fragment of the error


BAD = [
    Bad("missing corpus", {"corpus.jsonl": None}, "corpus.jsonl: file not found"),
    Bad("malformed queries line", {"queries.jsonl": _jsonl(QUERIES[:1]) + '{"_id": "q2",\n'},
        "queries.jsonl:2: invalid JSON"),
    Bad("corpus line without _id", {"corpus.jsonl": _jsonl(CORPUS[:2]) + '{"text": "x"}\n'},
        "corpus.jsonl:3: missing field '_id'"),
    Bad("duplicate corpus id", {"corpus.jsonl": _jsonl(CORPUS[:2] + CORPUS[:1])},
        "corpus.jsonl:3: duplicate _id 'd1' (first on line 1)"),
    Bad("qrels score not an integer", {"qrels/test.tsv": QRELS + "q1\td3\thigh\n"},
        "test.tsv:9: column 'score' must be an integer grade"),
    Bad("qrels with two columns", {"qrels/test.tsv": "query-id\tcorpus-id\tscore\nq1 d1 1\n"},
        "test.tsv:2: expected 3 tab-separated columns"),
    Bad("qrels grading a pair twice", {"qrels/test.tsv": QRELS + "q1\td1\t1\n"},
        "test.tsv:9: pair ('q1', 'd1') has grade 1 here and 2 on line 2"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_inputs_name_the_file_and_line(tmp_path, case):
    folder = _beir_folder(tmp_path / "bad", case.files)
    with pytest.raises(DataError) as err:
        load_beir(folder, "test")
    assert case.message in str(err.value)


def test_a_missing_split_names_the_splits_there(beir_dir):
    with pytest.raises(FileNotFoundError, match=r"'dev'.*\['test'\]"):
        load_beir(beir_dir, "dev")


def test_project_layout_positive_outside_the_corpus_names_the_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(_jsonl([{"id": "d1", "text": "x y"}]))
    (tmp_path / "queries.dev.jsonl").write_text(_jsonl([
        {"id": "a", "text": "x", "positive_ids": ["d1"]},
        {"id": "b", "text": "y", "positive_ids": ["d7"]}]))
    with pytest.raises(DataError, match=r"queries.dev.jsonl:2: field 'positive_ids' names"):
        load_beir(tmp_path, "dev")


@pytest.mark.parametrize("line, message", [
    ("q1\tnope\t1\n", "test.tsv:9: corpus-id 'nope' is not in the corpus"),
    ("q9\td1\t1\n", "test.tsv:9: query-id 'q9' is not in the queries file"),
])
def test_qrels_with_known_ids_name_the_line_of_an_unknown_one(tmp_path, line, message):
    path = tmp_path / "test.tsv"
    path.write_text(QRELS + line)
    with pytest.raises(DataError, match=message):
        load_qrels(path, [q["_id"] for q in QUERIES], [d["_id"] for d in CORPUS])


def test_published_inconsistencies_are_scored_as_pytrec_eval_does_and_counted(tmp_path):
    # ArguAna's test qrels name a document missing from its corpus, NFCorpus's name queries
    # missing from its queries file: a BEIR set as published has to evaluate, not fail.
    folder = _beir_folder(tmp_path / "published", {
        "qrels/test.tsv": QRELS + "q1\tnope\t1\nq9\td1\t1\nq9\td3\t2\n"})
    with pytest.warns(UserWarning) as caught:
        data = load_beir(folder, "test")
    messages = [str(w.message) for w in caught]
    assert any("1 query-id(s) are not in the queries file (e.g. ['q9'])" in m for m in messages)
    assert any("1 relevant pair(s) name a corpus-id that is not in the corpus "
               "(e.g. [('q1', 'nope')])" in m for m in messages)
    assert (data.unknown_queries, data.unknown_documents) == (1, 1)
    assert [q.id for q in data.queries] == ["q1", "q2", "z1"] and "q9" not in data.qrels
    with pytest.warns(UserWarning):
        results = evaluate_beir(folder, systems=["bm25"], verbose=False)
    assert (results["qrels_unknown_queries"], results["qrels_unknown_documents"]) == (1, 1)
    q1 = results["per_query"]["bm25"]["q1"]
    # d4 then d1 as before; the unretrievable 'nope' (grade 1) joins the ideal ranking
    assert q1["ndcg@10"] == pytest.approx(
        (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert q1["recall@100"] == pytest.approx(2 / 3)


def test_a_consistent_folder_loads_without_a_warning(beir_dir, recwarn):
    data = load_beir(beir_dir, "test")
    assert (data.unknown_queries, data.unknown_documents) == (0, 0)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_qrels_without_a_header_keep_their_first_line(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t1\nq1\td2\t2\n")
    assert load_qrels(path) == {"q1": {"d1": 1, "d2": 2}}


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_json_and_markdown(beir_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(["eval", "--beir", str(beir_dir), "--systems", "bm25", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("system"))
    assert header.split() == ["system", "nDCG@10", "Recall@100", "seconds"]
    bm25_row = next(line for line in printed.splitlines() if line.startswith("bm25"))
    saved = json.loads(out.read_text())
    assert float(bm25_row.split()[1]) == pytest.approx(saved["systems"]["bm25"]["ndcg@10"],
                                                       abs=5e-5)
    assert saved["split"] == "test" and set(saved["per_query"]["bm25"]) == {"q1", "q2", "z1"}
    assert "| bm25 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--systems", "random"], "not evaluated on BEIR data"),
    (["--systems", "trained"], "needs a model"),
    (["--systems", "trained_noinstr"], "needs a model"),
    (["--split", "dev"], "split 'dev'"),
])
def test_cli_errors_are_one_line(beir_dir, capsys, argv, message):
    assert main(["eval", "--beir", str(beir_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_qrels_line_names_file_and_line(tmp_path, capsys):
    folder = _beir_folder(tmp_path / "bad", {"qrels/test.tsv": QRELS + "q1\tnope\thigh\n"})
    assert main(["eval", "--beir", str(folder), "--systems", "bm25"]) == 2
    assert "test.tsv:9: column 'score' must be an integer grade" in capsys.readouterr().err


def test_cli_reports_qrels_outside_the_corpus_in_its_title(tmp_path, capsys):
    folder = _beir_folder(tmp_path / "published", {"qrels/test.tsv": QRELS + "q1\tnope\t1\n"})
    with pytest.warns(UserWarning, match="not in the corpus"):
        assert main(["eval", "--beir", str(folder), "--systems", "bm25"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title.endswith("1 relevant qrels pair(s) outside the corpus")


# ----------------------------------------------------------------------------- real data


def test_bm25_on_scifact_train_claims_is_sane(shared_data, tmp_path):
    out = tmp_path / "scifact.json"
    assert main(["eval", "--beir", str(shared_data / "qa" / "scifact"), "--split", "train",
                 "--systems", "bm25", "--max-queries", "50", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["queries"] == 50 and saved["documents"] == 5183
    assert saved["systems"]["bm25"]["ndcg@10"] > 0.5
    assert saved["systems"]["bm25"]["recall@100"] > 0.8


# ----------------------------------------------------------------------------- split script


@pytest.fixture(scope="module")
def split_script():
    spec = importlib.util.spec_from_file_location("scifact_split", SPLIT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_is_deterministic_disjoint_and_complete(tmp_path, split_script):
    source = tmp_path / "src"
    source.mkdir()
    (source / "corpus.jsonl").write_text(_jsonl([{"id": "d1", "text": "x"}]))
    claims = [{"id": f"c{i}", "text": f"claim {i}", "positive_ids": ["d1"]} for i in range(200)]
    (source / "queries.train.jsonl").write_text(_jsonl(claims))
    for out in ("a", "b"):
        assert split_script.main([str(source), str(tmp_path / out)]) == 0
    def ids(out: str, split: str) -> List[str]:
        text = (tmp_path / out / f"queries.{split}.jsonl").read_text()
        return [json.loads(line)["id"] for line in text.splitlines()]

    dev, train = ids("a", "dev"), ids("a", "train")
    assert dev == ids("b", "dev") and train == ids("b", "train")
    assert sorted(dev + train) == sorted(c["id"] for c in claims) and not set(dev) & set(train)
    assert 20 <= len(dev) <= 60  # 20 % of 200 by hash
    assert load_beir(tmp_path / "a", "dev").queries[0].id == dev[0]


def test_split_refuses_to_write_into_the_package(tmp_path, split_script):
    package = Path(__file__).resolve().parents[1] / "python" / "llm_embedder" / "scifact"
    with pytest.raises(SystemExit):
        split_script.main([str(tmp_path), str(package)])
    assert not package.exists()


# ----------------------------------------------------------------------------- train script


@pytest.fixture()
def train_script():
    from llm_embedder.tasks import TASKS, unregister_task

    spec = importlib.util.spec_from_file_location("scifact_train", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    if module.PLAIN_TASK in TASKS:  # the registry is the process's: leave it as found
        unregister_task(module.PLAIN_TASK)


def test_no_instructions_trains_a_copy_of_qa_with_empty_instructions(tmp_path, train_script):
    from llm_embedder.tasks import TASKS
    from llm_embedder.train import TrainConfig

    record = {"query_id": "c1", "task": "qa", "query": "a claim", "answer": "",
              "candidates": [{"id": "d1", "text": "an abstract"}], "likelihood_rewards": [1.0]}
    labels = tmp_path / "qa.labels.jsonl"
    labels.write_text(_jsonl([record, {**record, "query_id": "c2"}]))
    plain = train_script.plain_labels(labels, tmp_path / "plain.jsonl")
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["qa_noinstr"] * 2
    assert [{**r, "task": "qa"} for r in rows] == [record, {**record, "query_id": "c2"}]
    task = TASKS["qa_noinstr"]
    assert task.query_instruction == task.key_instruction == ""
    assert TASKS["qa"].query_instruction  # qa itself, and so the eval's systems, unchanged
    args = train_script.argparse.Namespace(
        model=None, loss="graded", epochs=1.0, batch_size=4, group_size=2, lr=3e-5,
        query_max_length=64, key_max_length=128, seed=0, save_steps=10, no_instructions=True,
        name=None, score_temperature=None, llm_labels=None, reward=None,
        human_positives=None)
    config = train_script.train_config(args, plain, tmp_path / "run")
    assert list(config["tasks"]) == ["qa_noinstr"]
    assert "reward" not in config and "human_positives" not in config  # TrainConfig's
    chosen = train_script.argparse.Namespace(
        **{**vars(args), "reward": "likelihood", "human_positives": "anchor"})
    chosen_config = train_script.train_config(chosen, plain, tmp_path / "run")
    assert (chosen_config["reward"], chosen_config["human_positives"]) == ("likelihood", "anchor")
    TrainConfig.load(chosen_config)
    assert train_script._run_name(chosen).endswith("-rlikelihood-hpanchor-noinstr")
    TrainConfig.load(config)  # a valid config: the task is registered
    assert train_script._run_name(args).endswith("-noinstr")
    run = tmp_path / "out" / "runs" / "plain"  # the table reads a run of the copy too
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "train.json").write_text(json.dumps({"train_minutes": 2.0}))
    (run / "eval.json").write_text(json.dumps(
        {"systems": {"trained_noinstr": {"ndcg@10": 0.69, "recall@100": 0.94}}}))
    markdown, table_rows = train_script.results_table(tmp_path / "out")
    assert table_rows == [{"name": "plain", "instructions": False, "ndcg@10": 0.69,
                           "recall@100": 0.94, "train_minutes": 2.0, "labels": "plain.jsonl"}]
    labels.write_text(_jsonl([{**record, "task": "chat"}]))
    os.utime(labels, (plain.stat().st_mtime + 5, plain.stat().st_mtime + 5))
    with pytest.raises(ValueError, match=r"qa.labels.jsonl:1: task 'chat', expected 'qa'"):
        train_script.plain_labels(labels, plain)


# ----------------------------------------------------------------------------- SciFact LLM labels

SCIFACT_LABELS = Path(__file__).resolve().parents[1] / "labels" / "scifact" / "qa.jsonl"
#: what the committed file may hold: ids and numbers, no SciFact text (CC BY-NC) and no samples
_COMPACT_FIELDS = {"query_id", "task", "candidate_ids", "positive_ids", "likelihood_rewards",
                   "rank_rewards", "sample_likelihoods", "sample_contexts", "llm", "method"}


def test_committed_scifact_labels_hold_ids_and_numbers_only():
    rows = [json.loads(line) for line in SCIFACT_LABELS.read_text().splitlines()]
    assert len(rows) == len({r["query_id"] for r in rows}) == 407
    for row in rows:
        assert set(row) <= _COMPACT_FIELDS, row["query_id"]
        n = len(row["candidate_ids"])
        assert set(row["positive_ids"]) <= set(row["candidate_ids"])
        for name in ("likelihood_rewards", "rank_rewards"):
            assert len(row[name]) == n and all(math.isfinite(v) for v in row[name])
        assert len(set(row["rank_rewards"])) > 1  # the LLM told candidates apart
        assert set(row["sample_contexts"]) <= set(row["candidate_ids"]) | {""}


def test_committed_scifact_labels_expand_from_the_train_split_only(shared_data, tmp_path,
                                                                   split_script):
    from llm_embedder.label import expand_labelled

    split = tmp_path / "split"
    assert split_script.main([str(shared_data / "qa" / "scifact"), str(split)]) == 0
    dev = {q.id for q in load_beir(split, "dev").queries}
    rows = [json.loads(line) for line in SCIFACT_LABELS.read_text().splitlines()]
    assert not {r["query_id"] for r in rows} & dev  # no dev claim: the measurement stays clean
    out = tmp_path / "qa.full.jsonl"
    assert expand_labelled(SCIFACT_LABELS, split / "queries.train.jsonl",
                           split / "corpus.jsonl", out) == 407
    first = json.loads(out.read_text().splitlines()[0])
    assert first["answer"] and all(c["text"] for c in first["candidates"] if c["id"])
