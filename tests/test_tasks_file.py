"""``--tasks-file``: custom tasks from a YAML/JSON file for label, train, eval, index, search
(and serve, convert), and one-line errors for bad files."""

import json
from pathlib import Path
from typing import Dict

import pytest
from llm_embedder.cli import main
from llm_embedder.config import ConfigError
from llm_embedder.data import bundled_task_files, iter_jsonl
from llm_embedder.tasks import TASKS, load_tasks_file, register_tasks_file, unregister_task

TASKS_YAML = """\
tasks:
  faq-file-test:
    query_instruction: "Find the FAQ entry for: "
    key_instruction: "FAQ entry: "
    prompt_template: "Entry: {key}\\nAsked: {query}\\nReply:"
    empty_template: "Asked: {query}\\nReply:"
    loss: contrastive
    primary_metric: mrr@10
    max_new_tokens: 8
  qa-variant-file-test:
    base: qa
    query_instruction: "Question: "
"""


def _slice(folder: Path) -> Dict[str, Path]:
    """16 training and 8 test queries of the bundled knowledge slice with a corpus of their
    positives and 24 other passages: a new task's own data."""
    files = bundled_task_files("qa")
    train_rows = [obj for _, obj in iter_jsonl(files["train"])][::41][:16]
    test_rows = [obj for _, obj in iter_jsonl(files["test"])][::19][:8]
    wanted = {pid for row in train_rows + test_rows for pid in row["positive_ids"]}
    corpus_rows = [obj for i, (_, obj) in enumerate(iter_jsonl(files["corpus"]))
                   if obj["id"] in wanted or i < 24]
    paths = {}
    for name, rows in (("corpus", corpus_rows), ("train", train_rows), ("test", test_rows)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def test_a_tasks_file_task_is_labelled_trained_evaluated_indexed_and_searched(tmp_path, capsys):
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(TASKS_YAML, encoding="utf-8")
    paths = _slice(tmp_path)
    flag = ["--tasks-file", str(tasks_file)]
    labelled = tmp_path / "faq.labels.jsonl"
    assert main(["label", *flag, "--task", "faq-file-test", "--method", "labels", "--queries",
                 str(paths["train"]), "--corpus", str(paths["corpus"]), "--out",
                 str(labelled), "--num-negatives", "3"]) == 0
    records = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert len(records) == 16 and {r["task"] for r in records} == {"faq-file-test"}

    (tmp_path / "train.yaml").write_text(json.dumps({
        "tasks": {"faq-file-test": str(labelled)}, "output_dir": str(tmp_path / "run"),
        "max_steps": 2, "batch_size": 4, "group_size": 3, "query_max_length": 32,
        "key_max_length": 64, "save_steps": 0, "device": "cpu", "plot": False,
        "progress_bar": False}), encoding="utf-8")
    # the global form of the flag, before the subcommand
    assert main([*flag, "train", str(tmp_path / "train.yaml")]) == 0
    model = capsys.readouterr().out.split("model written to ")[-1].strip()
    assert Path(model, "config.json").is_file()

    (tmp_path / "eval.yaml").write_text(json.dumps({
        "tasks": ["faq-file-test"], "systems": ["bm25", "trained"], "downstream": False,
        "device": "cpu", "verbose": False,
        "data": {"faq-file-test": {"corpus": str(paths["corpus"]),
                                   "test": str(paths["test"])}}}), encoding="utf-8")
    assert main(["eval", *flag, "--model", model, "--config", str(tmp_path / "eval.yaml"),
                 "--out", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["faq-file-test"]["trained"]["mrr@10"] <= 1.0
    assert results["average"]["trained"]["primary"] == results["faq-file-test"]["trained"][
        "mrr@10"]  # the file's primary metric

    index = tmp_path / "index"
    assert main(["index", *flag, "--task", "faq-file-test", "--corpus", str(paths["corpus"]),
                 "--out", str(index), "--model", model, "--device", "cpu"]) == 0
    assert json.loads((index / "source.json").read_text())["task"] == "faq-file-test"
    capsys.readouterr()
    question = json.loads(paths["test"].read_text().splitlines()[0])["text"]
    assert main(["search", *flag, question, "--index", str(index), "-k", "2",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "(task faq-file-test)" in captured.err and "2. [" in captured.out
    assert "faq-file-test" not in TASKS  # main() leaves the registry as it found it


def test_base_starts_from_a_registered_task():
    tasks = {t.name: t for t in _load(TASKS_YAML)}
    variant = tasks["qa-variant-file-test"]
    assert variant.query_instruction == "Question: "
    assert variant.key_instruction == TASKS["qa"].key_instruction
    assert variant.prompt_template == TASKS["qa"].prompt_template and variant.loss == "graded"
    assert tasks["faq-file-test"].primary_metric == "mrr@10"


def _load(text: str, suffix: str = ".yaml"):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"tasks{suffix}"
        path.write_text(text, encoding="utf-8")
        return load_tasks_file(path)


def test_a_json_tasks_file_works_too(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": {"json-file-test": {"base": "tool", "loss": "kl"}}}))
    registered = register_tasks_file(path)
    try:
        assert TASKS["json-file-test"].loss == "kl"
    finally:
        for task in registered:
            unregister_task(task.name)


BAD_FILES = [
    ("not YAML", "tasks: [unclosed\n", "cannot parse the config"),
    ("no tasks key", "faq: {}\n", "a tasks file holds one key, 'tasks'"),
    ("an extra top-level key", "tasks: {a: {base: qa}}\nversion: 1\n",
     "unknown key(s) ['version']"),
    ("tasks not a mapping", "tasks: [a, b]\n", "'tasks' must be a non-empty mapping"),
    ("a task that is not a mapping", "tasks: {faq: 3}\n", "tasks.faq: expected a mapping"),
    ("an unknown field", "tasks: {faq: {base: qa, instruction: x}}\n",
     "tasks.faq: unknown field(s) ['instruction']"),
    ("a field of the wrong type", "tasks: {faq: {base: qa, max_new_tokens: many}}\n",
     "tasks.faq.max_new_tokens: expected an integer"),
    ("a missing field", "tasks: {faq: {query_instruction: 'Q: '}}\n",
     "tasks.faq: missing field(s) ['key_instruction', 'prompt_template', 'empty_template']"),
    ("an unknown base", "tasks: {faq: {base: nope}}\n", "tasks.faq.base: 'nope' is not"),
    ("an unknown loss", "tasks: {faq: {base: qa, loss: mse}}\n", "tasks.faq: task 'faq': loss "
                                                                 "must be one of"),
    ("a template without {key}", "tasks: {faq: {base: qa, prompt_template: '{query}'}}\n",
     "prompt_template must contain '{key}'"),
    ("a template with another placeholder",
     "tasks: {faq: {base: qa, prompt_template: '{key} {title} {query}'}}\n",
     "has the placeholder {title}"),
    ("a name already registered", "tasks: {qa: {base: tool}}\n",
     "tasks.qa: a task 'qa' is already registered"),
]


@pytest.mark.parametrize("name,text,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_tasks_file_is_a_one_line_error_naming_file_and_key(name, text, message, tmp_path,
                                                                   capsys):
    path = tmp_path / "tasks.yaml"
    path.write_text(text, encoding="utf-8")
    before = dict(TASKS)
    assert main(["search", "hello", "--tasks-file", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("llm-embedder: error: ") and str(path) in errors[0]
    assert message in errors[0], errors[0]
    assert TASKS == before  # all or nothing


def test_a_missing_tasks_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["--tasks-file", str(tmp_path / "none.yaml"), "index", "--help"]) == 2
    err = capsys.readouterr().err
    assert "llm-embedder: error: config file" in err and "none.yaml" in err


def test_the_second_of_two_files_failing_registers_nothing(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("tasks: {two-files-test: {base: qa}}\n", encoding="utf-8")
    bad.write_text("tasks: {two-files-test-b: {base: qa, loss: mse}}\n", encoding="utf-8")
    assert main(["--tasks-file", str(good), "search", "hi", "--tasks-file", str(bad)]) == 2
    assert "two-files-test" not in TASKS


def test_every_subcommand_that_takes_a_task_accepts_the_flag(tmp_path, capsys):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks: {help-file-test: {base: qa}}\n", encoding="utf-8")
    for command in ("label", "train", "eval", "index", "search", "serve", "convert"):
        assert main([command, "--tasks-file", str(path), "--help"]) == 0
        text = capsys.readouterr().out
        assert "--tasks-file" in text, command
        if command in ("label", "index", "search"):
            assert "help-file-test" in text, command  # a valid --task choice


def test_load_tasks_file_names_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("tasks: {faq: {base: qa, downstream: summary}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"t.yaml: tasks.faq.downstream: expected one of"):
        load_tasks_file(path)
