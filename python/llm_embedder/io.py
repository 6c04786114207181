"""Every file and folder the package writes goes through here: atomic, fsynced, umask-honouring.

A crash (kill -9, power loss) at any instant leaves either the old version or the new one on
disk, never a torn one, and the temporaries a killed writer left behind are removed by the next
writer of the same target. Temporaries are named ``.<target>.<pid>.<random>.tmp`` so a cleaner
can tell its own stale ones (dead writer) from a live writer's.

Example:
    >>> from llm_embedder.io import atomic_write_json, atomic_directory
    >>> atomic_write_json("out/results.json", {"qa": 0.9})
    >>> with atomic_directory("out/model") as tmp:
    ...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def _temp_name(target: Path, suffix: str = ".tmp") -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


# what follows ".<target name>." in a temporary's name: pid, 8 hex digits, tmp|old, and the
# extension atomic_file may add (e.g. ".png")
_TEMP_TAIL = re.compile(r"(\d+)\.[0-9a-f]{8}\.(tmp|old)(\.[^/]*)?")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(target: PathLike) -> int:
    """Remove temporaries of ``target`` left by writers that no longer run; returns how many.

    Only names of our own pattern (``.<name>.<pid>.<8 hex>.tmp|.old[.<ext>]``) whose pid is
    dead are touched, so a concurrent writer's work in progress is never removed. When
    ``target`` itself is missing and a dead writer's ``.old`` copy exists (it was killed between
    moving the old version aside and moving the new one in, where the OS cannot swap two paths
    atomically), that old version is put back instead of being removed.

    Example:
        >>> clean_stale_temporaries("runs/qa-index")  # before reading or writing it
        0
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return 0
    prefix = f".{target.name}."
    removed = 0
    for entry in sorted(parent.iterdir()):
        name = entry.name
        match = _TEMP_TAIL.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed += 1
    return removed


def fsync_path(path: PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes the renames inside it durable).

    Example:
        >>> fsync_path("out")  # after renaming a file into out/
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and folder under ``root`` (before the tree is renamed into place).

    Example:
        >>> fsync_tree("out/.model.123.0a1b2c3d.tmp")
    """
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The new file gets the permissions a plain ``open(path, "w")`` would (0666 minus the umask).

    Example:
        >>> atomic_write_bytes("out/vectors.bin", b"\\x00\\x01")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8.

    Example:
        >>> atomic_write_text("out/results.md", "| task | ndcg |\\n")
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (UTF-8, not ASCII-escaped).

    Example:
        >>> atomic_write_json("out/results.json", {"qa": 0.9})
    """
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: PathLike, records: Sequence[Dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically, one JSON object a line.

    Example:
        >>> write_jsonl("out/queries.jsonl", [{"id": "q1", "text": "who?"}])
    """
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (by any library); swapped in, fsynced,
    once the block ends without an error. ``suffix`` keeps an extension a writer looks at (e.g.
    ``.png`` for matplotlib).

    Example:
        >>> with atomic_file("out/training.png", suffix=".png") as tmp:
        ...     fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = _temp_name(path)
    tmp = tmp.with_name(tmp.name + suffix)  # .<name>.<pid>.<hex>.tmp<suffix>
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class OutputLockedError(RuntimeError):
    """Another process holds the exclusive lock on an output file."""


class JsonlAppender:
    """Appends one JSON object a line, flushed and fsynced, for resumable outputs.

    With ``lock`` (the default) the file is locked exclusively for as long as the appender is
    open: a second writer gets :class:`OutputLockedError` at once instead of interleaving
    duplicate records. Only then is a trailing partial line (left by a kill mid-write) cut off,
    so the file always ends on a complete record and a later run never trips over it.

    Example:
        >>> with JsonlAppender("out/labelled.jsonl") as out:
        ...     out.append({"query_id": "q1", "rewards": [0.9, 0.1]})
    """

    def __init__(self, path: PathLike, *, lock: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a+b")
        try:
            if lock:
                self._lock()
            self.trim_partial_line()
        except BaseException:
            self._handle.close()
            raise

    def _lock(self) -> None:
        import fcntl

        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(
                    f"another process is writing {self.path}; wait for it to finish or "
                    f"write to another file") from None
            raise

    def trim_partial_line(self) -> None:
        """Cut a trailing line that has no newline (a record a killed writer left half done).

        Only the tail is read, a block at a time from the end, whatever the file's size.

        Example:
            >>> JsonlAppender("out/labelled.jsonl").trim_partial_line()
        """
        handle = self._handle
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return
        handle.seek(end - 1)
        if handle.read(1) == b"\n":
            return
        keep = 0  # no newline at all: the whole file is one partial record
        position = end
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            newline = handle.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())

    def append(self, record: Dict[str, Any]) -> None:
        """Write ``record`` as one line, flushed and fsynced before returning.

        Example:
            >>> out.append({"query_id": "q2", "rewards": [0.4]})
        """
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file, releasing the lock.

        Example:
            >>> out.close()
        """
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


class FolderNotOursError(FileExistsError):
    """A write would replace a folder that holds something other than our own output."""


def check_replaceable(path: PathLike, is_ours: Callable[[Path], bool], what: str,
                      overwrite: bool = False) -> None:
    """Refuse to replace ``path`` unless it is absent, empty, one of ours, or ``overwrite``.

    ``is_ours(path)`` says whether the folder is a previous output of the same kind (``what``,
    e.g. "index" or "model"), which may be replaced without asking.

    Example:
        >>> check_replaceable("runs/qa-index", lambda p: (p / "index.json").is_file(), "index")
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: choose another path")
    if overwrite or not any(path.iterdir()) or is_ours(path):
        return
    raise FolderNotOursError(
        f"{path} is a non-empty folder that is not a saved {what}: refusing to replace it "
        f"(choose another path, or pass overwrite=True / --overwrite to replace it)")


def _apply_umask(root: Path) -> None:
    """Give everything under ``root`` the modes ``mkdir``/``open`` would (0777/0666 minus the
    umask): some writers (safetensors, mkstemp-based libraries) create 0600 files, which would
    make a shared model or index folder unreadable to the group it is meant for."""
    mask = os.umask(0o022)
    os.umask(mask)
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and swap it in only once it is complete.

    Files written into the yielded folder are fsynced, then the folder replaces ``path``
    (atomically where the OS has ``renameat2``; otherwise the old folder is moved aside first, so
    at every instant one complete version exists on disk). An exception inside the block removes
    the temporary folder and leaves ``path`` untouched; temporaries of a killed earlier writer
    are removed first. The new folder honours the umask like ``mkdir`` would. Callers that must
    not replace foreign folders call :func:`check_replaceable` first.

    Example:
        >>> with atomic_directory("out/model") as tmp:
        ...     (tmp / "config.json").write_text("{}")
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = _temp_name(path)
    tmp.mkdir(mode=0o777)  # mkdir applies the umask, unlike mkdtemp's fixed 0700
    try:
        yield tmp
        _apply_umask(tmp)
        fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now holds the old version
        else:
            old = _temp_name(path, ".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "FolderNotOursError",
    "JsonlAppender",
    "OutputLockedError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_replaceable",
    "clean_stale_temporaries",
    "fsync_path",
    "fsync_tree",
    "write_jsonl",
]
