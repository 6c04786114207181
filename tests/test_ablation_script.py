"""scripts/ablation.py: each variant changes exactly one thing of the quickstart's training."""

import importlib.util
import shutil
from pathlib import Path

import pytest
from llm_embedder.quickstart import QuickstartConfig
from llm_embedder.train import TrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def source(tmp_path):
    labels = tmp_path / "source" / "labels"
    labels.mkdir(parents=True)
    for task in ("qa", "tool", "chat", "icl"):
        (labels / f"{task}.jsonl").write_text("", encoding="utf-8")
        (labels / f"{task}.llm.jsonl").write_text("", encoding="utf-8")
    return tmp_path / "source"


def test_label_budgets_parse_and_reject_malformed_items(ablation):
    assert ablation.parse_budgets(["qa=150000", "chat=2e5"]) == {"qa": 150000, "chat": 200000}
    for bad in (["qa"], ["=5"], ["qa=lots"], ["qa=-1"], ["qa=inf"], ["qa=nan"]):
        with pytest.raises(SystemExit, match="--label-budget wants TASK=TOKENS"):
            ablation.parse_budgets(bad)


def test_llm_query_budget_takes_one_count_or_per_task_overrides(ablation):
    quickstart, tasks = {"qa": 8, "chat": 24, "icl": 100}, ["qa", "chat", "icl"]
    assert ablation.llm_query_budget(None, quickstart, tasks) == quickstart
    assert ablation.llm_query_budget(["200"], quickstart, tasks) == 200
    assert ablation.llm_query_budget(["icl=200"], quickstart, tasks) == {
        "qa": 8, "chat": 24, "icl": 200}
    assert quickstart["icl"] == 100  # the quickstart's own budget is not changed
    # one count for every task stays that count for the tasks not overridden (a task missing
    # from the mapping would mean every test query)
    assert ablation.llm_query_budget(["icl=200"], 40, tasks) == {"qa": 40, "chat": 40, "icl": 200}
    for bad in (["lots"], ["-3"], ["icl=many"], ["200", "icl=5"]):
        with pytest.raises(SystemExit, match="--max-llm-queries wants a count or TASK=N"):
            ablation.llm_query_budget(bad, quickstart, tasks)


def test_every_variant_differs_from_full_in_exactly_its_one_setting(ablation, source, tmp_path):
    cfg = QuickstartConfig.default()
    configs = {name: ablation.variant_config(source, tmp_path / "out" / name / "seed0", name,
                                             cfg, 0, "cpu", None, False)
               for name in ablation.VARIANTS}
    full = configs["full"]
    assert full["reward"] == "rank" and full["batching"] == "homogeneous" and full["self_paced"]
    assert "loss" not in full  # each task keeps its own loss: graded, KL for chat
    assert {t: s["loss"] for t, s in full["tasks"].items()} == {
        "qa": "graded", "tool": "graded", "chat": "kl", "icl": "graded"}
    for name, config in configs.items():
        changed = {k for k in set(full) | set(config)
                   if k != "output_dir" and full.get(k) != config.get(k)}
        # full pins the method as designed; every other variant changes the settings it names
        # that full sets otherwise (anchor_rank names reward=rank, as full has, and changes one)
        named = {k for k, v in ablation.VARIANTS[name].items() if full.get(k) != v}
        assert changed == named, name
        assert name == "full" or named, f"{name} changes nothing of full"
        assert config["output_dir"].endswith(f"{name}/seed0/train")
        assert TrainConfig.from_dict(config).max_steps == cfg.max_steps  # a valid config


def test_llm_only_trains_on_the_llm_labelled_files_and_names_a_missing_one(ablation, source,
                                                                          tmp_path):
    cfg = QuickstartConfig.default()
    config = ablation.variant_config(source, tmp_path / "out", "full", cfg, 0, "cpu", 7, True)
    assert config["max_steps"] == 7
    assert all(spec["file"].endswith(f"{task}.llm.jsonl")
               for task, spec in config["tasks"].items())
    (source / "labels" / "tool.llm.jsonl").unlink()
    with pytest.raises(SystemExit, match="tool.llm.jsonl"):
        ablation.variant_config(source, tmp_path / "out", "full", cfg, 0, "cpu", None, True)


