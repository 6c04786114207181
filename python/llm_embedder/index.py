"""Vector index over embeddings: exact top-k (native Rust kernel) or approximate (hnswlib).

``Index`` maps your ids (``str`` or ``int``) to vectors and answers top-k queries with those ids
and their scores; the vectors live in a backend behind one small protocol (:class:`_Backend`:
add, search, save, load, len). The exact backend keeps one contiguous float32 matrix and scans
it with the native multi-threaded top-k; the ``hnsw`` backend builds an HNSW graph with hnswlib
for corpora where a full scan per query costs too much. Both save to a folder atomically
(:func:`llm_embedder.io.atomic_directory`): a crash leaves either the old index or the new one,
never half of one, and the temporaries a killed save left behind are removed by the next save
or load of the same folder. A save never replaces a non-empty folder that is not an index
unless asked to (``overwrite=True``).

Example:
    >>> import numpy as np
    >>> from llm_embedder import Index
    >>> index = Index(dim=3)
    >>> index.add(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    >>> index.search(np.array([0.9, 0.1, 0.0], dtype=np.float32), k=2).ids
    [['a', 'b']]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import (Any, Dict, List, Literal, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    Union)

import numpy as np
import numpy.typing as npt

from .io import atomic_directory, atomic_write_json, check_replaceable, clean_stale_temporaries

Id = Union[str, int]
PathLike = Union[str, "os.PathLike[str]"]
Backend = Literal["exact", "hnsw"]
Metric = Literal["cosine", "ip"]

FORMAT_NAME = "llm-embedder-index"
FORMAT_VERSION = 1
_META_FILE = "index.json"
_IDS_FILE = "ids.json"
_VECTORS_FILE = "vectors.npy"
_HNSW_FILE = "hnsw.bin"


class SearchResult(NamedTuple):
    """Top-k hits of a batch of queries, best first.

    ``ids[q][j]`` is the id of the j-th hit of query q and ``scores[q, j]`` its score (cosine
    similarity for ``metric="cosine"``, inner product for ``"ip"``), float32 of shape [Q, k].
    Unpacks as a tuple: ``ids, scores = index.search(queries, k)``.
    """

    ids: List[List[Id]]
    scores: npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_matrix(x: Any, name: str, dim: int) -> Tuple[npt.NDArray[np.float32], np.ndarray]:
    """A C-contiguous float32 [n, dim] view or copy of ``x`` and its squared row norms, or a
    ValueError naming ``name``."""
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D [dim] or 2-D [n, dim], got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, the index has dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # One pass gives the norms and the NaN/inf check: both propagate into the sum.
    squares: np.ndarray = np.einsum("ij,ij->i", arr, arr)
    odd = np.flatnonzero(~np.isfinite(squares))
    if odd.size:
        for row in odd.tolist():
            if not np.isfinite(arr[row]).all():
                raise ValueError(f"{name} row {row} holds NaN or inf")
        # finite rows whose squared norm overflows float32
        squares = squares.astype(np.float64)
        wide = arr[odd].astype(np.float64)
        squares[odd] = np.einsum("ij,ij->i", wide, wide)
    return arr, squares


def _inverse_norms(squares: np.ndarray, name: str) -> npt.NDArray[np.float32]:
    zero = np.flatnonzero(squares == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} is a zero vector: it has no cosine score")
    return (1.0 / np.sqrt(squares.astype(np.float64))).astype(np.float32)[:, None]


def _check_id(value: Any, position: int) -> Id:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"ids[{position}] is a bool; ids must be str or int")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"ids[{position}] has type {type(value).__name__}; ids must be str or int")


def _checked_ids(ids: Sequence[Any]) -> List[Id]:
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids.tolist()
    values = list(ids)
    if all(type(value) is str for value in values):  # the common case, without a call per id
        return values
    return [_check_id(value, i) for i, value in enumerate(values)]


def _read_matrix(path: Path, rows: int, dim: int) -> npt.NDArray[np.float32]:
    """Read a float32 [rows, dim] .npy file into a fresh buffer the index owns (huge pages,
    writable; no memory map that a later save could replace), or raise ValueError naming the
    file."""
    with open(path, "rb", buffering=0) as handle:
        try:
            major, _ = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
        except ValueError as exc:
            raise ValueError(f"{path}: not a .npy file ({exc})") from None
        if dtype != np.float32 or fortran or tuple(shape) != (rows, dim):
            raise ValueError(f"{path}: expected C-ordered float32 [{rows}, {dim}], got "
                             f"{dtype} {list(shape)}")
        data = np.empty((rows, dim), dtype=np.float32)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{path}: truncated ({done} of {len(view)} data bytes)")
            done += got
    return data


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _Backend(Protocol):
    """Where an Index keeps its vectors: rows ``0..len`` in insertion order.

    ``add`` takes rows already checked (finite, right dimension) with their inverse norms when
    the index normalises; ``search`` takes checked, normalised queries and ``1 <= k <= len``
    and returns (scores float32 [Q, k], rows int64 [Q, k]) best first.
    """

    def __len__(self) -> int: ...

    def add(self, matrix: npt.NDArray[np.float32],
            scale: Optional[npt.NDArray[np.float32]]) -> None: ...

    def search(self, queries: npt.NDArray[np.float32],
               k: int) -> Tuple[np.ndarray, np.ndarray]: ...

    def save(self, folder: Path) -> None: ...

    @classmethod
    def create(cls, index: "Index") -> "_Backend": ...

    @classmethod
    def load(cls, folder: Path, dim: int, count: int, settings: Dict[str, Any]
             ) -> "_Backend": ...


class _ExactBackend:
    """Every vector in one float32 buffer, scanned in full by the native top-k."""

    @classmethod
    def create(cls, index: "Index") -> "_ExactBackend":
        return cls(index.dim)

    def __init__(self, dim: int, data: Optional[npt.NDArray[np.float32]] = None) -> None:
        self.dim = dim
        # rows [0, count) of a buffer with spare capacity, so adds copy amortised O(1)
        self._data = np.empty((0, dim), dtype=np.float32) if data is None else data
        self._count = 0 if data is None else data.shape[0]

    def __len__(self) -> int:
        return self._count

    def add(self, matrix: npt.NDArray[np.float32],
            scale: Optional[npt.NDArray[np.float32]]) -> None:
        n, extra = self._count, matrix.shape[0]
        if n + extra > self._data.shape[0]:
            capacity = max(n + extra, 2 * self._data.shape[0])
            # A fresh numpy allocation, not ndarray.resize: numpy asks the kernel for huge pages
            # only on new large allocations, and a realloc-grown buffer without them streams
            # ~25 % slower in the memory-bound single-query search (measured at 1M x 384).
            grown = np.empty((capacity, self.dim), dtype=np.float32)
            grown[:n] = self._data[:n]
            self._data = grown
        if scale is None:
            self._data[n:n + extra] = matrix
        else:  # normalise straight into the buffer: no temporary copy of the batch
            np.multiply(matrix, scale, out=self._data[n:n + extra])
        self._count = n + extra

    def search(self, queries: npt.NDArray[np.float32], k: int) -> Tuple[np.ndarray, np.ndarray]:
        from . import _native

        return _native.topk(queries, self._data[:self._count], k)

    def save(self, folder: Path) -> None:
        with open(folder / _VECTORS_FILE, "wb") as handle:
            np.save(handle, self._data[:self._count], allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, dim: int, count: int, settings: Dict[str, Any]
             ) -> "_ExactBackend":
        vectors_path = folder / _VECTORS_FILE
        if not vectors_path.is_file():
            raise FileNotFoundError(f"{vectors_path} not found")
        return cls(dim, _read_matrix(vectors_path, count, dim))


class _HnswBackend:
    """An hnswlib HNSW graph in its inner-product space (approximate search)."""

    @classmethod
    def create(cls, index: "Index") -> "_HnswBackend":
        return cls(index.dim, index.hnsw_m, index.ef_construction, index.ef_search, index.seed)

    def __init__(self, dim: int, hnsw_m: int, ef_construction: int, ef_search: int, seed: int,
                 graph: Any = None) -> None:
        self.dim = dim
        self.ef_search = ef_search
        if graph is None:
            import hnswlib

            graph = hnswlib.Index(space="ip", dim=dim)
            graph.init_index(max_elements=1024, ef_construction=ef_construction, M=hnsw_m,
                             random_seed=seed)
        graph.set_ef(ef_search)
        self._graph = graph

    def __len__(self) -> int:
        return int(self._graph.get_current_count())

    def add(self, matrix: npt.NDArray[np.float32],
            scale: Optional[npt.NDArray[np.float32]]) -> None:
        if scale is not None:
            matrix = matrix * scale
        start = len(self)
        needed = start + matrix.shape[0]
        capacity = self._graph.get_max_elements()
        if needed > capacity:
            self._graph.resize_index(max(needed, 2 * capacity))
        self._graph.add_items(matrix, np.arange(start, needed, dtype=np.int64))

    def search(self, queries: npt.NDArray[np.float32], k: int) -> Tuple[np.ndarray, np.ndarray]:
        graph = self._graph
        graph.set_ef(max(self.ef_search, k))
        try:
            labels, distances = graph.knn_query(queries, k=k)
        except RuntimeError:
            # A beam narrower than the graph can strand a query with fewer than k hits when
            # k is close to the size; a beam as wide as the index always reaches k.
            graph.set_ef(len(self))
            labels, distances = graph.knn_query(queries, k=k)
        finally:
            graph.set_ef(self.ef_search)
        # hnswlib's "ip" space returns 1 - <q, v>
        scores = 1.0 - distances
        if not np.isfinite(scores).all():
            # the exact backend refuses these too: an overflowing score ranks nothing
            qi, j = (int(x[0]) for x in np.nonzero(~np.isfinite(scores)))
            raise ValueError(
                f"the inner product of queries row {qi} and keys row {int(labels[qi, j])} "
                f"overflows float32; normalise the vectors (cosine scores) or scale them down")
        return scores, labels.astype(np.int64)

    def save(self, folder: Path) -> None:
        self._graph.save_index(os.fspath(folder / _HNSW_FILE))

    @classmethod
    def load(cls, folder: Path, dim: int, count: int, settings: Dict[str, Any]
             ) -> "_HnswBackend":
        import hnswlib

        graph_path = folder / _HNSW_FILE
        if not graph_path.is_file():
            raise FileNotFoundError(f"{graph_path} not found")
        graph = hnswlib.Index(space="ip", dim=dim)
        graph.load_index(os.fspath(graph_path), max_elements=max(count, 1))
        if graph.get_current_count() != count:
            raise ValueError(f"{graph_path}: holds {graph.get_current_count()} vectors, "
                             f"{folder / _META_FILE} says {count}")
        return cls(dim, settings["hnsw_m"], settings["ef_construction"],
                   settings["ef_search"], settings["seed"], graph=graph)


#: Index backends by name: one class each (create / add / search / save / load).
_BACKENDS: Dict[str, Any] = {"exact": _ExactBackend, "hnsw": _HnswBackend}


def is_saved_index(folder: PathLike) -> bool:
    """Whether ``folder`` holds an index of ours (its ``index.json`` names our format)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / _META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


