"""``llm-embedder label`` under a launcher (torchrun, or anything setting RANK / WORLD_SIZE):
each rank labels its shard, the last to finish merges, and the merge equals a one-process run
byte for byte — also after a kill, and never from a marker of other inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from llm_embedder.cli import main, rank_shard_path

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon").split()


def _data(folder: Path, n_queries: int = 7) -> None:
    """A corpus of 14 passages and ``n_queries`` queries, each with one positive."""
    corpus = [{"id": f"d{i}", "text": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[(i * 3) % 20]} "
                                      f"passage number {i}"} for i in range(14)]
    queries = [{"id": f"q{i}", "text": f"{WORDS[i]} {WORDS[i + 1]}?",
                "answers": [WORDS[i + 1]], "positive_ids": [f"d{i}"]} for i in range(n_queries)]
    for name, rows in (("c.jsonl", corpus), ("q.jsonl", queries)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _argv(folder: Path, out: str) -> List[str]:
    return ["label", "--task", "qa", "--method", "labels", "--num-negatives", "3",
            "--queries", str(folder / "q.jsonl"), "--corpus", str(folder / "c.jsonl"),
            "--out", str(folder / out)]


def _as_rank(monkeypatch, rank: int, world: int, argv: List[str]) -> int:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    try:
        return main(argv)
    finally:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)


@pytest.fixture()
def single(tmp_path, monkeypatch) -> bytes:
    """The one-process labelled file of the data in tmp_path."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _data(tmp_path)
    assert main(_argv(tmp_path, "single.jsonl")) == 0
    return (tmp_path / "single.jsonl").read_bytes()


def test_two_processes_merge_into_the_one_process_file_byte_for_byte(tmp_path, single):
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-m", "llm_embedder.cli",
                                       *_argv(tmp_path, "out.jsonl")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
    assert (tmp_path / "out.jsonl").read_bytes() == single
    assert any(b"merged 2 shard(s), 7 record(s)" in err for _, err in outputs)


def test_the_last_rank_to_finish_merges(tmp_path, single, monkeypatch, capsys):
    assert _as_rank(monkeypatch, 1, 2, _argv(tmp_path, "out.jsonl")) == 0
    assert "ranks [0] still labelling" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert rank_shard_path(str(tmp_path / "out.jsonl"), 1, 2).is_file()
    assert _as_rank(monkeypatch, 0, 2, _argv(tmp_path, "out.jsonl")) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == single


def test_a_killed_rank_resumes_and_the_merge_is_still_exact(tmp_path, single, monkeypatch):
    out = tmp_path / "out.jsonl"
    for rank in (0, 1):
        assert _as_rank(monkeypatch, rank, 2, _argv(tmp_path, "out.jsonl")) == 0
    # Rank 0 killed mid-record on a re-run: its marker was gone, a partial line is left.
    shard = rank_shard_path(str(out), 0, 2)
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:2]) + lines[2][:30])
    Path(f"{shard}.done").unlink()
    out.unlink()
    assert _as_rank(monkeypatch, 0, 2, _argv(tmp_path, "out.jsonl")) == 0
    assert out.read_bytes() == single


def test_a_marker_written_for_other_queries_does_not_count(tmp_path, monkeypatch, capsys):
    _data(tmp_path, n_queries=5)
    assert _as_rank(monkeypatch, 1, 2, _argv(tmp_path, "out.jsonl")) == 0
    _data(tmp_path, n_queries=7)  # the queries change before rank 0 runs
    assert _as_rank(monkeypatch, 0, 2, _argv(tmp_path, "out.jsonl")) == 0
    assert "ranks [1] still labelling" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert _as_rank(monkeypatch, 1, 2, _argv(tmp_path, "out.jsonl")) == 0
    assert main(_argv(tmp_path, "single.jsonl")) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()


def test_explicit_shards_win_over_the_launcher(tmp_path, monkeypatch):
    _data(tmp_path)
    argv = _argv(tmp_path, "out.jsonl") + ["--shard", "1", "--num-shards", "3"]
    assert _as_rank(monkeypatch, 0, 2, argv) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2  # q1, q4
    assert not rank_shard_path(str(tmp_path / "out.jsonl"), 0, 2).exists()


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 needs RANK in 0..1, got None"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "needs RANK in 0..1, got '2'"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
])
def test_a_bad_launcher_environment_is_a_one_line_error(env, message, tmp_path, monkeypatch,
                                                        capsys):
    _data(tmp_path)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(_argv(tmp_path, "out.jsonl")) == 2
    err = capsys.readouterr().err
    assert "llm-embedder: error: " in err and message in err and "Traceback" not in err


def test_an_out_that_is_not_a_labelled_file_is_refused_before_labelling(tmp_path, monkeypatch,
                                                                        capsys):
    _data(tmp_path)
    (tmp_path / "out.jsonl").write_text("my notes\n", encoding="utf-8")
    assert _as_rank(monkeypatch, 0, 2, _argv(tmp_path, "out.jsonl")) == 2
    assert "out.jsonl:1: invalid JSON" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == "my notes\n"
    assert not rank_shard_path(str(tmp_path / "out.jsonl"), 0, 2).exists()


def test_label_help_documents_the_launcher_mode(capsys):
    assert main(["label", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "torchrun" in text and "WORLD_SIZE" in text and "OUT.rank{r}-of-{W}" in text