def test_any_registered_loss_or_reward_is_a_variant(ablation, source, tmp_path):
    from llm_embedder.label import REWARDS
    from llm_embedder.losses import LOSSES

    cfg = QuickstartConfig.default()
    full = ablation.variant_config(source, tmp_path / "out", "full", cfg, 0, "cpu", None, False)
    for name in [f"loss={n}" for n in LOSSES] + [f"reward={n}" for n in REWARDS]:
        config = ablation.variant_config(source, tmp_path / "out", name, cfg, 0, "cpu", None,
                                         False)
        kind, value = name.split("=")
        assert config[kind] == value
        assert {k for k in full if k != "output_dir" and full[k] != config[k]} <= {kind}
        assert value in ablation.describe(name)
    for bad, match in (("loss=mse", "no loss 'mse' is registered"), ("speed=2", "unknown"),
                       ("human_positives=trust", "no human_positives 'trust'"),
                       ("loss=kl,loss=graded", "sets loss twice"), ("loss=kl,", "unknown")):
        with pytest.raises(SystemExit, match=match):
            ablation.variant_change(bad)


def test_joined_changes_and_the_human_positive_variants_train_valid_configs(ablation, source,
                                                                            tmp_path):
    cfg = QuickstartConfig.default()
    joined = "reward=likelihood,human_positives=anchor"
    assert ablation.variant_change(joined) == ablation.VARIANTS["anchor"]
    assert "reward 'likelihood', human_positives 'anchor'" in ablation.describe(joined)
    for name, policy in ((joined, "anchor"), ("anchor", "anchor"), ("agree", "agree")):
        config = TrainConfig.from_dict(ablation.variant_config(
            source, tmp_path / "out", name, cfg, 0, "cpu", None, False))
        assert (config.reward, config.human_positives) == ("likelihood", policy)


def test_label_only_trains_the_full_method_on_human_labels_and_drops_a_task_without(
        ablation, source, tmp_path):
    cfg = QuickstartConfig.default()
    human = tmp_path / "human"
    human.mkdir()
    for task in ("qa", "tool", "chat"):  # icl: no query has a positive
        (human / f"{task}.jsonl").write_text("", encoding="utf-8")
    full = ablation.variant_config(source, tmp_path / "full", "full", cfg, 0, "cpu", None, False)
    only = ablation.variant_config(source, tmp_path / "lo", ablation.LABEL_ONLY, cfg, 0, "cpu",
                                   None, False, human)
    assert set(only["tasks"]) == {"qa", "tool", "chat"}
    assert all(spec["file"] == str(human / f"{task}.jsonl")
               for task, spec in only["tasks"].items())
    assert {k for k in full if k not in ("output_dir", "tasks") and full[k] != only[k]} == set()
    with pytest.raises(ValueError, match="human_labels"):
        ablation.variant_config(source, tmp_path / "lo", ablation.LABEL_ONLY, cfg, 0, "cpu",
                                None, False)
    # label_only_keep: the same human files, and icl keeps its LLM labels (its step share)
    keep = ablation.variant_config(source, tmp_path / "lk", ablation.LABEL_ONLY_KEEP, cfg, 0,
                                   "cpu", None, False, human)
    assert {t: s["file"] for t, s in keep["tasks"].items()} == {
        **{t: s["file"] for t, s in only["tasks"].items()},
        "icl": str(source / "labels" / "icl.jsonl")}
    assert {k for k in full if k not in ("output_dir", "tasks") and full[k] != keep[k]} == {
        "reward"} and keep["reward"] == "likelihood"


def test_human_labels_relabel_the_llm_queries_from_their_positives(ablation, tmp_path):
    import json

    from llm_embedder.quickstart import label_training_data

    cfg = QuickstartConfig.tiny()
    source = tmp_path / "qs"
    plan = label_training_data(source, cfg, seed=0, device="cpu")
    human = ablation.human_labels(source, tmp_path / "out", cfg, 0, False, "cpu")
    assert (human / "icl.none").is_file() and not (human / "icl.jsonl").exists()
    for task in ("qa", "tool", "chat"):
        rows = [json.loads(line) for line in (human / f"{task}.jsonl").open()]
        llm_ids = {json.loads(line)["query_id"]
                   for line in (source / "labels" / f"{task}.llm.jsonl").open()}
        assert llm_ids <= {r["query_id"] for r in rows}, task  # relabelled, not dropped
        assert len(rows) == plan[task]["llm_queries"] + plan[task]["label_only_queries"]
        for r in rows:  # 1 for a positive, 0 for a mined negative or the empty context
            assert r["method"] == "labels", task
            for rewards in (r["rank_rewards"], r["likelihood_rewards"]):
                assert set(rewards) <= {0.0, 1.0} and max(rewards) == 1.0, task
    again = ablation.human_labels(source, tmp_path / "out", cfg, 0, False, "cpu")
    assert again == human  # resumed: nothing is labelled twice


