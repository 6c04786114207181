import json
from pathlib import Path

import numpy as np
import pytest
from llm_embedder.config import ConfigError
from llm_embedder.data import Passage, Query, bundled_task_files, load_corpus, load_queries
from llm_embedder.quickstart import (
    QuickstartConfig,
    _claim_folder,
    _pick_training_queries,
    _save_vectors,
    _shrink_pools,
    _train,
    estimate_label_tokens,
    label_training_data,
    plot_results,
    run_quickstart,
    train_config,
    verdict,
)
from llm_embedder.tasks import get_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fast


def test_llm_budget_picks_queries_across_subtasks_and_labels_the_rest_with_positives():
    files = bundled_task_files("chat")
    corpus, train = load_corpus(files["corpus"]), load_queries(files["train"])
    cfg = QuickstartConfig(label_token_budget={"chat": 20_000})
    llm, rest, tokens = _pick_training_queries("chat", train, corpus, cfg, seed=0)
    assert 0 < len(llm) < len(train) and tokens <= 20_000
    assert len({q.group for q in llm}) == 3  # every training conversation is represented
    assert not {q.id for q in llm} & {q.id for q in rest}
    assert len(llm) + len(rest) == len(train)  # every chat query has a positive
    again, _, _ = _pick_training_queries("chat", train, corpus, cfg, seed=0)
    assert [q.id for q in again] == [q.id for q in llm]  # deterministic


def test_icl_has_no_label_only_queries_and_a_zero_budget_labels_nothing_with_the_llm():
    files = bundled_task_files("icl")
    corpus, train = load_corpus(files["corpus"]), load_queries(files["train"])
    cfg = QuickstartConfig(label_token_budget={"icl": 0})
    llm, rest, tokens = _pick_training_queries("icl", train, corpus, cfg, seed=0)
    assert llm == [] and rest == [] and tokens == 0


def test_label_token_estimate_grows_with_candidates_samples_and_text():
    q = Query(id="q", text="Who won?", answers=["Denver"], positive_ids=["p"])
    base = estimate_label_tokens("qa", q, 600.0, 7, 4, 6.0)
    assert estimate_label_tokens("qa", q, 600.0, 3, 4, 6.0) < base
    assert estimate_label_tokens("qa", q, 600.0, 7, 8, 6.0) > base
    assert estimate_label_tokens("qa", q, 900.0, 7, 4, 6.0) > base


def test_shrunk_pools_keep_every_positive_and_stay_within_groups():
    corpus = [Passage(id=f"{g}-{i}", text="t", group=g) for g in ("a", "b") for i in range(30)]
    queries = [Query(id="q", text="x", positive_ids=["b-29"], group="b")]
    small = _shrink_pools(corpus, queries, 5)
    assert {p.id for p in small} == {"b-0", "b-1", "b-2", "b-3", "b-4", "b-29"}


def test_training_config_uses_graded_distillation_and_kl_for_chat(tmp_path):
    config = train_config(tmp_path, QuickstartConfig.default(), seed=3, device="cpu")
    losses = {task: spec["loss"] for task, spec in config["tasks"].items()}
    assert losses == {"qa": "graded", "tool": "graded", "chat": "kl", "icl": "graded"}
    assert config["reward"] == QuickstartConfig().reward and config["batching"] == "homogeneous"
    assert config["self_paced"] is True and config["seed"] == 3 and config["resume"] is True
    for reward in ("rank", "likelihood"):  # the config's choice, passed through
        chosen = train_config(tmp_path, QuickstartConfig(reward=reward), seed=0, device="cpu")
        assert chosen["reward"] == reward
    assert config["human_positives"] == QuickstartConfig().human_positives
    chosen = train_config(tmp_path, QuickstartConfig(human_positives="agree"), seed=0,
                          device="cpu")
    assert chosen["human_positives"] == "agree"


