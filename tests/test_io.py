"""io: atomic files and folders, the output lock, stale temporaries, umask, replace checks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llm_embedder import io as io_module
from llm_embedder.io import (
    FolderNotOursError,
    JsonlAppender,
    OutputLockedError,
    atomic_directory,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    clean_stale_temporaries,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_json_round_trips_unicode(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"tâche": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"tâche": [1, 2]}


def test_atomic_file_keeps_the_suffix_and_swaps_in_only_on_success(tmp_path):
    target = tmp_path / "chart.png"
    with atomic_file(target, suffix=".png") as tmp:
        assert tmp.name.endswith(".tmp.png") and tmp.parent == tmp_path
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_file(target, suffix=".png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_file(target) as tmp:
            pass
    assert target.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_atomic_directory_creates_and_cleans_up(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_without_renameat2_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)
    for version in ("1", "2"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "v.txt").write_text(version)
    assert (tmp_path / "out" / "v.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644),
                                                          (0o077, 0o700, 0o600)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, mask, folder_mode,
                                                    file_mode):
    umask(mask)
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"w")
        os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes its files
        (tmp / "1_Pooling").mkdir(mode=0o700)
    atomic_write_text(tmp_path / "results.md", "x")
    with atomic_file(tmp_path / "chart.png", suffix=".png") as tmp:
        tmp.write_bytes(b"png")
    assert _mode(tmp_path / "model") == folder_mode
    assert _mode(tmp_path / "model" / "config.json") == file_mode
    assert _mode(tmp_path / "model" / "model.safetensors") == file_mode
    assert _mode(tmp_path / "model" / "1_Pooling") == folder_mode
    assert _mode(tmp_path / "results.md") == file_mode
    assert _mode(tmp_path / "chart.png") == file_mode


# ----------------------------------------------------------------------------- appender and lock

def test_appender_truncates_partial_line_left_by_a_kill(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"')
    with JsonlAppender(path) as out:
        out.append({"a": 3})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"a": 3}]


def test_appender_trims_a_partial_line_longer_than_its_read_block(tmp_path):
    path = tmp_path / "out.jsonl"
    long_tail = '{"text": "' + "x" * 200_000
    path.write_text('{"a": 1}\n' + long_tail)
    JsonlAppender(path).close()
    assert path.read_text() == '{"a": 1}\n'
    path.write_text(long_tail)  # no complete record at all
    JsonlAppender(path).close()
    assert path.read_text() == ""


def test_a_second_appender_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "out.jsonl"
    first = JsonlAppender(path)
    first.append({"a": 1})
    with pytest.raises(OutputLockedError, match=f"another process is writing {path}"):
        JsonlAppender(path)
    first.close()
    with JsonlAppender(path) as second:
        second.append({"a": 2})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]


def test_a_locked_file_is_not_trimmed(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n')
    with JsonlAppender(path):
        with path.open("a") as raw:  # the lock holder is mid-record
            raw.write('{"a": 2')
        with pytest.raises(OutputLockedError):
            JsonlAppender(path)
        assert path.read_text() == '{"a": 1}\n{"a": 2'


# ----------------------------------------------------------------------------- stale temporaries

def test_stale_temporaries_of_a_dead_writer_are_removed_and_a_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    target = tmp_path / "index"
    target.mkdir()
    stale_dir = tmp_path / f".index.{dead}.0123abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "vectors.npy").write_bytes(b"0" * 1000)
    stale_file = tmp_path / f".index.{dead}.89abcdef.tmp.png"
    stale_file.write_bytes(b"png")
    kept = [
        tmp_path / f".index.{live}.0123abcd.tmp",  # a running writer's work in progress
        tmp_path / ".index.1.0123abcd.tmp",  # pid 1 is alive
        tmp_path / f".index.{dead}.nothex00.tmp",  # not our naming
        tmp_path / ".index.notapid.0123abcd.tmp",
        tmp_path / f".other.{dead}.0123abcd.tmp",  # another target's
        tmp_path / f".index.v2.{dead}.0123abcd.tmp",  # target "index.v2"'s
    ]
    for path in kept:
        path.mkdir()
    assert clean_stale_temporaries(target) == 2
    assert not stale_dir.exists() and not stale_file.exists()
    assert all(path.exists() for path in kept)
    assert target.is_dir()


def test_a_dead_writers_old_copy_is_put_back_when_the_target_is_missing(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".model.{dead}.0123abcd.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    new = tmp_path / f".model.{dead}.fedcba98.tmp"
    new.mkdir()
    clean_stale_temporaries(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_writers_clean_up_after_a_killed_predecessor(tmp_path):
    dead = _dead_pid()
    for name in ("out", "f.txt"):
        (tmp_path / f".{name}.{dead}.0123abcd.tmp").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    atomic_write_text(tmp_path / "f.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "out"]


# ----------------------------------------------------------------------------- check_replaceable

def _ours(path: Path) -> bool:
    return (path / "index.json").is_file()


def test_check_replaceable_allows_absent_empty_ours_and_overwrite(tmp_path):
    check_replaceable(tmp_path / "absent", _ours, "index")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", _ours, "index")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "index.json").write_text("{}")
    check_replaceable(tmp_path / "ours", _ours, "index")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    check_replaceable(tmp_path / "mine", _ours, "index", overwrite=True)


def test_check_replaceable_refuses_a_foreign_folder_and_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(FolderNotOursError, match=r"mine is a non-empty folder that is not a "
                                                 r"saved index.*--overwrite"):
        check_replaceable(tmp_path / "mine", _ours, "index")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file exists and is not a folder"):
        check_replaceable(tmp_path / "file", _ours, "index", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
