"""Loopback load and process probes: a real ``qa-service serve`` subprocess, bounded HTTP clients, RSS of its workers.

Every request goes to 127.0.0.1 only; every loop is bounded in requests and in time and stops by itself.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def qa_service_command() -> list[str]:
    script = Path(sys.executable).with_name("qa-service")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from qa_service.cli import cli; cli()"]


def clean_env(**extra: str) -> dict:
    """The environment for a served process: no ``QA_*`` setting but ``QA_TUNING`` (the bench measures either)."""
    env = {k: v for k, v in os.environ.items() if (k == "QA_TUNING" or not k.startswith("QA_")) and k != "FLASK_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def percentiles(values_ms, ps=(50, 95, 99)) -> dict[str, float]:
    arr = np.asarray(values_ms, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) if len(arr) else float("nan") for p in ps}


def post_ask(conn: http.client.HTTPConnection, question: str, k: int = 5) -> int:
    body = json.dumps({"question": question, "k": k})
    conn.request("POST", "/api/ask", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def recorded_answer(port: int, question: str, k: int = 5) -> bytes:
    """One ``POST /api/ask`` answer of the server on ``port`` as it came: status line, headers (in order), body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", "/api/ask", body=json.dumps({"question": question, "k": k}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    head = [f"HTTP/1.1 {response.status} {response.reason}", *(f"{name}: {value}" for name, value in
                                                                response.getheaders())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class CannedServer:
    """A loopback server that answers every request at once with the same recorded bytes (``recorded_answer``).

    What a client's round trip costs when the server takes no time: the client's own work (building the request,
    reading the answer) and the kernel's (loopback, waking each side). A separate process (a plain socket loop,
    one connection at a time) so it shares no interpreter lock with the client. It exits by itself after
    ``idle_seconds`` without a connection or a request.
    """

    def __init__(self, answer: bytes, idle_seconds: float = 60.0):
        self.answer, self.idle_seconds = answer, idle_seconds
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "CannedServer":
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "canned", str(self.idle_seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.proc.stdin.write(self.answer)
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError("the canned-answer server did not start")
        self.port = int(line)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def _serve_canned(answer: bytes, idle_seconds: float) -> None:
    """``CannedServer``'s process: answer each request (headers, then ``Content-Length`` bytes) with ``answer``."""
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(idle_seconds)
        print(listener.getsockname()[1], flush=True)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return
            with conn:
                conn.settimeout(idle_seconds)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer = b""
                try:
                    while data := conn.recv(65536):
                        buffer += data
                        while (end := buffer.find(b"\r\n\r\n")) >= 0:
                            length = 0
                            for line in buffer[:end].split(b"\r\n")[1:]:
                                name, _, value = line.partition(b":")
                                if name.strip().lower() == b"content-length":
                                    length = int(value)
                            if len(buffer) < end + 4 + length:
                                break
                            buffer = buffer[end + 4 + length:]
                            conn.sendall(answer)
                except (TimeoutError, OSError):
                    pass


@dataclass
class Server:
    """One ``qa-service serve`` process group on loopback."""

    index_dir: Path
    log: Path
    workers: int = 2
    env: dict = field(default_factory=dict)
    command: list[str] | None = None  # what runs ``serve ...`` (default: ``qa-service``; ``web`` runs a traced one)
    port: int = 0
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "Server":
        self.port = free_port()
        self._log = open(self.log, "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            (self.command or qa_service_command()) + ["serve", "--index-dir", str(self.index_dir), "--host", HOST,
                                    "--port", str(self.port), "--workers", str(self.workers)],
            stdout=self._log, stderr=subprocess.STDOUT, env=clean_env(**self.env), start_new_session=True)
        return self

    def wait_first_answer(self, question: str, timeout: float = 120.0) -> float:
        """Poll POST /api/ask until a 200; return seconds since ``start``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qa-service serve exited with {self.proc.returncode}; see {self.log}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                try:
                    if post_ask(conn, question) == 200:
                        return time.perf_counter() - self.started_at
                finally:
                    conn.close()
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"no answer from qa-service serve within {timeout:.0f} s; see {self.log}")

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: children of the gunicorn master (our child)."""
        return children(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (read from /proc), sorted."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS (shared pages split among the processes sharing them) and private MiB of a process."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                values[parts[0].rstrip(":")] = int(parts[1]) / 1024
    except OSError:
        return {}
    return {"rss": values.get("Rss", 0.0), "pss": values.get("Pss", 0.0),
            "private": values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0)}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by processes ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def maps_torch(pid: int) -> bool:
    """Whether libtorch is mapped into process ``pid``."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def sequential(port: int, questions: list[str], n: int, k: int = 5) -> list[float]:
    """Send ``n`` questions one after another on one keep-alive connection; return latencies in ms."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            status = post_ask(conn, questions[i % len(questions)], k)
            out.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"POST /api/ask answered {status}")
    finally:
        conn.close()
    return out


def closed_loop(port: int, questions: list[str], clients: int, seconds: float, max_requests: int,
                k: int = 5) -> dict:
    """``clients`` threads, each asking on its own keep-alive connection as soon as its last answer came.

    Stops after ``seconds`` or ``max_requests`` in all, whichever comes first. Returns requests/s (200s only),
    latency percentiles and the count of non-200 answers and connection errors.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    budget = threading.Semaphore(max_requests)
    start_gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        start_gate.wait()
        i = slot
        try:
            while time.perf_counter() < stop_at[0] and budget.acquire(blocking=False):
                t0 = time.perf_counter()
                try:
                    status = post_ask(conn, questions[i % len(questions)], k)
                except OSError:
                    failures[slot] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=30)
                    continue
                if status == 200:
                    latencies[slot].append((time.perf_counter() - t0) * 1000)
                else:
                    failures[slot] += 1
                i += clients
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.perf_counter() - started
    done = [x for slot in latencies for x in slot]
    return {"clients": clients, "requests": len(done), "failures": sum(failures), "seconds": elapsed,
            "rps": len(done) / elapsed if elapsed > 0 else 0.0, **percentiles(done)}


if __name__ == "__main__" and sys.argv[1:2] == ["canned"]:
    _serve_canned(sys.stdin.buffer.read(), float(sys.argv[2]))