class Index:
    """Top-k search over vectors keyed by your ids: ``exact`` (native) or ``hnsw`` (hnswlib).

    Args:
        dim: vector dimension.
        backend: ``"exact"`` scans every vector with the native multi-threaded top-k (no
            recall loss); ``"hnsw"`` searches an HNSW graph (approximate, for large corpora).
        metric: ``"cosine"`` (vectors and queries are L2-normalised) or ``"ip"`` (raw inner
            product).
        normalize: whether to L2-normalise vectors and queries. ``None`` means ``True`` for
            cosine and ``False`` for ``ip``. ``False`` with cosine trusts that the inputs are
            unit length already (as :class:`~llm_embedder.Embedder` output is) and skips a copy.
        hnsw_m, ef_construction: HNSW graph degree and build-time beam width.
        ef_search: HNSW search beam width; raised to ``k`` when a search asks for more.
        seed: random seed of the HNSW level assignment.

    ``search`` always returns a :class:`SearchResult` with one row per query (a single 1-D
    query is one row too).

    Example:
        >>> index = Index(384, backend="hnsw")
        >>> index.add(keys, [p.id for p in corpus])
        >>> ids, scores = index.search(queries, k=10)
    """

    def __init__(
        self,
        dim: int,
        backend: Backend = "exact",
        metric: Metric = "cosine",
        normalize: Optional[bool] = None,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
        if metric not in ("cosine", "ip"):
            raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim = int(dim)
        self.backend: Backend = backend
        self.metric: Metric = metric
        self.normalize = (metric == "cosine") if normalize is None else bool(normalize)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.seed = int(seed)
        self._ids: List[Id] = []
        # id -> row, built on first need: a loaded index only searches until it is added to
        self._row_of: Optional[Dict[Id, int]] = {}
        self._store: _Backend = _BACKENDS[backend].create(self)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"Index(dim={self.dim}, backend={self.backend!r}, metric={self.metric!r}, "
                f"size={len(self)})")

    @property
    def ids(self) -> List[Id]:
        """The ids in insertion order (a copy)."""
        return list(self._ids)

    def __contains__(self, item: object) -> bool:
        return item in self._rows()

    def _rows(self) -> Dict[Id, int]:
        if self._row_of is None:
            self._row_of = {value: i for i, value in enumerate(self._ids)}
        return self._row_of

    def add(self, vectors: Any, ids: Sequence[Id]) -> None:
        """Add ``vectors`` [n, dim] (or one [dim] vector) under ``ids`` (str or int, unique).

        Nothing is added when any check fails: dimension, NaN/inf, zero vectors under cosine,
        ``len(ids)`` against the rows, duplicates within ``ids`` or against the index.

        Example:
            >>> index.add(model.encode_keys([p.text for p in corpus], task="qa"),
            ...           [p.id for p in corpus])
        """
        matrix, squares = _as_matrix(vectors, "vectors", self.dim)
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise ValueError("ids must be a sequence of str or int, one per vector row")
        if len(ids) != matrix.shape[0]:
            raise ValueError(f"got {matrix.shape[0]} vectors but {len(ids)} ids")
        new_ids = _checked_ids(ids)
        positions = {value: i for i, value in enumerate(new_ids)}
        if len(positions) != len(new_ids):
            _raise_on_duplicate(new_ids)
        rows = self._rows()
        if not rows.keys().isdisjoint(positions):
            i = next(i for i, value in enumerate(new_ids) if value in rows)
            raise ValueError(f"ids[{i}]={new_ids[i]!r} is already in the index")
        if matrix.shape[0] == 0:
            return
        scale = _inverse_norms(squares, "vectors") if self.normalize else None
        start = len(self._ids)
        self._store.add(matrix, scale)
        rows.update(zip(new_ids, range(start, start + len(new_ids))))
        self._ids.extend(new_ids)

    # ---- search ---------------------------------------------------------------------------

    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """The ``k`` best ids and scores for each query, best first.

        ``queries`` is [Q, dim] or one [dim] vector (then Q = 1); the result always has Q rows.
        Raises ValueError for an empty index, ``k < 1``, ``k > len(index)``, a dimension
        mismatch, NaN/inf queries, or scores that overflow float32 (``metric="ip"`` with huge
        vectors), whichever the backend.

        Example:
            >>> ids, scores = index.search(model.encode_queries(["who won?"], task="qa"), k=5)
            >>> ids[0][0], float(scores[0, 0])
        """
        if len(self) == 0:
            raise ValueError("search on an empty index: add vectors first")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise ValueError(f"k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the index ({len(self)} vectors)")
        matrix, squares = _as_matrix(queries, "queries", self.dim)
        if self.normalize:
            matrix = matrix * _inverse_norms(squares, "queries")
        if matrix.shape[0] == 0:
            return SearchResult([], np.empty((0, int(k)), dtype=np.float32))
        scores, rows = self._store.search(matrix, int(k))
        ids = self._ids
        return SearchResult([[ids[r] for r in row] for row in rows.tolist()],
                            np.asarray(scores, dtype=np.float32))

    # ---- persistence ----------------------------------------------------------------------

    def _meta(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "backend": self.backend,
            "metric": self.metric,
            "normalize": self.normalize,
            "count": len(self),
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "seed": self.seed,
        }

    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """Write the index to folder ``path`` atomically, replacing an index saved there.

        The folder holds ``index.json`` (settings), ``ids.json`` and ``vectors.npy`` (exact) or
        ``hnsw.bin`` (hnsw). It is built under a temporary sibling name, fsynced and swapped in.
        A non-empty folder that is not a saved index is refused (FolderNotOursError naming it)
        unless ``overwrite=True``.

        Example:
            >>> index.save("runs/qa-index"); Index.load("runs/qa-index")
        """
        check_replaceable(path, is_saved_index, "index", overwrite)
        with atomic_directory(path) as tmp:
            with open(tmp / _IDS_FILE, "w", encoding="utf-8") as handle:
                json.dump(self._ids, handle, ensure_ascii=False)
            self._store.save(tmp)
            # written last: a folder with index.json is a complete one
            with open(tmp / _META_FILE, "w", encoding="utf-8") as handle:
                json.dump(self._meta(), handle, indent=2)

    @classmethod
    def load(cls, path: PathLike) -> "Index":
        """Read an index written by :meth:`save`.

        Raises FileNotFoundError naming the missing file and ValueError naming the file whose
        content disagrees with ``index.json`` (including ids that repeat).

        Example:
            >>> index = Index.load("runs/qa-index"); len(index)
        """
        root = Path(path)
        clean_stale_temporaries(root)  # a save killed mid-way left its temporary folder
        if not root.is_dir():
            raise FileNotFoundError(f"no index folder at {root}")
        meta_path = root / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {root} is not a saved Index")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{meta_path}: 'format' is {meta.get('format')!r}, "
                             f"expected {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported version {meta.get('version')!r}")
        try:
            index = cls(meta["dim"], backend=meta["backend"], metric=meta["metric"],
                        normalize=meta["normalize"], hnsw_m=meta["hnsw_m"],
                        ef_construction=meta["ef_construction"], ef_search=meta["ef_search"],
                        seed=meta["seed"])
            count = int(meta["count"])
        except KeyError as exc:
            raise ValueError(f"{meta_path}: field {exc.args[0]!r} is missing") from None

        ids_path = root / _IDS_FILE
        if not ids_path.is_file():
            raise FileNotFoundError(f"{ids_path} not found")
        try:
            ids = json.loads(ids_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ids_path}: not valid JSON ({exc})") from None
        if not isinstance(ids, list) or len(ids) != count:
            raise ValueError(f"{ids_path}: expected a list of {count} ids")
        index._ids = _checked_ids(ids)
        if len(set(index._ids)) != count:
            _raise_on_duplicate(index._ids, f"{ids_path}: ")
        index._row_of = None
        index._store = _BACKENDS[index.backend].load(root, index.dim, count, meta)
        return index


