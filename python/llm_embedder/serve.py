"""HTTP embedding server: OpenAI and text-embeddings-inference endpoints, search, metrics.

``create_app`` builds a FastAPI app around one :class:`~llm_embedder.Embedder` (and optionally
one saved :class:`~llm_embedder.Index`); ``run`` serves it with uvicorn on the loopback by
default. Endpoints:

- ``POST /v1/embeddings``: OpenAI shape, plus ``task`` and ``input_type`` (query|document);
- ``POST /embed``: text-embeddings-inference shape, with ``prompt_name`` (``query``,
  ``document``, ``<task>_query``, ``<task>_key``);
- ``POST /search``: top-k ids, scores and texts from the saved index;
- ``GET /health`` and ``GET /metrics`` (Prometheus).

Concurrent requests are micro-batched: each encoder worker (2 on a CPU by default, 1 on a GPU)
takes queued requests until its batch is full (``max_batch_size`` texts, or its share of the
texts in flight) or ``max_wait_ms`` has passed, encodes them in one call in its own thread, and
answers every request. Errors are JSON ``{"error": {"message", "type"}}`` with a 4xx status for
anything the client can fix. On SIGTERM uvicorn stops accepting connections, lets in-flight
requests finish, then the workers drain the queue and the process exits with status 0.

Needs the ``serve`` extra (``pip install 'llm-embedder[serve]'``): fastapi, uvicorn,
prometheus-client. This module imports them only when an app is built, so the CLI stays fast.

Example:
    >>> from llm_embedder.serve import create_app
    >>> from fastapi.testclient import TestClient
    >>> with TestClient(create_app()) as client:
    ...     body = client.post("/v1/embeddings", json={"input": ["Who wrote Hamlet?"]}).json()
    >>> len(body["data"][0]["embedding"])
    384
"""

