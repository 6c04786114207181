import json
import math

import numpy as np
import pytest
from llm_embedder.data import Passage, Query
from llm_embedder.evaluate import (
    RETRIEVAL_METRICS,
    EvalConfig,
    TaskData,
    average_primary,
    downstream_answers,
    downstream_choice,
    downstream_metrics,
    evaluate,
    exact_match,
    first_line,
    load_task_data,
    main_eval,
    mrr_at_k,
    ndcg_at_k,
    normalize_answer,
    primary_metric,
    primary_table,
    rank_dense,
    rank_random,
    recall_at_k,
    results_markdown,
    retrieval_metrics,
)
from llm_embedder.tasks import get_task

# ----------------------------------------------------------------------------- metrics


def test_recall_counts_the_share_of_positives_in_the_top_k():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"b"}, 1) == 0.0
    assert recall_at_k(ranked, {"b"}, 2) == 1.0
    assert recall_at_k(ranked, {"a", "d", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"a", "d", "z"}, 10) == pytest.approx(2 / 3)


def test_mrr_is_the_reciprocal_rank_of_the_first_positive_within_the_cutoff():
    ranked = [str(i) for i in range(20)]
    assert mrr_at_k(ranked, {"0"}) == 1.0
    assert mrr_at_k(ranked, {"3", "1"}) == 0.5
    assert mrr_at_k(ranked, {"9"}) == 0.1
    assert mrr_at_k(ranked, {"10"}) == 0.0  # rank 11 is past MRR@10


def test_ndcg_matches_hand_computed_values():
    # one positive at rank 3: 1/log2(4) = 0.5, ideal 1
    assert ndcg_at_k(["a", "b", "c"], {"c"}, 5) == pytest.approx(0.5)
    # positives at ranks 1 and 3 of two: (1 + 0.5) / (1 + 1/log2(3))
    assert ndcg_at_k(["a", "b", "c"], {"a", "c"}, 5) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # three positives but k = 2: the ideal counts only two
    assert ndcg_at_k(["x", "y"], {"x", "y", "z"}, 2) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "b", "c", "d", "e", "f"], {"f"}, 5) == 0.0