def _rows(averages, seeds=None):
    return {name: {"variant": name, "seeds": (seeds or {}).get(name, list(range(len(values)))),
                   "runs": [{"average": {"trained": {"primary": v}}} for v in values]}
            for name, values in averages.items()}


def test_verdicts_judge_each_claim_on_the_mean_over_seeds(ablation):
    mean, sd = ablation.mean_sd([0.5, 0.7])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1414, abs=1e-4)
    assert ablation.mean_sd([0.3]) == (0.3, 0.0)
    lines = ablation.verdicts(_rows({"full": [0.50, 0.52], "likelihood": [0.49, 0.47],
                                     "contrastive": [0.60, 0.62]}))
    # paired differences 0.01 and 0.05: mean 0.03, sd 0.0283, se 0.02 -> 1.5 standard errors
    assert lines[0] == ("rank-aware >= likelihood reward: met — full 0.510 vs likelihood 0.480 "
                        "(mean average over seeds [0, 1], paired, 1.5 standard errors)")
    assert lines[1].startswith("graded >= contrastive-only: NOT met")
    assert lines[-1] == "best variant by mean average: contrastive (0.610 over 2 seeds)"
    assert len(lines) == 3  # claims whose variants did not run are left out


def test_verdicts_compare_only_the_seeds_both_variants_ran(ablation):
    rows = _rows({"full": [0.50, 0.52, 0.90], "likelihood": [0.49, 0.55]},
                 seeds={"full": [0, 1, 2], "likelihood": [1, 0]})
    line = ablation.verdicts(rows)[0]
    # seed 2 (only full ran it) is left out; seeds are matched by number, not position
    assert line.startswith("rank-aware >= likelihood reward: NOT met — full 0.510 vs "
                           "likelihood 0.520 (mean average over seeds [0, 1], paired")


def test_table_shows_mean_and_sd_over_runs_with_the_downstream_columns(ablation):
    runs = [{"qa": {"trained": {"ndcg@10": v, "answer_ll": -2.0}},
             "average": {"trained": {"primary": v}}} for v in (0.90, 0.94)]
    text = ablation.table({"full": {"variant": "full", "runs": runs, "train_seconds": [10, 20],
                                    "beir": {"trained": [0.61, 0.63],
                                             "trained_noinstr": [0.65, 0.65]}}},
                          ["qa"], markdown=True)
    header, _, line = text.splitlines()
    assert "qa answer ll" in header
    assert "BEIR ndcg@10 (instr.) | BEIR ndcg@10 (no instr.)" in header
    assert line == "| full | 0.920 ± 0.028 | 0.920 ± 0.028 | -2.000 ± 0.000 | 0.620 ± 0.014 " \
                   "| 0.650 ± 0.000 | 2 | 15 |"


def _finished_quickstart(source: Path) -> Path:
    """The files of a quickstart folder the ablation reads (qa only), no data behind them."""
    import json

    (source / "data").mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(
        {"config": {"tasks": ["qa"], "index_task": "qa"}, "seed": 0}))
    (source / "data" / "plan.json").write_text(json.dumps(
        {"qa": {"corpus": "c.jsonl", "test": "t.jsonl", "llm_queries": 1,
                "label_only_queries": 1}}))
    return source