# No `from __future__ import annotations`: FastAPI reads the request models from the handlers'
# annotations at runtime, and those models are defined inside a function (lazy imports).

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Tokens per text, instruction included (as Embedder.encode's default); longer texts are cut.
MAX_TOKENS = 256
_ENDPOINTS = ("/v1/embeddings", "/embed", "/search", "/health", "/metrics")
_EXTRA_HINT = "pip install 'llm-embedder[serve]'"


class ApiError(Exception):
    """A request the client can fix: answered with ``status`` and a JSON error body.

    Example:
        >>> raise ApiError(413, "input has 300 items; the limit is 256", "payload_too_large")
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_body(message: str, kind: str) -> Dict[str, Any]:
    """The JSON error body of every non-2xx answer (the OpenAI shape).

    Example:
        >>> error_body("unknown task 'x'", "invalid_request_error")["error"]["type"]
        'invalid_request_error'
    """
    return {"error": {"message": message, "type": kind}}


# --------------------------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    texts: List[str]
    prefix: str
    normalize: bool
    future: "asyncio.Future[Tuple[Any, List[int]]]"
    queued_at: float  # loop.time() at submit: the max wait counts from here


class _Stop:
    """Queued after the last job: the worker finishes everything before it, then returns."""


EncodeGroup = Callable[[List[str], str, bool], Tuple[Any, List[int]]]


class MicroBatcher:
    """Funnels concurrent encode requests through ``encoders`` encoder threads, several
    requests per call.

    ``encode_group(texts, prefix, normalize) -> (vectors [n, dim], token counts)`` runs in a
    thread. An idle encoder takes the first queued job, then keeps taking jobs until its batch
    is full or ``max_wait_ms`` has passed since the first one was queued: under load, jobs that
    already waited that long for a busy encoder go at once with everything queued behind them,
    without waiting again. A batch is full at ``max_batch_size`` texts, or, with several
    encoders, at its share of the texts in flight (``ceil(in flight / encoders)``), so that
    16 concurrent requests keep two encoders busy with 8 each instead of one with 16 while the
    other waits. Jobs with the same instruction prefix and normalisation are encoded in one
    call. With ``batching=False`` every job is encoded on its own (one request per forward
    pass). ``on_batch(n_texts)`` is called once per batch (the batch-size metric);
    ``thread_init()`` once in each encoder thread, before its first job.

    Example:
        >>> batcher = MicroBatcher(encode_group, max_batch_size=32, max_wait_ms=5)
        >>> await batcher.start(); vectors, tokens = await batcher.submit(["hi"], "", True)
        >>> await batcher.stop()
    """

    def __init__(self, encode_group: EncodeGroup, *, max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, batching: bool = True, encoders: int = 1,
                 on_batch: Optional[Callable[[int], None]] = None,
                 thread_init: Optional[Callable[[], None]] = None) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if not isinstance(encoders, int) or encoders < 1:
            raise ValueError(f"encoders must be a positive int, got {encoders!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.encode_group = encode_group
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self.encoders = encoders
        self.on_batch = on_batch
        self.thread_init = thread_init
        self._queue: Optional["asyncio.Queue[Union[_Job, _Stop]]"] = None
        self._workers: List["asyncio.Task[None]"] = []
        # One single-thread executor per encoder, always the same thread: OpenMP keeps torch's
        # worker threads per calling thread, so a rotating caller (asyncio.to_thread's pool)
        # would keep several sets of them.
        self._executors: List[ThreadPoolExecutor] = []
        self._in_flight = 0  # texts submitted and not yet answered

    @property
    def running(self) -> bool:
        """Whether the workers are accepting jobs."""
        return bool(self._workers) and not any(worker.done() for worker in self._workers)

    async def start(self) -> None:
        """Start the workers on the running event loop."""
        self._queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"llm-embedder-encode-{i}",
                                              initializer=self.thread_init)
                           for i in range(self.encoders)]
        self._workers = [loop.create_task(self._run(executor)) for executor in self._executors]

    async def stop(self) -> None:
        """Encode every job queued so far, then stop the workers."""
        if self._queue is None or not self._workers:
            return
        for _ in self._workers:  # each worker takes one marker, after every job before it
            self._queue.put_nowait(_Stop())
        await asyncio.gather(*self._workers)
        self._queue, self._workers = None, []
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._executors = []

    async def submit(self, texts: List[str], prefix: str, normalize: bool) -> Tuple[Any, List[int]]:
        """Queue ``texts`` and wait for their vectors and token counts."""
        if self._queue is None or not self.running:
            raise ApiError(503, "the encoder is not running (the server is starting or "
                                "shutting down); retry shortly", "unavailable")
        loop = asyncio.get_running_loop()
        future: "asyncio.Future[Tuple[Any, List[int]]]" = loop.create_future()
        self._queue.put_nowait(_Job(texts, prefix, normalize, future, loop.time()))
        self._in_flight += len(texts)
        try:
            return await future
        finally:
            self._in_flight -= len(texts)

    def _batch_limit(self) -> int:
        if self.encoders == 1:
            return self.max_batch_size
        share = -(-self._in_flight // self.encoders)
        return max(1, min(self.max_batch_size, share))

    async def _run(self, executor: ThreadPoolExecutor) -> None:
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        # A get() that timed out stays pending and is reused: cancelling it could drop a job.
        getter: Optional["asyncio.Future[Union[_Job, _Stop]]"] = None

        async def next_item(timeout: Optional[float]) -> Optional[Union[_Job, _Stop]]:
            nonlocal getter
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=timeout)
            if not done:
                return None
            item, getter = getter.result(), None
            return item

        def next_nowait() -> Optional[Union[_Job, _Stop]]:
            # Safe beside a pending getter: a get() woken for an item taken here waits again.
            try:
                return queue.get_nowait()
            except asyncio.QueueEmpty:
                return None

        stopping = False
        while not stopping:
            first = await next_item(None)
            if isinstance(first, _Stop) or first is None:
                break
            batch, size = [first], len(first.texts)
            deadline = first.queued_at + self.max_wait_s
            while self.batching and size < self._batch_limit():
                item = next_nowait()
                if item is None:
                    left = deadline - loop.time()
                    item = await next_item(left) if left > 0 else None
                if item is None:
                    break
                if isinstance(item, _Stop):
                    stopping = True
                    break
                batch.append(item)
                size += len(item.texts)
            await self._encode(batch, executor)
        if getter is not None:
            getter.cancel()

    async def _encode(self, batch: List[_Job], executor: ThreadPoolExecutor) -> None:
        live = [job for job in batch if not job.future.done()]  # skip cancelled requests
        if not live:
            return
        groups: Dict[Tuple[str, bool], List[_Job]] = {}
        for job in live:
            groups.setdefault((job.prefix, job.normalize), []).append(job)
        if self.on_batch is not None:
            self.on_batch(sum(len(job.texts) for job in live))

        def work() -> List[Tuple[List[_Job], Any]]:
            out: List[Tuple[List[_Job], Any]] = []
            for (prefix, normalize), jobs in groups.items():
                texts = [text for job in jobs for text in job.texts]
                try:
                    out.append((jobs, self.encode_group(texts, prefix, normalize)))
                except Exception as exc:  # answered to the requests, not raised in the worker
                    out.append((jobs, exc))
            return out

        loop = asyncio.get_running_loop()
        for jobs, result in await loop.run_in_executor(executor, work):
            start = 0
            for job in jobs:
                stop = start + len(job.texts)
                if job.future.done():
                    pass
                elif isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    vectors, tokens = result
                    job.future.set_result((vectors[start:stop], tokens[start:stop]))
                start = stop


# --------------------------------------------------------------------------------------------
# Request validation helpers
# --------------------------------------------------------------------------------------------


def _as_list(value: Union[str, List[str]], field_name: str, max_inputs: int,
             max_chars: int) -> List[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(422, f"{field_name} is empty: send at least one text")
    if len(texts) > max_inputs:
        raise ApiError(413, f"{field_name} has {len(texts)} texts; the limit is {max_inputs} per "
                            f"request: split it into smaller requests", "payload_too_large")
    for i, text in enumerate(texts):
        where = field_name if isinstance(value, str) else f"{field_name}[{i}]"
        if len(text) > max_chars:
            raise ApiError(413, f"{where} has {len(text)} characters; the limit is {max_chars} "
                                f"per text: shorten or split it", "payload_too_large")
        if not text.strip():
            raise ApiError(422, f"{where} is empty or whitespace: there is nothing to embed")
    return texts


def _task_names() -> List[str]:
    from .tasks import TASKS

    return sorted(TASKS)


def _instruction(task: str, side: str) -> str:
    from .tasks import TASKS

    if task not in TASKS:
        raise ApiError(422, f"unknown task {task!r}; known tasks: {_task_names()}")
    return TASKS[task].instruction(side)  # type: ignore[arg-type]


def prompt_instruction(prompt_name: Optional[str]) -> str:
    """The instruction a text-embeddings-inference ``prompt_name`` stands for.

    ``None``: no instruction; any other name is a prompt of the sentence-transformers config
    that ``Embedder.save_pretrained`` writes (``query``, ``document``, ``<task>_query``,
    ``<task>_key``, ``<task>_document``), looked up by :func:`llm_embedder.embedder.prompt_text`.

    Example:
        >>> prompt_instruction("tool_query")
        'Transform this user request for fetching helpful tool descriptions: '
    """
    if prompt_name is None:
        return ""
    from .embedder import prompt_text

    try:
        return prompt_text(prompt_name)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None


def _validation_message(errors: Sequence[Dict[str, Any]]) -> Tuple[int, str]:
    """(status, message) for FastAPI's request validation errors: 400 for a body that is not
    JSON, else 422 naming each field."""
    parts: List[str] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type", "")
        if kind == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return 400, f"the request body is not valid JSON ({detail}): send a JSON object"
        if not loc:
            message = "the request body must be a JSON object"
        elif len(loc) > 1 and (loc[1] == "str" or loc[1].startswith("list[")):
            # one error per branch of `str | list[str]`: say it once, in words
            message = f"{loc[0]} must be a string or a list of strings"
        elif kind == "extra_forbidden":
            message = f"unknown field {loc[0]!r}"
        elif kind == "missing":
            message = f"field {loc[0]!r} is required"
        else:
            message = f"{'.'.join(loc)}: {error.get('msg', 'invalid')}"
        if message not in parts:
            parts.append(message)
    return 422, "; ".join(parts) or "invalid request"


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _import_serving() -> Dict[str, Any]:
    try:
        import fastapi
        import prometheus_client
        import pydantic
    except ImportError as exc:
        raise ImportError(f"llm_embedder.serve needs the 'serve' extra ({exc.name} is missing): "
                          f"{_EXTRA_HINT}") from exc
    return {"fastapi": fastapi, "prometheus_client": prometheus_client, "pydantic": pydantic}


@functools.lru_cache(maxsize=None)
def _orjson() -> Any:
    try:
        import orjson
    except ImportError:
        return None
    return orjson


def _tolist(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_bytes(content: Any) -> bytes:
    """``content`` as compact JSON, numpy arrays written as lists of numbers.

    With orjson installed, each float32 is written in its shortest round-trip form, about 30x
    faster than the ``json`` module and in half the bytes (an embedding is 384+ floats); the
    same numbers either way once read back as float32.

    Example:
        >>> json_bytes({"embedding": np.array([0.5, 1.0], dtype=np.float32)})
        b'{"embedding":[0.5,1.0]}'
    """
    orjson = _orjson()
    if orjson is not None:
        return orjson.dumps(content, default=_tolist, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=_tolist).encode("utf-8")


def _json_response(content: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    return Response(json_bytes(content), status, media_type="application/json")


class _Observe:
    """ASGI middleware: refuses oversized bodies (413) and records the request metrics.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``), which
    runs every request through an extra task group and memory streams: that cost the server
    more CPU per request than the rest of the HTTP stack under load (benches/bench_serve.py).
    """

    def __init__(self, app: Any, *, max_body: int, limits: str, requests_total: Any,
                 latency: Any, in_progress: Any) -> None:
        self.app = app
        self.max_body = max_body
        self.limits = limits
        self.requests_total = requests_total
        self.latency = latency
        self.in_progress = in_progress

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        length = next((value for key, value in scope["headers"] if key == b"content-length"),
                      b"")
        if length.isdigit() and int(length) > self.max_body:
            await _json_response(error_body(
                f"the request body has {int(length)} bytes; the limit is {self.max_body} "
                f"({self.limits})", "payload_too_large"), 413)(scope, receive, send)
            self.requests_total.labels(endpoint, "413").inc()
            return
        status = 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = endpoint != "/metrics"
        start = time.perf_counter()
        if counted:
            self.in_progress.inc()
        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            self.requests_total.labels(endpoint, "500").inc()
            raise
        finally:
            if counted:
                self.in_progress.dec()
        self.latency.labels(endpoint).observe(time.perf_counter() - start)
        self.requests_total.labels(endpoint, str(status)).inc()


def _corpus_texts(index_dir: Path, corpus: Optional[str]) -> Dict[Any, str]:
    """id -> text of the corpus an index was built from, {} when it is not known or gone."""
    if not corpus:
        return {}
    if not Path(corpus).is_file():
        logger.warning("%s names corpus %s, which does not exist: /search answers without "
                       "texts", index_dir / "source.json", corpus)
        return {}
    from .data import load_corpus

    return {passage.id: passage.full_text for passage in load_corpus(corpus)}


def create_app(
    model_dir: Optional[PathLike] = None,
    index_dir: Optional[PathLike] = None,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_inputs: int = 256,
    max_chars: int = 8192,
    batching: bool = True,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    encoders: Optional[int] = None,
    embedder: Any = None,
    model_name: Optional[str] = None,
) -> Any:
    """Build the FastAPI app serving one model (and one saved index, if given).

    Args:
        model_dir: a model folder or hub id for :meth:`Embedder.from_pretrained`; ``None`` the
            packaged all-MiniLM-L6-v2.
        index_dir: a folder written by ``Index.save`` (``llm-embedder index``) for ``/search``;
            its ``source.json`` gives the task, the corpus whose texts ``/search`` returns and,
            when ``model_dir`` is ``None``, the model that built it.
        max_batch_size, max_wait_ms: micro-batching: texts per encoder call at most, and how
            long the first queued request waits for company.
        max_inputs, max_chars: texts per request and characters per text at most (413 above).
        batching: ``False`` encodes each request on its own (to measure what batching buys).
        device: where the encoder runs; default the GPU when there is one.
        threads: torch threads of each encoder thread (default: torch's choice, one per core,
            shared out among the encoders). The event loop (HTTP, JSON) and any client on the
            same machine share the cores with them.
        encoders: encoder threads, each encoding its own batch (see :class:`MicroBatcher`);
            default 1 on a GPU, 2 on a CPU with 2 or more torch threads: on 2 cores two
            single-threaded encoders served 16-18 % more requests/s at 16 and 64 clients than
            one two-threaded one (benches/bench_serve.py, README), since small matrix products
            gain little from a second thread and one encoder's batch runs while the other's
            requests come back. A lone request waits a little longer (27 vs 22 ms p50).
        embedder: an already loaded :class:`~llm_embedder.Embedder` (``model_dir`` is then
            ignored); model_name: the name answered in ``model`` fields (default: the folder
            name).

    The encoder loads here, so a bad folder fails before the server listens. The worker runs
    between the app's startup and shutdown: use ``with TestClient(app)`` in tests.

    Example:
        >>> app = create_app("runs/model", "runs/index", max_batch_size=64)
    """
    modules = _import_serving()
    fastapi, prom, pydantic = (modules["fastapi"], modules["prometheus_client"],
                               modules["pydantic"])
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    for name, value in (("max_inputs", max_inputs), ("max_chars", max_chars),
                        ("threads", 1 if threads is None else threads),
                        ("encoders", 1 if encoders is None else encoders)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    from .index import read_source

    source = read_source(index_dir) if index_dir is not None else {}
    if embedder is None:
        from .embedder import Embedder

        # An index only answers queries encoded by the model that built it.
        if model_dir is None and source.get("model"):
            model_dir = source["model"]
            logger.info("using model %s, named by %s", model_dir,
                        Path(index_dir) / "source.json")  # type: ignore[arg-type]
        embedder = Embedder.from_pretrained(model_dir, device=device)
    served_name = model_name or (Path(os.fspath(model_dir)).name if model_dir is not None
                                 else DEFAULT_MODEL_NAME)
    index, index_task, corpus_texts = None, source.get("task"), {}
    if index_dir is not None:
        from .index import Index

        index = Index.load(index_dir)
        if index.dim != embedder.dim:
            raise ValueError(f"{index_dir}: the index has dimension {index.dim}, the model "
                             f"{served_name} embeds in {embedder.dim}: build the index with "
                             f"this model")
        corpus_texts = _corpus_texts(Path(index_dir), source.get("corpus"))

    def encode_group(texts: List[str], prefix: str, normalize: bool) -> Tuple[Any, List[int]]:
        tokens: List[int] = []
        vectors = embedder.encode(texts, task=None, side=None, instruction=prefix,
                                  batch_size=max_batch_size, max_length=MAX_TOKENS,
                                  normalize=normalize, show_progress_bar=False,
                                  token_counts=tokens)
        return vectors, tokens

    import torch

    # Several encoder threads share the model and tokenizer: inference only, and one call
    # before serving sets the tokenizer's truncation once (changing it while another thread
    # tokenizes is what makes a fast tokenizer raise "Already borrowed").
    if isinstance(getattr(embedder, "model", None), torch.nn.Module):
        embedder.model.eval()
    try:
        encode_group(["warm-up"], "", True)
    except Exception as exc:
        raise RuntimeError(f"{served_name}: the encoder failed on a one-word test text, so it "
                           f"cannot serve: {type(exc).__name__}: {exc}") from exc

    registry = prom.CollectorRegistry()
    requests_total = prom.Counter("llm_embedder_requests_total", "HTTP requests answered",
                                  ["endpoint", "status"], registry=registry)
    latency = prom.Histogram("llm_embedder_request_seconds", "HTTP request latency",
                             ["endpoint"], registry=registry)
    in_progress = prom.Gauge("llm_embedder_requests_in_progress",
                             "HTTP requests being answered (not counting /metrics)",
                             registry=registry)
    batch_sizes = prom.Histogram("llm_embedder_batch_size", "texts per encoder call",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                                 registry=registry)

    if encoders is None:
        on_cpu = torch.device(embedder.device).type == "cpu"
        encoders = 2 if on_cpu and torch.get_num_threads() >= 2 else 1
    # Set in each encoder thread: a thread's default follows the last set_num_threads call
    # anywhere in the process, not torch's choice for this machine.
    encoder_threads = threads if threads is not None else max(
        1, torch.get_num_threads() // encoders)

    def set_threads() -> None:
        # In the encoder thread itself: OpenMP keeps the thread count per calling thread.
        torch.set_num_threads(encoder_threads)  # type: ignore[arg-type]

    batcher = MicroBatcher(encode_group, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                           batching=batching, encoders=encoders, on_batch=batch_sizes.observe,
                           thread_init=set_threads)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        await batcher.start()
        logger.info("serving %s (dim %d) on %s, micro-batching %s, %d encoder(s), torch "
                    "threads %s each", served_name, embedder.dim, embedder.device,
                    "on" if batching else "off", encoders, encoder_threads)
        try:
            yield
        finally:
            await batcher.stop()
            logger.info("encoder worker stopped after draining its queue")

    app = fastapi.FastAPI(title="llm-embedder", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.embedder = embedder
    app.state.registry = registry
    # JSON escapes make a character up to 6 bytes; anything longer cannot be a valid request.
    max_body = max_inputs * max_chars * 6 + 65536

    app.add_middleware(_Observe, max_body=max_body, limits=f"{max_inputs} texts of "
                       f"{max_chars} characters", requests_total=requests_total,
                       latency=latency, in_progress=in_progress)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Any, exc: ApiError) -> Any:
        return JSONResponse(error_body(exc.message, exc.kind), exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Any, exc: Any) -> Any:
        status, message = _validation_message(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error"), status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Any, exc: Any) -> Any:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                 "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def on_crash(_request: Any, exc: Exception) -> Any:
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), 500)

    BaseModel, ConfigDict, Field = pydantic.BaseModel, pydantic.ConfigDict, pydantic.Field

    class EmbeddingsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input: Union[str, List[str]]
        model: Optional[str] = None
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: Optional[int] = None
        user: Optional[str] = None
        task: str = "qa"
        input_type: Literal["query", "document"] = "query"

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: Union[str, List[str]]
        prompt_name: Optional[str] = None
        normalize: bool = True

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: Union[str, List[str]]
        task: Optional[str] = None
        k: int = Field(5, ge=1, le=10_000)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest) -> Any:
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise ApiError(422, f"dimensions={body.dimensions} is not available: "
                                f"{served_name} embeds in {embedder.dim} dimensions")
        texts = _as_list(body.input, "input", max_inputs, max_chars)
        prefix = _instruction(body.task, "query" if body.input_type == "query" else "key")
        vectors, tokens = await batcher.submit(texts, prefix, True)
        if body.encoding_format == "base64":
            rows: Any = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                         for row in vectors]
        else:
            rows = vectors
        used = int(sum(tokens))
        return _json_response({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row}
                     for i, row in enumerate(rows)],
            "model": served_name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        })

    @app.post("/embed")
    async def embed(body: EmbedRequest) -> Any:
        texts = _as_list(body.inputs, "inputs", max_inputs, max_chars)
        prefix = prompt_instruction(body.prompt_name)
        vectors, _ = await batcher.submit(texts, prefix, body.normalize)
        return _json_response(vectors)

    @app.post("/search")
    async def search(body: SearchRequest) -> Any:
        if index is None:
            raise ApiError(404, "this server has no index: start it with --index DIR (a folder "
                                "written by `llm-embedder index`)", "not_found")
        task = body.task or index_task or "qa"
        if index_task is not None and task != index_task:
            raise ApiError(422, f"the index was built for task {index_task!r} (its "
                                f"source.json); search it with task {index_task!r}, not {task!r}")
        texts = _as_list(body.texts, "texts", max_inputs, max_chars)
        vectors, _ = await batcher.submit(texts, _instruction(task, "query"), True)
        k = min(body.k, len(index))
        ids, scores = await asyncio.to_thread(index.search, vectors, k)
        return _json_response({
            "task": task,
            "ids": ids,
            "scores": scores,
            "texts": [[corpus_texts.get(pid) for pid in row] for row in ids],
        })

    @app.get("/health")
    async def health() -> Any:
        if not batcher.running:
            raise ApiError(503, "the encoder is not running", "unavailable")
        return {"status": "ok", "model": served_name, "dim": embedder.dim,
                "device": str(embedder.device), "batching": batching,
                "index": None if index is None else len(index)}

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    return app


def run(
    model_dir: Optional[PathLike] = None,
    index_dir: Optional[PathLike] = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_level: str = "info",
    graceful_timeout_s: Optional[float] = 30.0,
    **app_options: Any,
) -> None:
    """Serve :func:`create_app` with uvicorn until SIGINT/SIGTERM (loopback by default).

    On SIGTERM the server stops accepting connections, finishes in-flight requests (for up to
    ``graceful_timeout_s``), drains the encoder queue and returns. ``app_options`` go to
    :func:`create_app` (``max_batch_size``, ``max_wait_ms``, ``batching``, ``device``, ...).

    Example:
        >>> run("runs/model", "runs/index", port=8080)  # curl 127.0.0.1:8080/health
    """
    import uvicorn

    app = create_app(model_dir, index_dir, **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout_s)
    # uvicorn re-raises the signal it shut down on once it is done; a no-op handler in the
    # main thread turns that second SIGTERM into a normal return (exit status 0).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        uvicorn.Server(config).run()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's options to ``parser`` (shared by ``llm-embedder serve`` and
    ``python -m llm_embedder.serve``); imports nothing heavy.

    Example:
        >>> args = add_arguments(argparse.ArgumentParser()).parse_args(["--port", "9000"])
    """
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--index", default=None,
                        help="index folder written by `llm-embedder index`, for /search")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="texts per encoder call at most")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request waits for others to batch with")
    parser.add_argument("--max-inputs", type=int, default=256, help="texts per request at most")
    parser.add_argument("--max-chars", type=int, default=8192,
                        help="characters per text at most")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each encoder (default: the cores, shared out "
                             "among the encoders)")
    parser.add_argument("--encoders", type=int, default=None,
                        help="encoder threads, each running its own batch (default: 2 on a "
                             "CPU with 2+ cores, 1 on a GPU)")
    parser.add_argument("--no-batching", dest="batching", action="store_false",
                        help="encode each request on its own")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds in-flight requests get to finish")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server from options parsed by :func:`add_arguments`; returns the exit status.

    Example:
        >>> run_from_args(add_arguments(argparse.ArgumentParser()).parse_args([]))
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    run(args.model, args.index, host=args.host, port=args.port, log_level=args.log_level,
        graceful_timeout_s=args.graceful_timeout, device=args.device,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_inputs=args.max_inputs, max_chars=args.max_chars, batching=args.batching,
        threads=args.threads, encoders=args.encoders)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m llm_embedder.serve [--model DIR] [--index DIR] [--port 8080]``.

    Example:
        >>> main(["--port", "9000", "--no-batching"])
    """
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m llm_embedder.serve", description="Serve embeddings over HTTP."))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
