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
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_name(target: Path, suffix: str = ".tmp") -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


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

    Only names of our own pattern (``.<name>.<pid>.<hex>.tmp|.old``) whose pid is dead are
    touched, so a concurrent writer's work in progress is never removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return 0
    prefix = f".{target.name}."
    removed = 0
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split(".")
        if len(parts) < 3 or not parts[0].isdigit() or parts[2] not in ("tmp", "old"):
            continue
        if _pid_alive(int(parts[0])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed += 1
    return removed


def fsync_path(path: PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The new file gets the permissions a plain ``open(path, "w")`` would (0666 minus the umask).
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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: PathLike, records: Sequence[Dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically."""
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
    """

    def __init__(self, path: PathLike, *, lock: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a+b")
        if lock:
            import fcntl

            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                self._handle.close()
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputLockedError(
                        f"another process is writing {self.path}; wait for it to finish or "
                        f"write to another file") from None
                raise
        self.trim_partial_line()

    def trim_partial_line(self) -> None:
        self._handle.seek(0, os.SEEK_END)
        size = self._handle.tell()
        if size == 0:
            return
        self._handle.seek(0)
        raw = self._handle.read()
        if not raw.endswith(b"\n"):
            self._handle.truncate(raw.rfind(b"\n") + 1)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def append(self, record: Dict[str, Any]) -> None:
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()  # closing releases the lock

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


def default_file_mode() -> int:
    """0666 minus the umask: what a file created by ``open`` gets."""
    return 0o666 & ~_umask()


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
    "default_file_mode",
]
