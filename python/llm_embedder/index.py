"""Vector index over embeddings: exact top-k (native Rust kernel) or approximate (hnswlib).

``Index`` maps your ids (``str`` or ``int``) to vectors and answers top-k queries with those ids
and their scores. The exact backend keeps one contiguous float32 matrix and scans it with the
native multi-threaded top-k; the ``hnsw`` backend builds an HNSW graph with hnswlib for corpora
where a full scan per query costs too much. Both save to a folder atomically: the folder is
written under a temporary sibling name, fsynced, then swapped in, so a crash leaves either the
old index or the new one, never half of one.

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
from typing import (Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import numpy.typing as npt

from .io import atomic_directory

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
        if backend not in ("exact", "hnsw"):
            raise ValueError(f"backend must be 'exact' or 'hnsw', got {backend!r}")
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
        # exact: rows [0, len) of a buffer with spare capacity, so adds copy amortised O(1)
        self._data = np.empty((0, self.dim), dtype=np.float32)
        self._hnsw: Any = None
        if backend == "hnsw":
            self._hnsw = self._new_hnsw(capacity=1024)

    # ---- construction ---------------------------------------------------------------------

    def _new_hnsw(self, capacity: int) -> Any:
        import hnswlib

        graph = hnswlib.Index(space="ip", dim=self.dim)
        graph.init_index(max_elements=capacity, ef_construction=self.ef_construction,
                         M=self.hnsw_m, random_seed=self.seed)
        graph.set_ef(self.ef_search)
        return graph

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
            seen: Dict[Id, int] = {}
            for i, value in enumerate(new_ids):
                if value in seen:
                    raise ValueError(f"ids[{i}]={value!r} repeats ids[{seen[value]}]")
                seen[value] = i
        rows = self._rows()
        if not rows.keys().isdisjoint(positions):
            i = next(i for i, value in enumerate(new_ids) if value in rows)
            raise ValueError(f"ids[{i}]={new_ids[i]!r} is already in the index")
        if matrix.shape[0] == 0:
            return
        scale = _inverse_norms(squares, "vectors") if self.normalize else None
        start = len(self._ids)
        if self.backend == "exact":
            self._append_exact(matrix, scale)
        else:
            self._append_hnsw(matrix if scale is None else matrix * scale, start)
        rows.update(zip(new_ids, range(start, start + len(new_ids))))
        self._ids.extend(new_ids)

    def _append_exact(self, matrix: npt.NDArray[np.float32],
                      scale: Optional[npt.NDArray[np.float32]]) -> None:
        n, extra = len(self._ids), matrix.shape[0]
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

    def _append_hnsw(self, matrix: npt.NDArray[np.float32], start: int) -> None:
        needed = start + matrix.shape[0]
        capacity = self._hnsw.get_max_elements()
        if needed > capacity:
            self._hnsw.resize_index(max(needed, 2 * capacity))
        labels = np.arange(start, needed, dtype=np.int64)
        self._hnsw.add_items(matrix, labels)

    # ---- search ---------------------------------------------------------------------------

    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """The ``k`` best ids and scores for each query, best first.

        ``queries`` is [Q, dim] or one [dim] vector (then Q = 1); the result always has Q rows.
        Raises ValueError for an empty index, ``k < 1``, ``k > len(index)``, a dimension
        mismatch or NaN/inf queries.

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
        if self.backend == "exact":
            from . import _native

            scores, rows = _native.topk(matrix, self._data[:len(self)], int(k))
        else:
            scores, rows = self._search_hnsw(matrix, int(k))
        ids = self._ids
        return SearchResult([[ids[r] for r in row] for row in rows.tolist()],
                            np.asarray(scores, dtype=np.float32))

    def _search_hnsw(self, matrix: npt.NDArray[np.float32], k: int) -> Any:
        self._hnsw.set_ef(max(self.ef_search, k))
        try:
            labels, distances = self._hnsw.knn_query(matrix, k=k)
        except RuntimeError:
            # A beam narrower than the graph can strand a query with fewer than k hits when
            # k is close to the size; a beam as wide as the index always reaches k.
            self._hnsw.set_ef(len(self))
            labels, distances = self._hnsw.knn_query(matrix, k=k)
        finally:
            self._hnsw.set_ef(self.ef_search)
        # hnswlib's "ip" space returns 1 - <q, v>
        return 1.0 - distances, labels.astype(np.int64)

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

    def save(self, path: PathLike) -> None:
        """Write the index to folder ``path`` atomically (replacing any index already there).

        The folder holds ``index.json`` (settings), ``ids.json`` and ``vectors.npy`` (exact) or
        ``hnsw.bin`` (hnsw). It is built under a temporary sibling name, fsynced and swapped in.

        Example:
            >>> index.save("runs/qa-index"); Index.load("runs/qa-index")
        """
        with atomic_directory(path) as tmp:
            with open(tmp / _IDS_FILE, "w", encoding="utf-8") as handle:
                json.dump(self._ids, handle, ensure_ascii=False)
            if self.backend == "exact":
                with open(tmp / _VECTORS_FILE, "wb") as handle:
                    np.save(handle, self._data[:len(self)], allow_pickle=False)
            else:
                self._hnsw.save_index(os.fspath(tmp / _HNSW_FILE))
            # written last: a folder with index.json is a complete one
            with open(tmp / _META_FILE, "w", encoding="utf-8") as handle:
                json.dump(self._meta(), handle, indent=2)

    @classmethod
    def load(cls, path: PathLike) -> "Index":
        """Read an index written by :meth:`save`.

        Raises FileNotFoundError naming the missing file and ValueError naming the file whose
        content disagrees with ``index.json``.

        Example:
            >>> index = Index.load("runs/qa-index"); len(index)
        """
        root = Path(path)
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
        index._row_of = None

        if index.backend == "exact":
            vectors_path = root / _VECTORS_FILE
            if not vectors_path.is_file():
                raise FileNotFoundError(f"{vectors_path} not found")
            index._data = _read_matrix(vectors_path, count, index.dim)
        else:
            import hnswlib

            graph_path = root / _HNSW_FILE
            if not graph_path.is_file():
                raise FileNotFoundError(f"{graph_path} not found")
            graph = hnswlib.Index(space="ip", dim=index.dim)
            graph.load_index(os.fspath(graph_path), max_elements=max(count, 1))
            if graph.get_current_count() != count:
                raise ValueError(f"{graph_path}: holds {graph.get_current_count()} vectors, "
                                 f"{meta_path} says {count}")
            graph.set_ef(index.ef_search)
            index._hnsw = graph
        return index
