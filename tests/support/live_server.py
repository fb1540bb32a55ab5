"""A real ``qa-service serve`` (gunicorn, real model) on loopback for the reliability tests, and what they measure.

Only loopback addresses are ever used. Every loop here is bounded in requests and in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from benchmarks.harness import SEED_QUESTIONS
from benchmarks.load import children

API_KEY = "test-key-" + "0123456789abcdef"
QUESTIONS = SEED_QUESTIONS  # the bench asks the same questions of the seeds

# Figures the reliability tests measure, printed at the end of the run (conftest.pytest_terminal_summary).
FIGURES: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command() -> list[str]:
    script = Path(sys.executable).with_name("qa-service")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from qa_service.cli import cli; cli()"]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_") and k != "FLASK_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def link_copy(source: Path, target: Path) -> None:
    """Copy an index folder by hard links: builds are immutable and CURRENT is replaced, never rewritten.

    The writer lock and journal stay behind: a shared lock inode would tie the copy's writers to the original's.
    """
    shutil.copytree(source, target, copy_function=os.link,
                    ignore=shutil.ignore_patterns("write.lock", "write-journal.json", ".write-journal.json.*"))


@dataclass
class LiveServer:
    """One ``qa-service serve`` process group."""

    index_dir: Path
    seeds_dir: Path
    log: Path
    workers: int = 2
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "LiveServer":
        self.port = free_port()
        env = clean_env(QA_API_KEY=API_KEY, QA_SEEDS_DIR=str(self.seeds_dir), **self.env)
        self._log = open(self.log, "a")
        self.proc = subprocess.Popen(command() + ["serve", "--index-dir", str(self.index_dir), "--port", str(self.port),
                                                 "--workers", str(self.workers)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not become healthy:\n" + self.log.read_text()[-3000:])
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self._log.close()
        self.proc = None
        return code

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        return children(self.proc.pid)

    def wait_for_build(self, build_id: str, timeout: float = 30, hits: int = 12) -> None:
        """Wait until ``hits`` health checks in a row (so every worker, most likely) serve ``build_id``."""
        deadline = time.monotonic() + timeout
        streak = 0
        while streak < hits:
            assert time.monotonic() < deadline, f"build {build_id} not served after {timeout} s"
            served = requests.get(self.url + "/healthz", timeout=10).json()["build_id"]
            streak = streak + 1 if served == build_id else 0
            time.sleep(0.15)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class LoadResult:
    clients: int
    sent: int
    failed: int
    seconds: float
    latencies_ms: list[float]
    failures: list[str]
    statuses: dict = field(default_factory=dict)  # status -> count
    error_bodies: list = field(default_factory=list)  # parsed JSON of every non-200 answer

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.clients} clients: {self.sent} requests in {self.seconds:.1f} s ({self.rate:.0f} req/s), "
                f"{self.failed} failed, p50 {self.percentile(50):.0f} ms, p99 {self.percentile(99):.0f} ms, "
                f"max {max(self.latencies_ms, default=float('nan')):.0f} ms")


def run_load(base_url: str, clients: int, requests_total: int, time_cap: float, timeout: float = 30,
             ok_statuses: tuple[int, ...] = (200,)) -> LoadResult:
    """Send ``requests_total`` questions from ``clients`` threads (keep-alive sessions); stop at ``time_cap`` s.

    A request fails on a connection error, a timeout, or a status outside ``ok_statuses``.
    """
    counter = iter(range(requests_total))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    statuses: dict = {}
    error_bodies: list = []
    deadline = time.monotonic() + time_cap

    def client(n: int) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            question = QUESTIONS[i % len(QUESTIONS)]
            t0 = time.perf_counter()
            try:
                if i % 2:
                    r = session.post(base_url + "/api/ask", json={"question": question, "k": 1 + i % 10},
                                     timeout=timeout)
                else:
                    r = session.get(base_url + "/api/ask", params={"q": question, "k": 1 + i % 10}, timeout=timeout)
                ok = r.status_code in ok_statuses
                detail = f"{r.status_code} {r.text[:200]}"
                status = r.status_code
                body = None if status == 200 else r.json()
            except (requests.RequestException, ValueError) as exc:
                ok, detail, status, body = False, f"{type(exc).__name__}: {exc}", None, None
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                if body is not None:
                    error_bodies.append(body)
                if not ok:
                    failures.append(detail)
        session.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_cap + timeout + 5)
    seconds = time.perf_counter() - started
    return LoadResult(clients, len(latencies), len(failures), seconds, latencies, failures, statuses, error_bodies)
