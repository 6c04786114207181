import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import numpy as np
import pytest
from llm_embedder import label as label_module
from llm_embedder.cli import build_parser, main
from llm_embedder.io import JsonlAppender


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("quickstart", "label", "train", "eval", "index", "search", "merge"):
        assert command in text


def test_console_script_answers_help():
    result = subprocess.run([sys.executable, "-m", "llm_embedder.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quickstart" in result.stdout


# ----------------------------------------------------------------------------- errors


def _jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


_CORPUS = _jsonl({"id": "d1", "text": "alpha beta"}, {"id": "d2", "text": "gamma delta"})
_QUERIES = _jsonl({"id": "q1", "text": "alpha?", "answers": ["beta"], "positive_ids": ["d1"]})


def _label(t: Path, *extra: str) -> List[str]:
    return ["label", "--task", "tool", "--method", "labels", "--queries", str(t / "q.jsonl"),
            "--corpus", str(t / "c.jsonl"), "--out", str(t / "out.jsonl"), *extra]


class Case(NamedTuple):
    name: str
    files: Dict[str, str]  # relative path -> text, written under tmp_path
    argv: Callable[[Path], List[str]]
    code: int
    message: str  # fragment of the one error line


CASES = [
    Case("a config value of the wrong type (ConfigError)",
         {"q.jsonl": _QUERIES, "c.jsonl": _CORPUS, "label.yaml": "num_negatives: '3'\n"},
         lambda t: _label(t, "--config", str(t / "label.yaml")), 2, "'num_negatives'"),
    Case("an option out of range (ConfigError)", {"q.jsonl": _QUERIES, "c.jsonl": _CORPUS},
         lambda t: _label(t, "--shard", "3", "--num-shards", "2"), 2, "'shard'"),
    Case("a malformed queries file (DataError)",
         {"q.jsonl": '{"id": "q1", "text": \n', "c.jsonl": _CORPUS}, _label, 2, "q.jsonl:1"),
    Case("a missing queries file (FileNotFoundError)", {"c.jsonl": _CORPUS}, _label, 2,
         "q.jsonl"),
    Case("a missing train config (FileNotFoundError)", {},
         lambda t: ["train", str(t / "missing.yaml")], 2, "missing.yaml"),
    Case("an unknown eval config key (ConfigError)", {"eval.yaml": "learning_rate: 1\n"},
         lambda t: ["eval", "--config", str(t / "eval.yaml")], 2, "learning_rate"),
    Case("an unknown task (usage error)", {}, lambda t: ["search", "hi", "--task", "nope"], 2,
         "nope"),
    Case("index --out onto a folder of user files (FileExistsError)",
         {"c.jsonl": _CORPUS, "mine/notes.txt": "keep me"},
         lambda t: ["index", "--corpus", str(t / "c.jsonl"), "--task", "tool", "--out",
                    str(t / "mine")], 2, "mine"),
    Case("search an index folder without source.json and no --model", {},
         lambda t: ["search", "hi", "--index", str(t / "idx")], 2, "--model"),
]


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _small_index(folder: Path) -> None:
    from llm_embedder.index import Index

    index = Index(4)
    index.add(np.eye(4, dtype=np.float32)[:2], ["d1", "d2"])
    index.save(folder)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_error_of_ours_is_one_line_with_exit_2_and_no_traceback(case, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, case.files)
    _small_index(tmp_path / "idx")
    code = main(case.argv(tmp_path))
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and case.message in errors[0], err
    for rel, text in case.files.items():  # nothing of the user's is changed or gone
        assert (tmp_path / rel).read_text(encoding="utf-8") == text


def test_an_output_locked_by_another_labeller_is_a_clear_error(tmp_path, capsys):
    _write(tmp_path, {"q.jsonl": _QUERIES, "c.jsonl": _CORPUS})
    with JsonlAppender(tmp_path / "out.jsonl"):  # another writer holds the output
        code = main(_label(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "llm-embedder: error: another process is writing" in err


def test_debug_shows_the_traceback_of_an_error(tmp_path, capsys):
    assert main(["--debug", "train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "llm-embedder: error:" in err


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(shards, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(label_module, "merge_labelled", interrupted)
    assert main(["merge", "a.jsonl", "--out", "b.jsonl"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_a_bug_outside_our_code_keeps_its_traceback(monkeypatch):
    def broken(shards, out):
        raise RuntimeError("CUDA error: an illegal memory access")  # not raised by our code

    monkeypatch.setattr(label_module, "merge_labelled", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["merge", "a.jsonl", "--out", "b.jsonl"])


# ----------------------------------------------------------------------------- configs


def test_label_reads_its_config_file_and_options_win(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(label_module, "label",
                        lambda task, queries, corpus, out, **kwargs: seen.update(kwargs))
    (tmp_path / "label.yaml").write_text("num_negatives: 3\nmethod: labels\nseed: 5\n")
    assert main(["label", "--task", "qa", "--queries", "q", "--corpus", "c", "--out", "o",
                 "--config", str(tmp_path / "label.yaml"), "--seed", "9",
                 "--keep-answer-negatives"]) == 0
    config = seen["config"]
    assert (config.num_negatives, config.method, config.seed) == (3, "labels", 9)
    assert config.skip_answer_negatives is False and config.num_samples == 8


def test_eval_reads_its_config_file_and_writes_markdown_to_an_md_out(tmp_path, capsys):
    (tmp_path / "eval.yaml").write_text("tasks: [tool]\nsystems: [bm25]\nmax_queries: 4\n"
                                        "verbose: false\n")
    out = tmp_path / "results.md"
    assert main(["eval", "--config", str(tmp_path / "eval.yaml"), "--systems", "random",
                 "--no-downstream", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Evaluation")  # not JSON (issue 13 item 2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["tool"]) == {"random"}  # the option won over the file's bm25


# ----------------------------------------------------------------------------- index, search


def test_index_refuses_a_folder_of_user_files_before_encoding(tmp_path, monkeypatch, capsys):
    # Regression (issue 13 item 1): `index --out mydata` deleted a folder of user files.
    import llm_embedder.cli as cli

    monkeypatch.setattr(cli, "_build_index", lambda *a: pytest.fail("encoded before checking"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _write(tmp_path, {"c.jsonl": _CORPUS})
    code = main(["index", "--corpus", str(tmp_path / "c.jsonl"), "--task", "tool", "--out",
                 str(tmp_path / "mine")])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_index_with_overwrite_replaces_and_records_absolute_sources(tmp_path, monkeypatch):
    from llm_embedder.embedder import default_model_path
    from llm_embedder.index import Index

    model = default_model_path().resolve()
    _write(tmp_path, {"c.jsonl": _CORPUS, "mine/notes.txt": "replace me"})
    monkeypatch.chdir(tmp_path)
    assert main(["index", "--corpus", "c.jsonl", "--task", "tool", "--out", "mine",
                 "--overwrite", "--device", "cpu", "--model",
                 os.path.relpath(model, tmp_path)]) == 0
    assert not (tmp_path / "mine" / "notes.txt").exists() and len(Index.load("mine")) == 2
    source = json.loads((tmp_path / "mine" / "source.json").read_text())
    assert source["model"] == str(model)
    assert source["corpus"] == str((tmp_path / "c.jsonl").resolve())


def test_search_without_source_json_names_the_model_it_uses(tmp_path, capsys):
    # Regression (issue 13 item 11): it silently used the packaged model.
    from llm_embedder.embedder import default_model_path
    from llm_embedder.index import Index

    index = Index(384)
    index.add(np.eye(384, dtype=np.float32)[:2], ["d1", "d2"])
    index.save(tmp_path / "idx")
    model = str(default_model_path())
    assert main(["search", "alpha", "--index", str(tmp_path / "idx"), "--model", model,
                 "--device", "cpu", "-k", "1"]) == 0
    captured = capsys.readouterr()
    assert f"with model {model}" in captured.err and "1. [" in captured.out