def _raise_on_duplicate(ids: List[Id], where: str = "") -> None:
    """ValueError naming the first id of ``ids`` that repeats an earlier one (``where``, e.g.
    the file, prefixes the message)."""
    seen: Dict[Id, int] = {}
    for i, value in enumerate(ids):
        if value in seen:
            raise ValueError(f"{where}ids[{i}]={value!r} repeats ids[{seen[value]}]")
        seen[value] = i


SOURCE_FILE = "source.json"


def write_source(folder: PathLike, task: str, model: str, corpus: PathLike) -> None:
    """Record beside a saved index which task, model and corpus built it (atomically, with
    absolute paths), so a later search encodes queries with the same model.

    Example:
        >>> write_source("runs/index", "qa", "/abs/runs/model", "corpus.jsonl")
    """
    atomic_write_json(Path(folder) / SOURCE_FILE, {
        "task": task, "model": model, "corpus": str(Path(corpus).resolve())})


def read_source(folder: PathLike) -> Dict[str, Any]:
    """The ``source.json`` of a saved index (task, model, corpus), or {} where there is none;
    a ValueError naming the file when it is not a JSON object.

    Example:
        >>> read_source("runs/index").get("model")
    """
    source = Path(folder) / SOURCE_FILE
    if not source.is_file():
        return {}
    try:
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: expected a JSON object with task, model and corpus")
    return meta
