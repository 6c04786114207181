"""The HTTP server against the real packaged MiniLM: response shapes, vectors equal to
``Embedder.encode``, search over a saved index, every client error as a 4xx JSON body, metrics,
micro-batching under concurrency, and a real server process that drains on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from llm_embedder import TASKS, Index  # noqa: E402
from llm_embedder import serve  # noqa: E402
from llm_embedder.serve import MicroBatcher, create_app, json_bytes, prompt_instruction  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "hamlet", "text": "Hamlet is a tragedy written by William Shakespeare."},
    {"id": "csv", "text": "pandas.read_csv reads a comma-separated values file into a DataFrame."},
    {"id": "nile", "text": "The Nile is a major north-flowing river in northeastern Africa."},
]
TEXTS = ["Who wrote Hamlet?", "What is the capital of France?", "ok",
         "Speaker 1: I adopted a puppy!\nSpeaker 2: What is its name?"]


def _full_text(row: dict) -> str:
    return f"{row['title']}: {row['text']}" if row.get("title") else row["text"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, minilm) -> Path:
    """A saved qa index over CORPUS with the source.json `llm-embedder index` writes."""
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in CORPUS))
    index = Index(minilm.dim)
    index.add(minilm.encode_keys([_full_text(row) for row in CORPUS], task="qa"),
              [row["id"] for row in CORPUS])
    index.save(root / "index")
    (root / "index" / "source.json").write_text(json.dumps(
        {"task": "qa", "model": None, "corpus": str(corpus)}))
    return root / "index"


@pytest.fixture(scope="module")
def client(minilm, index_dir):
    app = create_app(embedder=minilm, index_dir=index_dir, max_inputs=8, max_chars=200,
                     model_name="minilm")
    with TestClient(app) as test_client:
        yield test_client


def _vectors(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


# ---- shapes and vectors -----------------------------------------------------------------------


def test_openai_embeddings_have_the_openai_shape(client, minilm):
    body = client.post("/v1/embeddings", json={"input": TEXTS[:2], "model": "x"}).json()
    assert body["object"] == "list"
    assert body["model"] == "minilm"
    assert [row["index"] for row in body["data"]] == [0, 1]
    assert all(row["object"] == "embedding" for row in body["data"])
    assert all(len(row["embedding"]) == minilm.dim for row in body["data"])
    prefix = TASKS["qa"].query_instruction
    tokens = sum(len(ids) for ids in minilm.tokenizer([prefix + t for t in TEXTS[:2]])["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize("task, input_type, side", [
    ("qa", "query", "query"), ("qa", "document", "key"), ("tool", "query", "query"),
    ("chat", "document", "key")])
def test_openai_embeddings_equal_embedder_encode(client, minilm, task, input_type, side):
    response = client.post("/v1/embeddings",
                           json={"input": TEXTS, "task": task, "input_type": input_type})
    np.testing.assert_allclose(_vectors(response), minilm.encode(TEXTS, task=task, side=side),
                               atol=1e-5)


def test_openai_default_is_the_qa_query_side_and_a_string_is_one_input(client, minilm):
    vectors = _vectors(client.post("/v1/embeddings", json={"input": TEXTS[0]}))
    assert vectors.shape == (1, minilm.dim)
    np.testing.assert_allclose(vectors[0], minilm.encode_queries(TEXTS[0], task="qa"), atol=1e-5)


def test_openai_base64_encoding_decodes_to_the_float_vectors(client):
    plain = _vectors(client.post("/v1/embeddings", json={"input": TEXTS}))
    body = client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
                        for row in body["data"]])
    np.testing.assert_array_equal(decoded, plain)


@pytest.mark.parametrize("prompt_name, task, side", [
    ("query", "qa", "query"), ("document", "qa", "key"), ("tool_query", "tool", "query"),
    ("chat_key", "chat", "key"), ("icl_document", "icl", "key"), (None, None, None)])
def test_embed_prompt_name_selects_the_instruction(client, minilm, prompt_name, task, side):
    response = client.post("/embed", json={"inputs": TEXTS, "prompt_name": prompt_name})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()), minilm.encode(TEXTS, task=task,
                                                                        side=side), atol=1e-5)


def test_embed_a_string_gives_one_row_and_normalize_false_keeps_the_norm(client, minilm):
    one = client.post("/embed", json={"inputs": TEXTS[0], "prompt_name": "query"}).json()
    assert len(one) == 1 and len(one[0]) == minilm.dim
    raw = np.array(client.post("/embed", json={"inputs": TEXTS, "normalize": False}).json())
    np.testing.assert_allclose(raw, minilm.encode(TEXTS, task=None, side=None, normalize=False),
                               atol=1e-4, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_prompt_instruction_matches_the_saved_sentence_transformers_prompt_names():
    assert prompt_instruction("query") == TASKS["qa"].query_instruction
    assert prompt_instruction("document") == TASKS["qa"].key_instruction
    for name, task in TASKS.items():
        assert prompt_instruction(f"{name}_query") == task.query_instruction
        assert prompt_instruction(f"{name}_key") == task.key_instruction


def test_prompt_instruction_refuses_an_unknown_name_with_a_422_listing_the_known_ones():
    with pytest.raises(serve.ApiError, match="unknown prompt_name 'qa_passage'.*tool_query") as err:
        prompt_instruction("qa_passage")
    assert err.value.status == 422
    assert prompt_instruction(None) == ""


def test_each_text_is_tokenized_once_and_billed_its_tokens(client, minilm, monkeypatch):
    calls = []
    tokenizer = minilm.tokenizer

    class Counting:
        def __call__(self, texts, *args, **kwargs):
            calls.append(len(texts))
            return tokenizer(texts, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    monkeypatch.setattr(minilm, "tokenizer", Counting())
    body = client.post("/v1/embeddings", json={"input": TEXTS, "task": "chat"}).json()
    assert calls == [len(TEXTS)]
    prefix = TASKS["chat"].query_instruction
    expected = sum(len(ids) for ids in tokenizer([prefix + t for t in TEXTS])["input_ids"])
    assert body["usage"]["prompt_tokens"] == expected


def test_json_without_orjson_gives_the_same_float32_vectors(monkeypatch):
    vectors = np.random.default_rng(0).standard_normal((3, 384)).astype(np.float32)
    content = {"data": [{"index": i, "embedding": row} for i, row in enumerate(vectors)]}
    fast = json.loads(json_bytes(content))
    monkeypatch.setattr(serve, "_orjson", lambda: None)
    plain = json.loads(json_bytes(content))
    for body in (fast, plain):
        decoded = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
        np.testing.assert_array_equal(decoded, vectors)
    assert [row["index"] for row in plain["data"]] == [0, 1, 2]


def test_search_answers_ids_scores_and_texts_of_the_saved_index(client, minilm, index_dir):
    questions = ["Who wrote Hamlet?", "Which river flows through Africa?"]
    body = client.post("/search", json={"texts": questions, "k": 2}).json()
    expected = Index.load(index_dir).search(minilm.encode_queries(questions, task="qa"), k=2)
    assert body["task"] == "qa"
    assert body["ids"] == expected.ids
    assert [row[0] for row in body["ids"]] == ["hamlet", "nile"]
    np.testing.assert_allclose(body["scores"], expected.scores, atol=1e-5)
    texts = {row["id"]: _full_text(row) for row in CORPUS}
    assert body["texts"] == [[texts[pid] for pid in row] for row in expected.ids]


def test_search_k_larger_than_the_index_returns_every_entry(client):
    body = client.post("/search", json={"texts": "capital of France", "task": "qa", "k": 50})
    assert body.status_code == 200, body.text
    assert len(body.json()["ids"][0]) == len(CORPUS)
    assert body.json()["ids"][0][0] == "paris"


def test_health_reports_the_model_and_index(client, minilm):
    body = client.get("/health").json()
    assert body == {"status": "ok", "model": "minilm", "dim": minilm.dim, "device": "cpu",
                    "batching": True, "index": len(CORPUS)}


# ---- client errors ----------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
TOO_MANY = json.dumps({"input": ["a"] * 9})
TOO_LONG = json.dumps({"input": ["a" * 201]})

BAD_REQUESTS = [
    # (name, method, path, body, status, error type, message fragment)
    ("bad json", "POST", "/v1/embeddings", '{"input": ["a"', 400, "invalid_request_error",
     "not valid JSON"),
    ("body is a list", "POST", "/v1/embeddings", '["a"]', 422, "invalid_request_error",
     "must be a JSON object"),
    ("missing input", "POST", "/v1/embeddings", '{"model": "m"}', 422, "invalid_request_error",
     "field 'input' is required"),
    ("unknown field", "POST", "/v1/embeddings", '{"input": "a", "taks": "qa"}', 422,
     "invalid_request_error", "unknown field 'taks'"),
    ("empty list", "POST", "/v1/embeddings", '{"input": []}', 422, "invalid_request_error",
     "input is empty"),
    ("empty string", "POST", "/v1/embeddings", '{"input": ""}', 422, "invalid_request_error",
     "input is empty or whitespace"),
    ("whitespace item", "POST", "/v1/embeddings", '{"input": ["a", "  "]}', 422,
     "invalid_request_error", "input[1] is empty or whitespace"),
    ("token ids", "POST", "/v1/embeddings", '{"input": [1, 2]}', 422, "invalid_request_error",
     "input must be a string or a list of strings"),
    ("unknown task", "POST", "/v1/embeddings", '{"input": "a", "task": "nope"}', 422,
     "invalid_request_error", "unknown task 'nope'; known tasks: ['chat'"),
    ("bad input_type", "POST", "/v1/embeddings", '{"input": "a", "input_type": "passage"}', 422,
     "invalid_request_error", "input_type"),
    ("bad encoding", "POST", "/v1/embeddings", '{"input": "a", "encoding_format": "int8"}', 422,
     "invalid_request_error", "encoding_format"),
    ("other dimensions", "POST", "/v1/embeddings", '{"input": "a", "dimensions": 64}', 422,
     "invalid_request_error", "dimensions=64 is not available"),
    ("too many inputs", "POST", "/v1/embeddings", TOO_MANY, 413, "payload_too_large",
     "input has 9 texts; the limit is 8"),
    ("too long input", "POST", "/v1/embeddings", TOO_LONG, 413, "payload_too_large",
     "input[0] has 201 characters; the limit is 200"),
    ("huge body", "POST", "/v1/embeddings", '{"input": "' + "a" * 80_000 + '"}', 413,
     "payload_too_large", "the limit is"),
    ("tei empty", "POST", "/embed", '{"inputs": []}', 422, "invalid_request_error",
     "inputs is empty"),
    ("tei bad prompt", "POST", "/embed", '{"inputs": "a", "prompt_name": "nope_query"}', 422,
     "invalid_request_error", "unknown prompt_name 'nope_query'"),
    ("tei too many", "POST", "/embed", json.dumps({"inputs": ["a"] * 9}), 413,
     "payload_too_large", "inputs has 9 texts"),
    ("search k 0", "POST", "/search", '{"texts": ["a"], "k": 0}', 422, "invalid_request_error",
     "k: Input should be greater than or equal to 1"),
    ("search other task", "POST", "/search", '{"texts": ["a"], "task": "tool"}', 422,
     "invalid_request_error", "built for task 'qa'"),
    ("search empty", "POST", "/search", '{"texts": [""]}', 422, "invalid_request_error",
     "texts[0] is empty"),
    ("unknown path", "GET", "/v2/embeddings", None, 404, "not_found", "Not Found"),
    ("wrong method", "GET", "/v1/embeddings", None, 405, "method_not_allowed", "Not Allowed"),
]


@pytest.mark.parametrize("name, method, path, body, status, kind, fragment", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_client_errors_get_a_4xx_json_error_body(client, name, method, path, body, status, kind,
                                                 fragment):
    response = client.request(method, path, content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert fragment in error["message"]


def test_search_without_an_index_is_404_saying_how_to_add_one(minilm):
    with TestClient(create_app(embedder=minilm)) as no_index:
        response = no_index.post("/search", json={"texts": ["a"]})
    assert response.status_code == 404
    assert "--index DIR" in response.json()["error"]["message"]


def test_an_index_of_another_dimension_is_refused_at_start(minilm, tmp_path):
    small = Index(3)
    small.add(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    small.save(tmp_path / "small")
    with pytest.raises(ValueError, match="dimension 3.*384"):
        create_app(embedder=minilm, index_dir=tmp_path / "small")


def test_the_model_named_by_the_index_source_is_the_one_loaded(index_dir, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    source = json.loads((copy / "source.json").read_text())
    (copy / "source.json").write_text(json.dumps({**source, "model": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="gone"):
        create_app(index_dir=copy)


def test_create_app_without_the_serve_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r"llm-embedder\[serve\]"):
        create_app()


# ---- metrics ----------------------------------------------------------------------------------


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_expose_requests_latency_and_batch_sizes(client):
    before = client.get("/metrics").text
    assert client.post("/v1/embeddings", json={"input": TEXTS}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": []}).status_code == 422
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    ok = '{endpoint="/v1/embeddings",status="200"}'
    bad = '{endpoint="/v1/embeddings",status="422"}'
    assert _metric(after, "llm_embedder_requests_total", ok) == \
        _metric(before, "llm_embedder_requests_total", ok) + 1
    assert _metric(after, "llm_embedder_requests_total", bad) == \
        _metric(before, "llm_embedder_requests_total", bad) + 1
    count = '{endpoint="/v1/embeddings"}'
    assert _metric(after, "llm_embedder_request_seconds_count", count) == \
        _metric(before, "llm_embedder_request_seconds_count", count) + 2
    assert _metric(after, "llm_embedder_batch_size_sum") >= \
        _metric(before, "llm_embedder_batch_size_sum") + len(TEXTS)
    assert "llm_embedder_requests_in_progress 0.0" in after


class _FailingEmbedder:
    """Enough of an Embedder for create_app, whose encoder breaks once it serves (it passes the
    warm-up call that create_app makes before serving)."""

    dim, device, max_seq_length = 4, "cpu", 16

    def __init__(self, calls_before_breaking: int = 1) -> None:
        self.calls_left = calls_before_breaking

    def encode(self, texts, token_counts=None, **kwargs):
        if self.calls_left <= 0:
            raise RuntimeError("the encoder broke")
        self.calls_left -= 1
        if token_counts is not None:
            token_counts.extend(1 for _ in texts)
        return np.zeros((len(texts), self.dim), np.float32)


def test_an_encoder_that_fails_before_serving_fails_create_app():
    with pytest.raises(RuntimeError, match="failed on a one-word test text.*the encoder broke"):
        create_app(embedder=_FailingEmbedder(calls_before_breaking=0))


def test_an_encoder_crash_is_a_500_json_body_and_is_counted():
    app = create_app(embedder=_FailingEmbedder())
    with TestClient(app, raise_server_exceptions=False) as broken:
        response = broken.post("/v1/embeddings", json={"input": "a"})
        metrics = broken.get("/metrics").text
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error: RuntimeError: the encoder broke", "type": "server_error"}
    assert _metric(metrics, "llm_embedder_requests_total",
                   '{endpoint="/v1/embeddings",status="500"}') == 1
    assert "llm_embedder_requests_in_progress 0.0" in metrics


# ---- micro-batching ---------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_get_the_sequential_vectors(minilm):
    texts = [f"question number {i}: who wrote play {i}?" for i in range(16)]
    expected = minilm.encode_queries(texts, task="qa")
    # A long max wait makes the first batch wait for all 16 (it closes as soon as they arrive).
    app = create_app(embedder=minilm, max_batch_size=16, max_wait_ms=30_000)
    barrier = threading.Barrier(len(texts))
    results: dict = {}
    with TestClient(app) as batched:
        def send(i: int) -> None:
            barrier.wait(timeout=60)
            results[i] = batched.post("/v1/embeddings", json={"input": texts[i]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        metrics = batched.get("/metrics").text
    got = np.concatenate([_vectors(results[i]) for i in range(len(texts))])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    batches = _metric(metrics, "llm_embedder_batch_size_count")
    singles = _metric(metrics, "llm_embedder_batch_size_bucket", '{le="1.0"}')
    assert batches < len(texts) and singles < batches  # some batch held more than one request


def test_batching_off_encodes_one_request_per_call(minilm):
    app = create_app(embedder=minilm, batching=False)
    with TestClient(app) as unbatched:
        for text in TEXTS:
            assert unbatched.post("/v1/embeddings", json={"input": [text, text]}).status_code == 200
        metrics = unbatched.get("/metrics").text
    assert _metric(metrics, "llm_embedder_batch_size_count") == len(TEXTS)
    assert _metric(metrics, "llm_embedder_batch_size_sum") == 2 * len(TEXTS)


def test_threads_sets_torch_threads_in_the_encoder_thread_only(minilm):
    import torch

    before = torch.get_num_threads()
    try:
        with TestClient(create_app(embedder=minilm, threads=1)) as one:
            assert one.post("/v1/embeddings", json={"input": "a"}).status_code == 200
            for executor in one.app.state.batcher._executors:
                assert executor.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)  # set_num_threads also moves the default of new threads
    with pytest.raises(ValueError, match="threads must be a positive int"):
        create_app(embedder=minilm, threads=0)


def _fake_encode(texts, prefix, normalize):
    vectors = np.array([[len(prefix + text), float(normalize)] for text in texts], np.float32)
    return vectors, [len(text) for text in texts]


@pytest.mark.parametrize("encoders", [1, 2])
def test_batcher_stop_answers_every_queued_job_before_returning(encoders):
    sizes = []

    async def scenario():
        batcher = MicroBatcher(_fake_encode, max_batch_size=4, max_wait_ms=0,
                               encoders=encoders, on_batch=sizes.append)
        await batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit(["x" * i] * i, "p", i % 2 == 0))
                for i in range(1, 9)]
        await asyncio.sleep(0)  # let every submit enqueue before the stop marker
        await batcher.stop()
        assert all(job.done() for job in jobs)
        return [job.result() for job in jobs]

    results = asyncio.run(scenario())
    for i, (vectors, tokens) in enumerate(results, start=1):
        assert vectors.tolist() == [[1 + i, float(i % 2 == 0)]] * i
        assert tokens == [i] * i
    assert sum(sizes) == sum(range(1, 9))


def test_two_encoders_split_the_requests_in_flight_and_run_at_once():
    both_running = threading.Barrier(2, timeout=10)  # breaks unless two calls overlap
    calls = []

    def encode(texts, prefix, normalize):
        calls.append((threading.current_thread().name, len(texts)))
        if len(calls) <= 2:
            both_running.wait()
        return _fake_encode(texts, prefix, normalize)

    async def scenario():
        batcher = MicroBatcher(encode, max_batch_size=32, max_wait_ms=50, encoders=2)
        await batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit([f"t{i}"], "", True)) for i in range(16)]
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [tokens for _, tokens in results] == [[len(f"t{i}")] for i in range(16)]
    assert sorted(size for _, size in calls) == [8, 8]  # each its share, not 16 and 0
    assert len({name for name, _ in calls}) == 2


def test_one_encoder_takes_every_queued_request_up_to_the_batch_size():
    sizes = []

    async def scenario():
        batcher = MicroBatcher(_fake_encode, max_batch_size=32, max_wait_ms=50,
                               on_batch=sizes.append)
        await batcher.start()
        await asyncio.gather(*[batcher.submit([f"t{i}"], "", True) for i in range(16)])
        await batcher.stop()

    asyncio.run(scenario())
    assert sizes == [16]


def test_encoders_must_be_a_positive_int(minilm):
    with pytest.raises(ValueError, match="encoders must be a positive int"):
        MicroBatcher(_fake_encode, encoders=0)
    with pytest.raises(ValueError, match="encoders must be a positive int"):
        create_app(embedder=minilm, encoders=0)


def test_default_encoders_on_a_cpu_share_out_the_torch_threads(minilm):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with TestClient(create_app(embedder=minilm)) as client:
            assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 200
            executors = client.app.state.batcher._executors
            assert [e.submit(torch.get_num_threads).result() for e in executors] == [1, 1]
        with TestClient(create_app(embedder=minilm, encoders=1)) as client:
            executors = client.app.state.batcher._executors
            assert [e.submit(torch.get_num_threads).result() for e in executors] == [2]
    finally:
        torch.set_num_threads(before)


def test_batcher_skips_cancelled_jobs_and_refuses_work_when_stopped():
    calls = []

    def encode(texts, prefix, normalize):
        calls.append(list(texts))
        return _fake_encode(texts, prefix, normalize)

    async def scenario():
        batcher = MicroBatcher(encode, max_batch_size=8, max_wait_ms=0)
        await batcher.start()
        cancelled = asyncio.ensure_future(batcher.submit(["gone"], "", True))
        kept = asyncio.ensure_future(batcher.submit(["kept"], "", True))
        await asyncio.sleep(0)
        cancelled.cancel()
        await batcher.stop()
        assert (await kept)[1] == [4]
        with pytest.raises(Exception, match="not running"):
            await batcher.submit(["late"], "", True)

    asyncio.run(scenario())
    assert calls == [["kept"]]


def test_jobs_that_waited_for_a_busy_encoder_go_without_waiting_again():
    release = threading.Event()
    calls = []

    def encode(texts, prefix, normalize):
        calls.append(len(texts))
        if len(calls) == 1:
            release.wait(timeout=30)
        return _fake_encode(texts, prefix, normalize)

    async def scenario():
        # max_wait is long against scheduling delays on a loaded CI machine: half of it is
        # the test's margin.
        batcher = MicroBatcher(encode, max_batch_size=4, max_wait_ms=2000)
        await batcher.start()
        full = asyncio.ensure_future(batcher.submit(["a"] * 4, "", True))  # a full batch
        while not calls:
            await asyncio.sleep(0.01)
        late = [asyncio.ensure_future(batcher.submit([t], "", True)) for t in ("b", "c")]
        await asyncio.sleep(2.2)  # longer than max_wait: both waited for the busy encoder
        release.set()
        await full
        released = time.monotonic()
        await asyncio.gather(*late)
        waited = time.monotonic() - released
        await batcher.stop()
        return waited

    waited = asyncio.run(scenario())
    assert calls == [4, 2]  # the two late jobs in one batch
    assert waited < 1.0  # not another max_wait (2 s) for company


def test_an_encoder_failure_fails_only_its_requests():
    def encode(texts, prefix, normalize):
        if prefix == "bad":
            raise RuntimeError("boom")
        return _fake_encode(texts, prefix, normalize)

    async def scenario():
        batcher = MicroBatcher(encode, max_batch_size=8, max_wait_ms=50)
        await batcher.start()
        bad = asyncio.ensure_future(batcher.submit(["a"], "bad", True))
        good = asyncio.ensure_future(batcher.submit(["b"], "ok", True))
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        assert (await good)[1] == [1]
        await batcher.stop()

    asyncio.run(scenario())


# ---- a real server process --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        try:
            proc.wait(timeout=0.25)  # the poll interval, and notices a server that died
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the server exited with {proc.returncode}: "
                             f"{proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"the server did not answer {url} within {timeout:.0f} s")


@pytest.mark.slow  # starts a second Python process that loads torch and the model
def test_server_process_answers_then_drains_in_flight_requests_on_sigterm(index_dir, minilm):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_embedder.serve", "--index", str(index_dir), "--port",
         str(port), "--device", "cpu"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, f"{base}/health")
        # README "Serving": the same request bodies as the curl examples
        embedded = httpx.post(f"{base}/v1/embeddings", json={
            "input": ["Who wrote Hamlet?"], "task": "qa", "input_type": "query"}, timeout=60)
        np.testing.assert_allclose(_vectors(embedded)[0],
                                   minilm.encode_queries("Who wrote Hamlet?", task="qa"),
                                   atol=1e-5)
        document = httpx.post(f"{base}/embed", json={
            "inputs": ["Hamlet is a tragedy by William Shakespeare."],
            "prompt_name": "document"}, timeout=60)
        assert document.status_code == 200 and len(document.json()[0]) == minilm.dim
        found = httpx.post(f"{base}/search", json={"texts": ["Who wrote Hamlet?"], "k": 3},
                           timeout=60).json()
        assert found["ids"][0][0] == "hamlet"

        # A slow request in flight when SIGTERM arrives must still be answered in full.
        long_texts = [f"passage {i}: " + "the quick brown fox jumps over the lazy dog " * 10
                      for i in range(24)]
        answer: dict = {}

        def slow_request() -> None:
            answer["response"] = httpx.post(f"{base}/v1/embeddings",
                                            json={"input": long_texts}, timeout=120)

        sender = threading.Thread(target=slow_request)
        sender.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "response" not in answer:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            if _metric(metrics, "llm_embedder_requests_in_progress") >= 1:
                break
        proc.send_signal(signal.SIGTERM)
        sender.join(timeout=120)
        assert answer["response"].status_code == 200
        assert len(answer["response"].json()["data"]) == len(long_texts)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "Shutting down" in stderr and "draining its queue" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