def test_main_trains_each_variant_once_per_seed_and_resumes(ablation, monkeypatch, tmp_path):
    import llm_embedder.train as train_module

    source = _finished_quickstart(tmp_path / "qs")
    (source / "labels").mkdir()
    (source / "labels" / "qa.jsonl").write_text("")
    trained = []

    def fake_train(config):
        trained.append((config.seed, Path(config.output_dir).parent.parent.name))
        (Path(config.output_dir) / "checkpoint").mkdir(parents=True)
        return tmp_path / "model"

    def fake_evaluate(model, *, config, llm, systems):
        value = 0.5 if model is None else 0.6 + 0.01 * trained[-1][0]
        return {"qa": {s: {"ndcg@10": value} for s in systems},
                "average": {s: {"primary": value} for s in systems}}

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(ablation, "evaluate", fake_evaluate)
    argv = ["--from", str(source), "--out", str(tmp_path / "ab"), "--variants", "full",
            "likelihood", "--seeds", "0", "2", "--no-downstream"]
    assert ablation.main(argv) == 0
    # seed by seed: both variants at seed 0 before either at seed 2
    assert trained == [(0, "full"), (0, "likelihood"), (2, "full"), (2, "likelihood")]
    assert not list((tmp_path / "ab").glob("*/seed*/train/checkpoint"))  # removed when done
    assert (tmp_path / "ab" / "full" / "seed2" / "results.json").is_file()
    text = (tmp_path / "ab" / "ablation.md").read_text()
    assert "| full | 0.610 ± 0.014 | 0.610 ± 0.014 | 2 | 0 |" in text  # no LLM: no ll column
    assert "training seeds [0, 2]" in text
    assert ablation.main(argv) == 0 and len(trained) == 4  # every run done: none again


def test_no_instructions_empties_the_tasks_instructions_and_out_refuses_another_setting(
        ablation, monkeypatch, tmp_path):
    import llm_embedder.train as train_module
    from llm_embedder.tasks import TASKS, get_task

    monkeypatch.setitem(TASKS, "qa", get_task("qa"))  # the registry is restored afterwards
    monkeypatch.setitem(TASKS, "tool", get_task("tool"))
    tool_instruction = get_task("tool").query_instruction
    source = _finished_quickstart(tmp_path / "qs")
    (source / "labels").mkdir()
    (source / "labels" / "qa.jsonl").write_text("")
    seen = []

    def fake_train(config):
        seen.append((get_task("qa").query_instruction, get_task("qa").key_instruction,
                     get_task("tool").query_instruction))
        return tmp_path / "model"

    def fake_evaluate(model, *, config, llm, systems):
        seen.append(get_task("qa").query_instruction)
        return {"qa": {s: {"ndcg@10": 0.5} for s in systems},
                "average": {s: {"primary": 0.5} for s in systems}}

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(ablation, "evaluate", fake_evaluate)
    out = tmp_path / "ab"
    argv = ["--from", str(source), "--out", str(out), "--variants", "anchor", "--no-downstream"]
    assert ablation.main([*argv, "--no-instructions", "qa"]) == 0
    # baselines and the trained run alike see qa without instructions, tool unchanged
    assert seen == ["", ("", "", tool_instruction), ""]
    assert "qa without instructions (train and evaluation)" in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit, match="--no-instructions qa; this run asks for .none."):
        ablation.main(argv)
    with pytest.raises(SystemExit, match="asks for qa tool: use another --out"):
        ablation.main([*argv, "--no-instructions", "qa", "tool"])
    # runs made before the option existed (no record) used every instruction
    (out / ablation.INSTRUCTIONS_RECORD).unlink()
    with pytest.raises(SystemExit, match="--no-instructions .none.; this run asks for qa"):
        ablation.main([*argv, "--no-instructions", "qa"])
    with pytest.raises(SystemExit, match="--no-instructions: unknown task 'qq'"):
        ablation.main([*argv, "--no-instructions", "qq"])
    assert ablation.main([*argv, "--report"]) == 0  # a record-less folder: every instruction


def test_report_trains_nothing_and_tables_the_finished_runs(ablation, monkeypatch, tmp_path,
                                                            capsys):
    import json

    import llm_embedder.train as train_module

    source = _finished_quickstart(tmp_path / "qs")
    out = tmp_path / "ab"
    for name, seed, value in (("full", 0, 0.60), ("full", 1, 0.62), ("likelihood", 0, 0.58)):
        (out / name / f"seed{seed}").mkdir(parents=True)
        (out / name / f"seed{seed}" / "results.json").write_text(json.dumps(
            {"variant": name, "seed": seed, "train_seconds": 10.0,
             "results": {"qa": {"trained": {"ndcg@10": value}},
                         "average": {"trained": {"primary": value}}}}))

    def fail(*args, **kwargs):
        raise AssertionError("--report must not train or evaluate")

    monkeypatch.setattr(train_module, "train", fail)
    monkeypatch.setattr(ablation, "evaluate", fail)
    assert ablation.main(["--from", str(source), "--out", str(out), "--variants", "full",
                          "likelihood", "label_only", "--seeds", "0", "1", "--report"]) == 0
    assert "== likelihood, seed 1: not run yet" in capsys.readouterr().out
    text = (out / "ablation.md").read_text()
    assert "| full | 0.610 ± 0.014 | 0.610 ± 0.014 | 2 | 10 |" in text
    assert "| likelihood | 0.580 | 0.580 | 1 | 10 |" in text
    assert "| label_only | - | - | 0 | - |" in text
    assert "(BM25)" not in text  # no baselines measured yet: none made up
    assert "full 0.600 vs likelihood 0.580 (mean average over seeds [0], paired)" in text
    assert not (out / "human").exists()  # label_only's files are not built by a report