def test_verdict_compares_trained_with_the_better_base_encoder():
    results = {
        "tool": {"base": {"ndcg@5": 0.10}, "base_noinstr": {"ndcg@5": 0.12},
                 "bm25": {"ndcg@5": 0.14}, "trained": {"ndcg@5": 0.30}},
        "qa": {"base": {"ndcg@10": 0.86}, "base_noinstr": {"ndcg@10": 0.94},
               "trained": {"ndcg@10": 0.93}},
    }
    v = verdict(results)
    assert v["tool"]["best_base"] == "base_noinstr" and v["tool"]["beats_base"]
    assert v["tool"]["delta"] == pytest.approx(0.18) and v["tool"]["beats_bm25"]
    assert v["qa"]["best_base"] == "base_noinstr" and not v["qa"]["beats_base"]


def test_plot_writes_a_png(tmp_path):
    results = {"tool": {"bm25": {"ndcg@5": 0.2}, "trained": {"ndcg@5": 0.3}},
               "average": {"bm25": {"primary": 0.2}, "trained": {"primary": 0.3}}}
    plot_results(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_only_one_configuration_at_a_time(tmp_path):
    with pytest.raises(ValueError, match="at most one"):
        run_quickstart(str(tmp_path), full=True, tiny=True)


def test_a_config_saved_by_an_earlier_version_still_resumes(tmp_path):
    # config.json of a run started before `temperature` became `score_temperature` and before
    # `index_task` existed: the same run, so it must resume rather than be refused.
    cfg = QuickstartConfig.default()
    old = json.loads(json.dumps({"config": cfg.to_dict(), "seed": 0}))
    old["config"]["temperature"] = old["config"].pop("score_temperature")
    del old["config"]["index_task"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    _claim_folder(tmp_path, cfg, 0)
    with pytest.raises(ValueError, match="another configuration"):
        _claim_folder(tmp_path, QuickstartConfig(score_temperature=0.01), 0)
    assert QuickstartConfig.from_dict(old["config"]) == cfg


@pytest.mark.parametrize("values,key", [
    ({"tasks": ["qa", "nope"]}, "'tasks'"),
    ({"max_steps": 0}, "'max_steps'"),
    ({"lr": "1e-4"}, "'lr'"),
    ({"temperature_typo": 1.0}, "temperature_typo"),
    ({"reward": "nope"}, "'reward'.*registered reward"),
    ({"human_positives": "trust"}, "'human_positives'.*'anchor'"),
])
def test_quickstart_config_names_the_bad_key(values, key):
    with pytest.raises(ConfigError, match=key):
        QuickstartConfig.load(values)


def test_a_run_without_its_index_task_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="index_task"):
        run_quickstart(str(tmp_path / "qs"), config=QuickstartConfig(tasks=("tool",)))
    assert not (tmp_path / "qs").exists()


def test_report_names_each_tasks_loss_from_the_task_table():
    from llm_embedder.quickstart import _budget_text, _losses_text

    assert _losses_text(["qa", "tool", "chat", "icl"]) == \
        "graded distillation (qa, tool, icl), KL (chat)"
    plan = {t: {"test_queries": 50} for t in ("qa", "tool", "chat", "icl")}
    assert _budget_text(QuickstartConfig.default(), plan) == \
        "qa 8 of 50, chat 24 of 50, icl 50 of 50"


@pytest.mark.parametrize("make, exact, icl", [(QuickstartConfig.default, False, 100),
                                               (QuickstartConfig.full, True, None)])
def test_evaluate_stage_passes_its_llm_budget_and_exact_match_choice(tmp_path, monkeypatch,
                                                                     make, exact, icl):
    import llm_embedder.quickstart as quickstart

    seen = {}

    def fake_evaluate(model, *, config, llm, keep_vectors):
        seen["config"], seen["llm"] = config, llm
        return {"average": {}}

    monkeypatch.setattr(quickstart, "evaluate", fake_evaluate)
    monkeypatch.setattr(quickstart, "_write_card", lambda *args: None)
    cfg = make()
    plan = {t: {"corpus": "c.jsonl", "test": "t.jsonl"} for t in cfg.tasks}
    loader = lambda: None  # noqa: E731
    quickstart._evaluate(tmp_path, cfg, plan, loader, 0, "cpu")
    config = seen["config"]
    assert config.exact_match_answers is exact
    assert config.llm_budget(get_task("icl")) == icl  # full: every test query
    assert seen["llm"] is loader  # loaded by evaluate once its encoders are freed
    assert json.loads((tmp_path / "results.json").read_text()) == {"average": {}}


@pytest.fixture()
def fsynced(monkeypatch):
    """Every path llm_embedder.io fsyncs (files, folders, trees), in order."""
    from llm_embedder import io

    seen = []
    for name in ("fsync_path", "fsync_tree"):
        real = getattr(io, name)
        monkeypatch.setattr(io, name, lambda path, _real=real: (seen.append(Path(path)),
                                                                 _real(path))[1])
    return seen


def test_the_model_copy_is_built_aside_and_fsynced_before_it_appears(tmp_path, monkeypatch,
                                                                     fsynced):
    # Regression (issue 13 item 6): the model was copied with shutil, never fsynced.
    import llm_embedder.train as train_module

    final = tmp_path / "train" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    monkeypatch.setattr(train_module, "train", lambda config: final)
    out = tmp_path / "qs"
    (out / "model").mkdir(parents=True)
    (out / "model" / "stale.bin").write_text("from an older run")
    assert _train(out, QuickstartConfig.tiny(), 0, "cpu") == out / "model"
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json"]
    assert any(p.parent == out and p.name.startswith(".model.") for p in fsynced)
    assert [p.name for p in out.iterdir()] == ["model"]  # no temporary left behind


def test_vectors_and_the_chart_are_written_atomically(tmp_path, fsynced):
    # Regression (issue 13 item 6): both were renamed into place without fsync.
    path = tmp_path / "vectors" / "qa.npz"
    _save_vectors(path, ["a", "b"], np.eye(2, dtype=np.float32))
    with np.load(path) as data:
        assert list(data["ids"]) == ["a", "b"]
    results = {"tool": {"bm25": {"ndcg@5": 0.2}}, "average": {"bm25": {"primary": 0.2}}}
    plot_results(results, tmp_path / "r.png")
    names = [p.name for p in fsynced]
    assert any(n.startswith(".qa.npz.") for n in names)
    assert any(n.startswith(".r.png.") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png", "vectors"]
    assert [p.name for p in path.parent.iterdir()] == ["qa.npz"]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_quickstart_runs_end_to_end_and_resumes(tmp_path, capsys):
    from llm_embedder import Embedder, Index

    out = tmp_path / "qs"
    results = run_quickstart(str(out), tiny=True, device="cpu")
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    for task in ("qa", "tool", "chat"):
        assert set(saved[task]) - {"none"} == {"base", "base_noinstr", "trained", "bm25", "random"}
        for system in ("base", "trained", "bm25"):
            assert set(saved[task][system]) >= {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    assert set(saved["qa"]["none"]) == {"answer_ll", "answer_ppl", "em"}
    assert {"answer_ll", "em"} <= set(saved["qa"]["trained"])
    assert "answer_ppl" in saved["chat"]["trained"]
    # tiny's downstream systems are bm25 and trained (plus the zero-shot none): no other
    # system pays for LLM calls
    assert set(saved["icl"]) == {"none", "bm25", "trained"}
    assert all(0 <= saved["icl"][s]["accuracy"] <= 1 for s in saved["icl"])
    assert "trained" in saved["average"] and "bm25" in saved["average"]
    for task, by_system in saved.items():
        for metrics in by_system.values():
            assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values()), task

    md = (out / "results.md").read_text()
    assert "| tool (ndcg@5) |" in md and "## Stage timings" in md and "label-only" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert "task (metric)" in printed and "[qa]" in printed and "[icl]" in printed

    model = Embedder.from_pretrained(out / "model", device="cpu")
    index = Index.load(out / "index")
    ids, _ = index.search(model.encode_queries(["What powers a steam engine?"], task="qa"), k=2)
    assert len(ids[0]) == 2
    labelled = [json.loads(line) for line in (out / "labels" / "qa.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in labelled}
    assert methods == {"llm", "labels"}  # LLM-labelled and label-only queries, merged

    # A second run finds every stage done and only reprints the report.
    timings = json.loads((out / "timings.json").read_text())
    again = run_quickstart(str(out), tiny=True, device="cpu")
    assert again == results
    assert "already done" in capsys.readouterr().out
    assert json.loads((out / "timings.json").read_text())["train"]["seconds"] == \
        timings["train"]["seconds"]
    with pytest.raises(ValueError, match="another configuration"):
        run_quickstart(str(out), device="cpu")


@pytest.mark.slow
def test_label_training_data_runs_only_the_labelling_stages_and_resumes(tmp_path, capsys):
    cfg = QuickstartConfig(tasks=("chat",), label_token_budget={"chat": 10**9},
                           max_llm_label_queries=1, max_label_only=3, num_samples=2,
                           num_negatives=2, relabel=True)
    out = tmp_path / "source"
    plan = label_training_data(out, cfg, device="cpu")
    assert plan["chat"]["llm_queries"] == 1 and plan["chat"]["label_only_queries"] == 3
    rows = [json.loads(line) for line in (out / "labels" / "chat.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["labels", "labels", "labels", "llm"]
    assert not (out / "model").exists() and not (out / "results.json").exists()

    before = (out / "labels" / "chat.jsonl").read_bytes()
    capsys.readouterr()
    assert label_training_data(out, cfg, device="cpu") == plan
    assert "already done" in capsys.readouterr().out
    assert (out / "labels" / "chat.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="another configuration"):
        label_training_data(out, QuickstartConfig(tasks=("chat",)), device="cpu")


def test_bundled_llm_labels_are_expanded_not_recomputed(tmp_path, monkeypatch):
    """Without --relabel a task with project labels trains from them: no LLM is loaded."""
    from llm_embedder import quickstart
    from llm_embedder.label import compact_labelled, label

    files = bundled_task_files("chat")
    ids = [q.id for q in load_queries(files["train"])][:40:10]  # 4 queries, any order
    queries = tmp_path / "q.jsonl"
    rows = [line for line in files["train"].read_text(encoding="utf-8").splitlines()
            if json.loads(line)["id"] in ids]
    queries.write_text("\n".join(rows) + "\n", encoding="utf-8")
    full = tmp_path / "full.jsonl"
    label("chat", queries, files["corpus"], full, method="labels", num_negatives=2,
          show_progress=False)
    compact = tmp_path / "chat.compact.jsonl"
    compact_labelled(full, compact)
    monkeypatch.setattr(quickstart, "bundled_labels_file", lambda task: compact)

    class NoLLM:
        stats = {"forward_tokens": 0}

        def __getattr__(self, name):
            raise AssertionError("the frozen LLM was used although the labels are bundled")

    cfg = QuickstartConfig(tasks=("chat",), max_label_only=2)
    out = tmp_path / "run"
    plan = label_training_data(out, cfg, device="cpu", llm=NoLLM())
    assert plan["chat"]["llm_labels"] == "bundled" and plan["chat"]["llm_queries"] == 4
    assert plan["chat"]["label_only_queries"] == 2
    expanded = (out / "labels" / "chat.llm.jsonl").read_text(encoding="utf-8")
    assert sorted(expanded.splitlines()) == sorted(full.read_text(encoding="utf-8").splitlines())
    merged = (out / "labels" / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(merged) == 6
    summary = json.loads((out / "labels" / "summary.json").read_text())
    assert summary["chat/llm"]["source"] == "bundled/labels"
