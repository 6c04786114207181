"""Load test of ``llm_embedder.serve`` on the loopback: micro-batching on vs off, and a fault.

Starts real server processes on 127.0.0.1 (the packaged MiniLM on CPU): one micro-batching (server
defaults), and one per ``--off-encoders`` value encoding each request on its own
(``--no-batching``, what a plain one-request-one-forward server does): with 1 encoder thread one
forward at a time, with 2 two single-request forwards at once. For each number of concurrent
clients, every client sends a fixed number of ``/v1/embeddings`` requests (one short distinct
question each) one after another on its own keep-alive connection; the run stops by itself. The
clients run in this process on the same cores, so they are a minimal asyncio HTTP/1.1 client, not
httpx (which spent more CPU per request than the batched encoder). Prints a Markdown table of
requests/s, p50/p99 latency, errors and server CPU time per request for each mode, and the ratio
batching on / off, one table per one-request-one-forward server.

Fault check: while 16 clients load the batching server it is killed (SIGKILL) after a quarter
of the requests; every client must finish (errors, not hangs) within a few seconds, and a
restarted server must answer a probe request with exactly the vectors it gave before.

    python benches/bench_serve.py                       # 1, 16, 64 clients x 20 requests
    python benches/bench_serve.py --clients 1 16 --requests 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import httpx
import numpy as np

PROBE = ["Who wrote Hamlet?", "What is the capital of France?", "how to read a csv in pandas"]
FAIL_FAST_S = 10.0  # a client still waiting this long after the kill counts as hung


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One ``python -m llm_embedder.serve`` process on the loopback, logs in ``work``."""

    def __init__(self, name: str, work: Path, batching: bool, port: Optional[int] = None,
                 max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 threads: Optional[int] = None, encoders: Optional[int] = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"{name}.log"
        command = [sys.executable, "-m", "llm_embedder.serve", "--port", str(self.port),
                   "--device", "cpu", "--log-level", "warning",
                   "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
        if not batching:
            command.append("--no-batching")
        if threads is not None:
            command += ["--threads", str(threads)]
        if encoders is not None:
            command += ["--encoders", str(encoders)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:
                self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}; "
                               f"see {self.log_path}")
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s; see "
                           f"{self.log_path}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def cpu_seconds(pid: Optional[int] = None) -> float:
    """CPU time (user + system) of process ``pid`` so far, or of this process; NaN where
    /proc is missing. CPU per request moves less with other jobs' load than requests/s."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def batch_totals(url: str) -> Tuple[float, float]:
    """(texts, encoder calls) so far, from the server's batch-size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    found = dict(re.findall(r"^llm_embedder_batch_size_(sum|count) (\S+)$", text, re.MULTILINE))
    return float(found.get("sum", 0.0)), float(found.get("count", 0.0))


def probe(url: str) -> np.ndarray:
    response = httpx.post(f"{url}/v1/embeddings", json={"input": PROBE, "task": "qa"},
                          timeout=60.0)
    response.raise_for_status()
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


class Load:
    """Results of one load run: per-request latencies (successes) and error messages."""

    def __init__(self) -> None:
        self.latencies: List[float] = []
        self.errors: List[str] = []
        self.finished_at: List[float] = []  # when each client finished (monotonic)
        self.wall = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies) + len(self.errors)

    def summary(self) -> Dict[str, float]:
        lat = np.array(self.latencies) * 1000.0
        return {
            "rps": len(self.latencies) / self.wall if self.wall else 0.0,
            "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "errors": float(len(self.errors)),
        }


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client.

    It shares the 2 cores with the servers it loads, so it must cost little: httpx spends
    about 5 ms of CPU per request here (more than the batched encoder per text), this a
    fraction of a millisecond. It speaks only what the server answers: a Content-Length body.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def post(self, path: str, body: bytes) -> Tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), self.host.encode(), len(body), body))
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next((int(line.split(":", 1)[1]) for line in head[1:]
                       if line.lower().startswith("content-length:")), -1)
        if length < 0:
            raise ValueError(f"an answer without Content-Length: {head[0]}")
        return int(head[0].split(" ", 2)[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_load(url: str, clients: int, requests: int, timeout: float,
                   kill_after: Optional[int] = None,
                   kill: Optional[Server] = None) -> Tuple[Load, Optional[float]]:
    """``clients`` concurrent clients, each on its own connection, ``requests`` sequential
    requests each. With ``kill_after``, SIGKILL ``kill`` once that many requests are done;
    returns the kill time."""
    load = Load()
    host, port = url.rsplit("/", 1)[-1].split(":")
    killed_at: List[float] = []
    enough = asyncio.Event()

    async def client(c: int) -> None:
        connection = Connection(host, int(port))
        for r in range(requests):
            text = f"question {c}-{r}: what is the capital of country number {c * 1000 + r}?"
            body = json.dumps({"input": text}).encode()
            start = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(connection.post("/v1/embeddings", body),
                                                   timeout)
                if status == 200:
                    load.latencies.append(time.perf_counter() - start)
                else:
                    load.errors.append(f"HTTP {status}")
            except (OSError, EOFError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ValueError) as exc:
                load.errors.append(type(exc).__name__)
                connection.close()  # the next request reconnects
            if kill_after is not None and load.done >= kill_after:
                enough.set()
        connection.close()
        load.finished_at.append(time.monotonic())

    async def killer() -> None:
        await enough.wait()
        assert kill is not None
        kill.proc.kill()
        killed_at.append(time.monotonic())

    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    extra = [asyncio.create_task(killer())] if kill_after is not None else []
    start = time.perf_counter()
    await asyncio.gather(*tasks)
    load.wall = time.perf_counter() - start
    for task in extra:
        task.cancel()
    return load, (killed_at[0] if killed_at else None)


def table(rows: Sequence[Tuple[int, int, Dict[str, float], Dict[str, float]]]) -> str:
    lines = ["| clients | requests | batching on req/s | p50 ms | p99 ms | errors | "
             "texts/call | CPU ms/req | batching off req/s | p50 ms | p99 ms | errors | "
             "CPU ms/req | ratio on/off |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for clients, total, on, off in rows:
        ratio = on["rps"] / off["rps"] if off["rps"] else float("nan")
        lines.append(f"| {clients} | {total} | {on['rps']:.1f} | {on['p50']:.1f} | "
                     f"{on['p99']:.1f} | {on['errors']:.0f} | {on['batch']:.1f} | "
                     f"{on['cpu']:.1f} | {off['rps']:.1f} | {off['p50']:.1f} | "
                     f"{off['p99']:.1f} | {off['errors']:.0f} | {off['cpu']:.1f} | "
                     f"**{ratio:.2f}x** |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--fault-clients", type=int, default=16)
    parser.add_argument("--no-fault", dest="fault", action="store_false")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per server (default: the server's, one per core); "
                             "1 keeps a machine shared with other jobs from oversubscribing")
    parser.add_argument("--encoders", type=int, default=None,
                        help="encoder threads of the batching server (default: the server's)")
    parser.add_argument("--off-encoders", type=int, nargs="+", default=[1, 2],
                        help="one one-request-one-forward server per value, with that many "
                             "encoder threads (default 1 and 2: serial, and two at once)")
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout, a kill) still runs the finally below that stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    print(f"# bench_serve: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch threads "
          f"{args.threads or 'default'}, encoders on {args.encoders or 'default'} / off "
          f"{' and '.join(map(str, args.off_encoders))}; {load_average()}; logs in {work}\n")
    began = time.monotonic()
    on = Server("batching-on", work, batching=True, threads=args.threads,
                encoders=args.encoders)
    offs = [Server(f"batching-off-{n}", work, batching=False, threads=args.threads,
                   encoders=n) for n in args.off_encoders]
    servers = [on, *offs]
    failed = False
    try:
        for server in servers:
            server.wait_ready()
        print(f"servers ready in {time.monotonic() - began:.0f} s\n")
        before = probe(on.url)
        same = max(float(np.abs(before - probe(off.url)).max()) for off in offs)
        measured, client_cpu = [], 0.0
        for clients in args.clients:
            results = {}
            for server in servers:
                asyncio.run(run_load(server.url, clients, 1, args.timeout))  # warm-up
                texts, calls = batch_totals(server.url)
                cpu, own = cpu_seconds(server.proc.pid), cpu_seconds()
                load, _ = asyncio.run(run_load(server.url, clients, args.requests, args.timeout))
                cpu, own = cpu_seconds(server.proc.pid) - cpu, cpu_seconds() - own
                client_cpu = max(client_cpu, 1000.0 * own / max(load.done, 1))
                results[server.name] = load.summary()
                more_texts, more_calls = batch_totals(server.url)
                results[server.name]["batch"] = (more_texts - texts) / max(more_calls - calls, 1)
                results[server.name]["cpu"] = 1000.0 * cpu / max(load.done, 1)
            measured.append((clients, results))
        for off in offs:
            encoders = off.name.rsplit("-", 1)[1]
            print(f"\nbatching on vs one request per forward pass, {encoders} encoder thread(s) "
                  f"{'(one forward at a time)' if encoders == '1' else 'at once'}:\n")
            print(table([(clients, clients * args.requests, results["batching-on"],
                          results[off.name]) for clients, results in measured]))
        rows = [(clients, clients * args.requests, results["batching-on"], results[off.name])
                for clients, results in measured for off in offs]
        print(f"\nCPU ms/req: the server process's CPU time per request (the load generator's: "
              f"{client_cpu:.2f} ms at most); {load_average()}")
        print(f"\nbatching on vs off, same probe texts: max |difference| = {same:.2e}")
        errors = sum(on_row["errors"] + off_row["errors"] for _, _, on_row, off_row in rows)
        failed |= errors > 0 or same > 1e-5
        for off in offs:
            off.stop()

        if args.fault:
            clients = args.fault_clients
            total = clients * args.requests
            load, killed_at = asyncio.run(run_load(on.url, clients, args.requests, args.timeout,
                                                   kill_after=total // 4, kill=on))
            assert killed_at is not None
            lag = max(load.finished_at) - killed_at
            port = on.port
            on.log.close()
            restarted = Server("restarted", work, batching=True, port=port,
                               threads=args.threads, encoders=args.encoders)
            servers.append(restarted)
            restarted.wait_ready()
            after = probe(restarted.url)
            identical = bool(np.array_equal(before, after))
            print(f"\nfault: SIGKILL after {total // 4} of {total} requests "
                  f"({clients} clients): {len(load.latencies)} answered, {len(load.errors)} "
                  f"failed ({', '.join(sorted(set(load.errors))) or 'none'}); every client "
                  f"done {lag:.2f} s after the kill (fail fast: < {FAIL_FAST_S:.0f} s: "
                  f"{'yes' if lag < FAIL_FAST_S else 'NO'})")
            print(f"restarted server answers the probe identically: "
                  f"{'yes' if identical else 'NO'}; SIGTERM exit status "
                  f"{restarted.stop()}")
            failed |= lag >= FAIL_FAST_S or not identical
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
