"""Bad inputs through the command line, as a new user would give them.

Each row: the files a user has, the command they run, the exit code they must get and a
fragment of the one-line message that must name the problem. Every run must also be free of
tracebacks and must leave the user's files as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import pytest
from llm_embedder import cli
from llm_embedder.data import bundled_task_files

TOOL = bundled_task_files("tool")


class Case(NamedTuple):
    name: str
    files: Dict[str, bytes]  # relative path -> content, written under tmp_path
    argv: Callable[[Path], List[str]]  # command line, given tmp_path
    code: int
    message: str  # fragment the error line must contain (a regex-free substring)


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _config(**values: object) -> bytes:
    base: Dict[str, object] = {"tasks": {"tool": "labels.jsonl"}, "output_dir": "run",
                               "max_steps": 1}
    base.update(values)
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in base.items()).encode()


_CORPUS = _jsonl({"id": "d1", "text": "alpha beta"}, {"id": "d2", "text": "gamma delta"})
_QUERY = {"id": "q1", "text": "alpha?", "answers": ["beta"], "positive_ids": ["d1"]}


def _label(t: Path, queries: str = "q.jsonl", corpus: str = "c.jsonl",
           out: str = "out.jsonl") -> List[str]:
    return ["label", "--task", "tool", "--method", "labels", "--queries", str(t / queries),
            "--corpus", str(t / corpus), "--out", str(t / out)]


def _train(t: Path) -> List[str]:
    return ["train", str(t / "train.yaml")]


CASES = [
    Case("malformed queries JSONL", {"q.jsonl": b'{"id": "q1", "text": \n', "c.jsonl": _CORPUS},
         _label, 2, "q.jsonl:1"),
    Case("answers that are not strings",
         {"q.jsonl": _jsonl({**_QUERY, "answers": [True, 3]}), "c.jsonl": _CORPUS},
         _label, 2, "answers"),
    Case("an id that is not a string",
         {"q.jsonl": _jsonl({**_QUERY, "id": 7}), "c.jsonl": _CORPUS}, _label, 2, "'id'"),
    Case("non-UTF-8 bytes in the corpus",
         {"q.jsonl": _jsonl(_QUERY), "c.jsonl": b'{"id": "d1", "text": "caf\xe9"}\n'},
         _label, 2, "c.jsonl"),
    Case("empty passage text",
         {"q.jsonl": _jsonl(_QUERY), "c.jsonl": _jsonl({"id": "d1", "text": "  "})},
         _label, 2, "c.jsonl:1"),
    Case("missing queries file", {"c.jsonl": _CORPUS}, _label, 2, "q.jsonl"),
    Case("label --out onto a file that is not a labelled file",
         {"q.jsonl": _jsonl(_QUERY), "c.jsonl": _CORPUS, "out.jsonl": b"my notes\nline 2"},
         _label, 2, "out.jsonl"),
    Case("lr read as a string by YAML",
         {"train.yaml": _config(lr="1e-4"), "labels.jsonl": b""}, _train, 2, "'lr'"),
    Case("batch_size as a string",
         {"train.yaml": _config(batch_size="32"), "labels.jsonl": b""}, _train, 2,
         "'batch_size'"),
    Case("self_paced that is not a bool",
         {"train.yaml": _config(self_paced="nope"), "labels.jsonl": b""}, _train, 2,
         "'self_paced'"),
    Case("fractional max_steps",
         {"train.yaml": _config(max_steps=1.5), "labels.jsonl": b""}, _train, 2, "'max_steps'"),
    Case("output_dir that is a file",
         {"train.yaml": _config(), "labels.jsonl": b"", "run": b"a file"}, _train, 2,
         "output_dir"),
    Case("unknown config key", {"train.yaml": _config(learning_rate=1e-4)}, _train, 2,
         "learning_rate"),
    Case("missing labelled file", {"train.yaml": _config()}, _train, 2, "labels.jsonl"),
    Case("missing model folder",
         {}, lambda t: ["index", "--corpus", str(TOOL["corpus"]), "--task", "tool", "--out",
                        str(t / "idx"), "--model", "no-such-model"], 2, "no-such-model"),
    Case("index --out onto a folder of user files",
         {"mine/notes.txt": b"keep me"},
         lambda t: ["index", "--corpus", str(TOOL["corpus"]), "--task", "tool", "--out",
                    str(t / "mine")], 2, "mine"),
    Case("unknown task", {}, lambda t: ["search", "hello", "--task", "nope"], 2, "nope"),
    Case("search in a folder that is no index", {"idx/x.txt": b"x"},
         lambda t: ["search", "hello", "--index", str(t / "idx")], 2, "idx"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line_and_loses_nothing(case: Case, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel, content in case.files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    code = cli.main(case.argv(tmp_path))
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert case.message in lines[0], err
    for rel, content in case.files.items():  # nothing the user had is changed or gone
        assert (tmp_path / rel).read_bytes() == content, rel


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    code = cli.main(["--debug", "train", str(tmp_path / "missing.yaml")])
    assert code == 2
    assert "Traceback" in capsys.readouterr().err