def test_beir_is_measured_for_runs_finished_without_it_once_per_folder_and_split(
        ablation, monkeypatch, tmp_path):
    import json

    import llm_embedder.train as train_module

    source = _finished_quickstart(tmp_path / "qs")
    out, beir = tmp_path / "ab", tmp_path / "scifact"
    beir.mkdir()
    (out / "baselines.json").parent.mkdir(parents=True)
    (out / "baselines.json").write_text(json.dumps(
        {"qa": {s: {"ndcg@10": 0.5} for s in ("bm25", "base", "base_noinstr")},
         "average": {s: {"primary": 0.5} for s in ("bm25", "base", "base_noinstr")}}))
    # an older cache: one flat mapping, its split unknown, so it is not trusted
    (out / "baselines_beir.json").write_text(json.dumps({"bm25": 0.99}))
    for seed in (0, 1):
        run_dir = out / "full" / f"seed{seed}"
        (run_dir / "train" / "model").mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(
            {"variant": "full", "seed": seed, "train_seconds": 10.0,
             "config": {"output_dir": str(run_dir / "train")},
             "results": {"qa": {"trained": {"ndcg@10": 0.6}},
                         "average": {"trained": {"primary": 0.6}}}, "beir_ndcg@10": None}))
    gone_model = out / "full" / "seed1" / "train" / "model"
    measured = []

    def fake_beir(folder, split, model, systems, device):
        measured.append((split, None if model is None else Path(model).parent.parent.name))
        bump = 0.0 if split == "dev" else 0.1
        values = {"bm25": 0.66, "base": 0.62, "base_noinstr": 0.67,
                  "trained": 0.63, "trained_noinstr": 0.64}
        return {s: values[s] + bump for s in systems}

    def fail(*args, **kwargs):
        raise AssertionError("finished runs are not trained or evaluated again")

    monkeypatch.setattr(train_module, "train", fail)
    monkeypatch.setattr(ablation, "evaluate", fail)
    monkeypatch.setattr(ablation, "_beir_ndcg", fake_beir)
    argv = ["--from", str(source), "--out", str(out), "--variants", "full", "--seeds", "0", "1",
            "--no-downstream", "--beir", str(beir), "--beir-split", "dev"]
    assert ablation.main(argv) == 0
    assert measured == [("dev", None), ("dev", "seed0"), ("dev", "seed1")]
    text = (out / "ablation.md").read_text()
    assert "| full | 0.600 ± 0.000 | 0.600 ± 0.000 | 0.630 ± 0.000 | 0.640 ± 0.000 | 2 | 10 |" \
        in text
    assert "| (BM25) | 0.500 | 0.500 | 0.660 | 0.660 | 1 | - |" in text  # no instructions: both
    assert "| (base, instr.) | 0.500 | 0.500 | 0.620 | - | 1 | - |" in text
    assert "| (base, no instr.) | 0.500 | 0.500 | - | 0.670 | 1 | - |" in text
    saved = json.loads((out / "full" / "seed0" / "results.json").read_text())
    assert saved["beir"][ablation.beir_key(beir, "dev")] == {"trained": 0.63,
                                                             "trained_noinstr": 0.64}
    assert ablation.main(argv) == 0 and len(measured) == 3  # saved: not measured again
    # --report on another split measures nothing and shows none of the dev numbers as its own
    assert ablation.main([*argv[:-1], "test", "--report"]) == 0 and len(measured) == 3
    assert "BEIR ndcg@10" not in (out / "ablation.md").read_text()  # no column
    # another split is another measurement; a run whose model is gone is left without one
    shutil.rmtree(gone_model)
    assert ablation.main([*argv[:-1], "test"]) == 0
    assert measured[3:] == [("test", None), ("test", "seed0")]
    assert "| full | 0.600 ± 0.000 | 0.600 ± 0.000 | 0.730 | 0.740 | 2 | 10 |" \
        in (out / "ablation.md").read_text()