def test_retrieval_metrics_average_over_queries_and_skip_those_without_positives():
    rankings = [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    positives = [{"a"}, {"a"}, set()]
    m = retrieval_metrics(rankings, positives)
    assert set(m) == set(RETRIEVAL_METRICS)
    assert m["recall@1"] == 0.5
    assert m["recall@5"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 2)
    assert retrieval_metrics([["a"]], [set()]) == {}


def test_metric_functions_reject_queries_without_positives_and_bad_k():
    with pytest.raises(ValueError, match="without positives"):
        recall_at_k(["a"], [], 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(["a"], ["a"], 0)
    with pytest.raises(ValueError, match="2 rankings for 1"):
        retrieval_metrics([["a"], ["b"]], [{"a"}])


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert exact_match("the Broncos.", ["Denver", "Broncos"]) == 1.0
    assert exact_match("Broncos won", ["Broncos"]) == 0.0
    assert first_line("\n  Santa Clara \nQuestion: next") == "Santa Clara"


def test_average_uses_each_tasks_primary_metric_and_only_complete_systems():
    results = {
        "qa": {"bm25": {"ndcg@10": 0.8, "recall@5": 0.99}, "trained": {"ndcg@10": 0.9}},
        "tool": {"bm25": {"ndcg@5": 0.2}, "trained": {"ndcg@5": 0.4}},
        "icl": {"none": {"accuracy": 0.5}, "trained": {"accuracy": 0.7}},
    }
    avg = average_primary(results)
    assert avg["trained"]["primary"] == pytest.approx((0.9 + 0.4 + 0.7) / 3)
    assert "bm25" not in avg and "none" not in avg  # missing a task: no average
    assert primary_metric("qa") == "ndcg@10" and primary_metric("gone") is None


def test_tables_render_every_system_and_the_average():
    results = {"tool": {"bm25": {"ndcg@5": 0.25}, "trained": {"ndcg@5": 0.5}}}
    results["average"] = average_primary(results)
    text = primary_table(results)
    assert "tool (ndcg@5)" in text and "0.250" in text and "average" in text
    md = results_markdown(results)
    assert md.startswith("# Evaluation") and "| tool (ndcg@5) | 0.250 | 0.500 |" in md


# ----------------------------------------------------------------------------- rankings


def _toy_data():
    corpus = [Passage(id=f"g{g}-{i}", text=f"turn {i} of {g}", group=f"g{g}")
              for g in range(2) for i in range(5)]
    queries = [Query(id="q0", text="x", answers=["a"], positive_ids=["g1-2"], group="g1"),
               Query(id="q1", text="y", answers=["b"], positive_ids=["g0-0"], group="g0")]
    return TaskData.build("chat", corpus, queries)


class _FakeEncoder:
    """Embeds text 'turn i of gG' on axis i; queries on the axis named in a lookup."""

    def __init__(self, query_axes):
        self.query_axes = query_axes
        self.calls = []

    def encode(self, texts, task, side, batch_size, max_length, show_progress_bar=False):
        self.calls.append((task, side))
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for r, text in enumerate(texts):
            axis = int(text.split()[1]) if text.startswith("turn") else self.query_axes[text]
            out[r, axis] = 1.0
        return out


def test_group_restricts_every_ranking_to_the_querys_conversation():
    data = _toy_data()
    assert [len(p) for p in data.pools] == [5, 5]
    for ranking in rank_random(data, 10, seed=3):
        groups = {data.corpus[j].group for j in ranking}
        assert len(groups) == 1
    assert {data.corpus[j].group for j in rank_random(data, 10)[0]} == {"g1"}
    encoder = _FakeEncoder({"x": 2, "y": 0})
    ranked = rank_dense(data, encoder, 3)
    assert [data.corpus[j].id for j in ranked[0]][0] == "g1-2"  # not g0-2, same axis
    assert [data.corpus[j].id for j in ranked[1]][0] == "g0-0"
    assert all(data.corpus[j].group == "g1" for j in ranked[0])


def test_dense_ranking_passes_instructions_or_none_to_the_encoder():
    data = _toy_data()
    encoder = _FakeEncoder({"x": 2, "y": 0})
    rank_dense(data, encoder, 3, instructions=True)
    rank_dense(data, encoder, 3, instructions=False)
    assert encoder.calls == [("chat", "key"), ("chat", "query"), ("chat", None), ("chat", None)]


def test_random_ranking_is_seeded():
    data = _toy_data()
    a, b, c = rank_random(data, 5, 0), rank_random(data, 5, 0), rank_random(data, 5, 1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


# ----------------------------------------------------------------------------- downstream


class FakeLLM:
    """Scores an output by how often its words occur in the prompt: context that holds the
    answer makes it likely, as with a real LLM reading retrieved knowledge."""

    name = "fake"

    def __init__(self):
        self.scored = 0

    def _score(self, prompt, output):
        words = output.split()
        return sum(prompt.count(w) > 0 for w in words) / max(len(words), 1) - 1.0

    def score(self, prompts, outputs):
        self.scored += len(prompts)
        return np.array([self._score(p, o) for p, o in zip(prompts, outputs)], np.float32)

    def score_grouped(self, prompts, outputs_per_prompt):
        return [self.score([p] * len(outs), outs) for p, outs in zip(prompts, outputs_per_prompt)]

    def generate(self, prompts, max_new_tokens=16):
        # "answers" with the last word of the prompt's knowledge, if there is knowledge
        out = []
        for p in prompts:
            if p.startswith("Knowledge: "):
                out.append(" " + p.split("\n")[0].split()[-1] + "\nmore")
            else:
                out.append(" no idea")
        return out


def test_downstream_answers_rewards_the_system_that_retrieves_the_answer():
    corpus = [Passage(id="p0", text="the capital is Paris"),
              Passage(id="p1", text="bananas are yellow")]
    queries = [Query(id="q", text="capital?", answers=["Paris"], positive_ids=["p0"])]
    data = TaskData.build("qa", corpus, queries)
    rankings = {"good": [np.array([0, 1])], "bad": [np.array([1, 0])]}
    llm = FakeLLM()
    out = downstream_answers(data, rankings, llm, k=1, query_ids=[0])
    assert out["good"]["answer_ll"] == 0.0 and out["bad"]["answer_ll"] == -1.0
    assert out["none"]["answer_ll"] == -1.0
    assert out["good"]["em"] == 1.0 and out["bad"]["em"] == 0.0 and out["none"]["em"] == 0.0
    assert out["none"]["answer_ppl"] == pytest.approx(math.e)
    # "bad" and "none" differ in prompt; identical prompts would be scored once
    assert llm.scored == 3


def test_no_llm_query_gives_no_downstream_metric_and_no_warning():
    import warnings

    corpus = [Passage(id="p0", text="the capital is Paris")]
    queries = [Query(id="q", text="capital?", answers=["Paris"], positive_ids=["p0"])]
    data = TaskData.build("qa", corpus, queries)
    llm = FakeLLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "mean of empty slice" would raise here
        out = downstream_metrics(get_task("qa"), data, {"a": [np.array([0])]}, llm, k=1,
                                 query_ids=[])
    assert out == {} and llm.scored == 0


def test_downstream_answers_scores_each_distinct_prompt_once():
    corpus = [Passage(id="p0", text="the capital is Paris")]
    queries = [Query(id="q", text="capital?", answers=["Paris"], positive_ids=["p0"])]
    data = TaskData.build("qa", corpus, queries)
    llm = FakeLLM()
    downstream_answers(data, {"a": [np.array([0])], "b": [np.array([0])]}, llm, k=3,
                       query_ids=[0], exact=False)
    assert llm.scored == 2  # a == b, plus none


def test_icl_accuracy_picks_the_most_likely_option_per_system():
    corpus = [Passage(id="d0", text="great film Positive", subset="sst2"),
              Passage(id="d1", text="awful film Negative", subset="sst2")]
    queries = [Query(id="q", text="a film", answers=["Positive"],
                     options=["Negative", "Positive"], subset="sst2")]
    data = TaskData.build("icl", corpus, queries)
    rankings = {"good": [np.array([0, 1])], "bad": [np.array([1, 0])]}
    out = downstream_choice(data, rankings, FakeLLM(), k=1, query_ids=[0])
    assert out["good"]["accuracy"] == 1.0 and out["bad"]["accuracy"] == 0.0
    assert set(out) == {"none", "good", "bad"}  # no system the caller did not ask for


# ----------------------------------------------------------------------------- real data


def test_bundled_slices_load_with_pools_for_every_query():
    for task in ("qa", "tool", "chat", "icl"):
        data = load_task_data(task)
        assert len(data.queries) >= 150 and len(data.pools) == len(data.queries)
    chat = load_task_data("chat")
    assert {q.group for q in chat.queries} == {"locomo48", "locomo49"}
    assert all(len(p) < len(chat.corpus) for p in chat.pools)


def test_load_task_data_reads_a_folder_in_the_shared_layout(tmp_path):
    folder = tmp_path / "qa" / "xquad"
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"id": "p", "text": "t"}) + "\n")
    (folder / "queries.test.jsonl").write_text(
        json.dumps({"id": "q", "text": "x", "answers": ["a"], "positive_ids": ["missing"]}) + "\n")
    with pytest.raises(ValueError, match="positive ids not in"):
        load_task_data("qa", tmp_path)


