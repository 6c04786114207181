"""scripts/ablation.py: each variant changes exactly one thing of the quickstart's training."""

import importlib.util
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
    for bad in (["qa"], ["=5"], ["qa=lots"], ["qa=-1"]):
        with pytest.raises(SystemExit, match="TASK=TOKENS"):
            ablation.parse_budgets(bad)


def test_every_variant_differs_from_full_in_exactly_its_one_setting(ablation, source, tmp_path):
    cfg = QuickstartConfig.default()
    configs = {name: ablation.variant_config(source, tmp_path / "out", name, cfg, 0, "cpu",
                                             None, False) for name in ablation.VARIANTS}
    full = configs["full"]
    assert full["reward"] == "rank" and full["batching"] == "homogeneous" and full["self_paced"]
    assert "loss" not in full  # each task keeps its own loss: graded, KL for chat
    assert {t: s["loss"] for t, s in full["tasks"].items()} == {
        "qa": "graded", "tool": "graded", "chat": "kl", "icl": "graded"}
    for name, config in configs.items():
        changed = {k for k in set(full) | set(config)
                   if k != "output_dir" and full.get(k) != config.get(k)}
        assert changed == set(ablation.VARIANTS[name]), name
        assert config["output_dir"].endswith(f"{name}/train")
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
    for bad, match in (("loss=mse", "no loss 'mse' is registered"), ("speed=2", "unknown")):
        with pytest.raises(SystemExit, match=match):
            ablation.variant_change(bad)