def _tiny_layout(root, shared_data, tasks=("qa", "chat")):
    """A few real test queries per task and a corpus cut to their pools' first entries plus
    their positives, laid out like the shared data."""
    from llm_embedder.data import BUNDLED_TASK_DIRS, candidate_pool, iter_jsonl

    for task in tasks:
        src = shared_data / BUNDLED_TASK_DIRS[task]
        dst = root / BUNDLED_TASK_DIRS[task]
        dst.mkdir(parents=True)
        queries = [obj for _, obj in iter_jsonl(src / "queries.test.jsonl")][:6]
        corpus_rows = [obj for _, obj in iter_jsonl(src / "corpus.jsonl")]
        corpus = load_task_data(task, shared_data).corpus
        keep = set()
        for q in queries:
            query = Query(id=q["id"], text=q["text"], group=q.get("group"))
            pool = candidate_pool(query, corpus)
            keep.update(corpus[j].id for j in pool[:15])
            keep.update(q["positive_ids"])
        (dst / "corpus.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in corpus_rows if r["id"] in keep))
        (dst / "queries.test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return root


def test_evaluate_ranks_real_slices_with_bm25_and_the_base_encoder(tmp_path, shared_data,
                                                                   minilm):
    root = _tiny_layout(tmp_path, shared_data)
    results = evaluate(minilm, tasks=["qa", "chat"], data=root, base_model=minilm,
                       downstream=False, verbose=False)
    assert set(results) == {"qa", "chat", "average"}
    for task in ("qa", "chat"):
        assert set(results[task]) == {"random", "bm25", "base", "base_noinstr", "trained"}
        for metrics in results[task].values():
            assert set(metrics) == set(RETRIEVAL_METRICS)
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
        # the same model as "trained" and "base" must give the same numbers
        assert results[task]["trained"] == results[task]["base"]
    # real retrieval is far above chance on knowledge questions
    assert results["qa"]["bm25"]["ndcg@10"] > results["qa"]["random"]["ndcg@10"] + 0.3
    assert results["qa"]["base_noinstr"]["recall@10"] > 0.8
    assert results["average"]["bm25"]["primary"] == pytest.approx(
        (results["qa"]["bm25"]["ndcg@10"] + results["chat"]["bm25"]["recall@5"]) / 2)


def test_an_llm_loader_is_called_after_retrieval_once_the_encoders_are_freed(
        tmp_path, shared_data, monkeypatch):
    import gc
    import weakref

    import llm_embedder.evaluate as evaluate_module

    root = _tiny_layout(tmp_path, shared_data)
    loaded = []
    real_load = evaluate_module._load_embedder

    def tracked_load(model, device):
        embedder = real_load(model, device)
        loaded.append(weakref.ref(embedder))
        return embedder

    monkeypatch.setattr(evaluate_module, "_load_embedder", tracked_load)
    calls = []

    def load_llm():
        gc.collect()
        calls.append([ref() is None for ref in loaded])
        return FakeLLM()

    results = evaluate(None, tasks=["qa", "chat"], data=root, systems=["bm25", "base"],
                       llm=load_llm, max_llm_queries=2, exact_match_answers=False,
                       verbose=False)
    assert calls == [[True]]  # once, and the encoder it loaded was gone by then
    for task in ("qa", "chat"):
        assert set(results[task]["base"]) > set(RETRIEVAL_METRICS)  # downstream ran too
        assert "answer_ll" in results[task]["none"]


def test_main_eval_writes_json_and_markdown(tmp_path, shared_data, capsys):
    root = _tiny_layout(tmp_path / "data", shared_data, tasks=("qa",))
    out = tmp_path / "eval.json"
    assert main_eval(tasks=["qa"], data=str(root), downstream=False, out=str(out),
                     systems=["random", "bm25"]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["qa"]) == {"random", "bm25"}
    assert "| qa (ndcg@10) |" in out.with_suffix(".md").read_text()
    assert "qa (ndcg@10)" in capsys.readouterr().out


def test_eval_out_named_md_gets_markdown_and_the_json_beside_it(tmp_path, shared_data):
    # Regression (issue 13 item 2): `eval --out results.md` wrote JSON into results.md.
    root = _tiny_layout(tmp_path / "data", shared_data, tasks=("qa",))
    out = tmp_path / "results.md"
    main_eval(tasks=["qa"], data=str(root), downstream=False, out=str(out),
              systems=["random"], verbose=False)
    assert out.read_text().startswith("# Evaluation") and "| qa (ndcg@10) |" in out.read_text()
    assert set(json.loads((tmp_path / "results.json").read_text())["qa"]) == {"random"}


@pytest.mark.parametrize("values,key", [
    ({"k": 0}, "'k'"),
    ({"k": {"qa": 0}}, "'k'"),
    ({"systems": ["bm42"]}, "'systems'"),
    ({"downstream_systems": ["bm42"]}, "'downstream_systems'"),
    ({"batch_size": "32"}, "'batch_size'"),
    ({"tasks": ["nope"]}, "'tasks'"),
    ({"max_llm_queries": -1}, "'max_llm_queries'"),
    ({"downstream": "yes"}, "'downstream'"),
    ({"learning_rate": 1}, "learning_rate"),
])
def test_eval_config_names_the_bad_key(values, key):
    from llm_embedder.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        EvalConfig.load(values)


def test_context_size_comes_from_the_task_unless_k_overrides_it():
    from llm_embedder.tasks import get_task

    icl, qa = get_task("icl"), get_task("qa")
    assert EvalConfig().context_size(icl) == 4 and EvalConfig().context_size(qa) == 3
    assert EvalConfig(k=5).context_size(icl) == 5
    assert EvalConfig(k={"qa": 7}).context_size(qa) == 7
    assert EvalConfig(k={"qa": 7}).context_size(icl) == 4
    assert EvalConfig(max_llm_queries={"qa": 2}).llm_budget(icl) is None


def test_evaluate_reads_a_config_file_and_keywords_win_over_it(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("tasks: [tool]\nsystems: [random]\ndownstream: false\n"
                      "max_queries: 5\nverbose: false\n")
    results = evaluate(None, config=str(config))
    assert set(results) == {"tool", "average"} and set(results["tool"]) == {"random"}
    again = evaluate(None, config=str(config), systems=["bm25"])
    assert set(again["tool"]) == {"bm25"}


def test_evaluate_rejects_unknown_systems_and_a_missing_trained_model():
    with pytest.raises(ValueError, match="unknown systems"):
        evaluate(None, tasks=["qa"], systems=["bm42"], downstream=False)
    with pytest.raises(ValueError, match="needs model_or_path"):
        evaluate(None, tasks=["qa"], systems=["trained"], downstream=False)
    with pytest.raises(ValueError, match="'trained_noinstr' needs model_or_path"):
        evaluate(None, tasks=["qa"], systems=["bm25", "trained_noinstr"], downstream=False)


def test_trained_noinstr_is_opt_in_and_equals_base_noinstr_for_the_same_model(
        tmp_path, shared_data, minilm):
    root = _tiny_layout(tmp_path, shared_data)
    results = evaluate(minilm, tasks=["qa", "chat"], data=root, base_model=minilm,
                       downstream=False, verbose=False,
                       systems=["base", "base_noinstr", "trained_noinstr"])
    for task in ("qa", "chat"):
        assert set(results[task]) == {"base", "base_noinstr", "trained_noinstr"}
        assert results[task]["trained_noinstr"] == results[task]["base_noinstr"]
    assert results["chat"]["trained_noinstr"] != results["chat"]["base"]  # instructions count


@pytest.mark.slow
def test_real_llm_answers_better_with_the_gold_passage_than_without():
    from llm_embedder.llm import FrozenLLM

    data = load_task_data("qa")
    i = next(i for i, q in enumerate(data.queries) if len(q.answers[0]) < 30)
    gold = next(j for j, p in enumerate(data.corpus) if p.id in data.queries[i].positive_ids)
    rankings = {"gold": [None] * len(data.queries)}
    rankings["gold"][i] = np.array([gold])
    out = downstream_answers(data, rankings, FrozenLLM.load(device="cpu"), k=1, query_ids=[i],
                             exact=True, max_new_tokens=12)
    assert out["gold"]["answer_ll"] > out["none"]["answer_ll"]
    assert out["gold"]["answer_ppl"] < out["none"]["answer_ppl"]
    assert out["gold"]["em"] in (0.0, 1.0)
