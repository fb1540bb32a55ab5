"""`qa-service serve`: start-up checks (fast) and a real gunicorn subprocess on the real model (slow)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from qa_service.cli import cli
from qa_service.config import Settings
from qa_service.tuning import parse_tuning
from qa_service.tuning.keepalive import KeepAliveThreadWorker
from qa_service.web.server import QAServer, gunicorn_options, is_loopback

SEEDS = Path(__file__).resolve().parent.parent / "seeds"
QUESTION = "What did Pezeshkian say about rebuilding Gaza?"


# --------------------------------------------------------------------------- start-up checks

@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.9", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.10", False), ("no-such-host.invalid", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_needs_public(fake_index, monkeypatch):
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--index-dir", str(fake_index.index_dir)])
    assert result.exit_code == 2 and "--public" in result.output


def test_debug_is_refused(fake_index, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(fake_index.index_dir)])
    assert result.exit_code == 1 and "FLASK_DEBUG" in result.output


def test_missing_or_mismatched_index_fails_before_serving(tmp_path, fake_index, monkeypatch):
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "No index found" in result.output and "Traceback" not in result.output
    # the fake index was built with another model than the default one
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(fake_index.index_dir)])
    assert result.exit_code == 1 and "fake-hash-64" in result.output
    result = CliRunner().invoke(cli, ["serve", "--build", str(tmp_path / "no-seeds")])
    assert result.exit_code == 2


def test_gunicorn_configuration(fake_index, monkeypatch):
    server = QAServer(fake_index, gunicorn_options("127.0.0.1", 8123, workers=3))
    cfg = server.cfg
    assert cfg.bind == ["127.0.0.1:8123"] and cfg.workers == 3
    # gunicorn's stock gthread worker unless QA_TUNING names keepalive
    from gunicorn.workers.gthread import ThreadWorker

    assert cfg.worker_class is ThreadWorker
    assert cfg.threads == 4 and cfg.timeout == 30 and not cfg.preload_app
    assert cfg.limit_request_line == 8190
    assert gunicorn_options("::1", 80, 1)["bind"] == ["[::1]:80"]
    tuned = QAServer(fake_index, gunicorn_options("127.0.0.1", 8123, workers=3, tuning=parse_tuning("keepalive")))
    assert tuned.cfg.worker_class is KeepAliveThreadWorker and issubclass(KeepAliveThreadWorker, ThreadWorker)
    assert server.activity is None  # no worker activity counters unless QA_TUNING names encoder_cores
    import gunicorn.util

    from qa_service.web import server as server_module

    # post_fork remembers the worker (the heartbeat) and patches gunicorn's error page: restored after the test.
    monkeypatch.setattr(server_module, "_worker", None)
    monkeypatch.setattr(gunicorn.util, "write_error", gunicorn.util.write_error)
    worker = _Worker()
    cfg.post_fork(None, worker)
    assert server_module._worker is worker and gunicorn.util.write_error is server_module.write_error_body
    assert cfg.pre_request is not None and cfg.pre_request.__name__ == "close_after_large_body"


class _Worker:  # what gunicorn hands its hooks: an object the master can tag before the fork
    pass


class _Wire:
    """A socket that records what gunicorn writes: one entry per ``sendall``, and a file sent by ``sendfile``."""

    def __init__(self):
        self.writes: list[bytes] = []

    def sendall(self, data):
        self.writes.append(bytes(data))

    def sendfile(self, file, offset=0, count=None):
        file.seek(offset)
        self.writes.append(file.read(count))


def _serve_once(response_class, app, raw: bytes) -> list[bytes]:
    """One request through gunicorn's own parser, ``wsgi.create`` and write loop, with ``response_class``."""
    import gunicorn.http.wsgi as gw
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    cfg = Config()
    req = next(RequestParser(cfg, iter([raw]), ("127.0.0.1", 5000)))
    wire = _Wire()
    resp, environ = gw.create(req, wire, ("127.0.0.1", 5000), ("127.0.0.1", 8000), cfg, response_class=response_class)
    respiter = app(environ, resp.start_response)
    try:
        if isinstance(respiter, environ["wsgi.file_wrapper"]):
            resp.write_file(respiter)
        else:
            for item in respiter:
                resp.write(item)
        resp.close()
    finally:
        if hasattr(respiter, "close"):
            respiter.close()
    return wire.writes


def test_one_write_responses_send_what_gunicorn_sends(tmp_path, monkeypatch):
    """``OneWriteResponse`` puts the header block in the same write as the first body bytes, and otherwise sends
    exactly gunicorn's bytes: a plain body, several chunks, chunked framing, no body (HEAD, 204) and a file."""
    import gunicorn.http.wsgi as gw
    import gunicorn.util

    from qa_service.tuning.one_write import OneWriteResponse

    monkeypatch.setattr(gunicorn.util, "http_date", lambda *a: "Fri, 27 Nov 2026 21:00:00 GMT")
    stock = OneWriteResponse.__bases__[0]
    page = tmp_path / "page.css"
    page.write_bytes(b"body { margin: 0 }\n" * 300)

    def app(body, status="200 OK", length=True):
        def run(environ, start_response):
            chunks = list(body)
            headers = [("Content-Type", "application/json")]
            if length:
                headers.append(("Content-Length", str(sum(map(len, chunks)))))
            if environ["REQUEST_METHOD"] == "HEAD":
                chunks = []
            start_response(status, headers)
            return chunks
        return run

    def file_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/css"), ("Content-Length", str(page.stat().st_size))])
        return environ["wsgi.file_wrapper"](page.open("rb"))

    get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    cases = [
        (app([b'{"ok": true}']), get, 1),  # the JSON API's case: headers and body in one write
        (app([b"a" * 70000, b"b" * 10]), get, 2),  # more chunks: the headers ride with the first
        (app([b"abc", b"def"], length=False), get, None),  # chunked framing: gunicorn's own writes
        (app([b'{"ok": true}']), b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", 1),  # no body: headers at close
        (app([], status="204 No Content", length=False), get, 1),
        (file_app, get, 2),  # sendfile: the headers must leave before the file
    ]
    for wsgi_app, raw, expected_writes in cases:
        ours = _serve_once(OneWriteResponse, wsgi_app, raw)
        theirs = _serve_once(stock, wsgi_app, raw)
        assert b"".join(ours) == b"".join(theirs) and b"".join(ours).startswith(b"HTTP/1.1 ")
        if expected_writes is not None:
            assert len(ours) == expected_writes
        assert ours[0].startswith(b"HTTP/1.1 ")  # nothing before the header block
    assert len(_serve_once(stock, cases[0][0], get)) == 2  # what it replaces: two writes

    monkeypatch.setattr(gw, "Response", stock)  # put back after the test
    QAServer(Settings(), gunicorn_options("127.0.0.1", 8000, 1))
    assert gw.Response is stock  # off by default
    QAServer(Settings(tuning=parse_tuning("one_write")), gunicorn_options("127.0.0.1", 8000, 1))
    assert gw.Response is OneWriteResponse  # QA_TUNING=one_write: what gunicorn's workers build


def test_the_access_log_is_gunicorns_own_on_stderr(monkeypatch):
    """gunicorn's own logger and access line (Apache's combined format), sent to stderr instead of stdout."""
    import datetime
    import io
    import sys

    from gunicorn.config import Config
    from gunicorn.glogging import Logger as GunicornLogger

    from qa_service.web.server import StderrAccessLogger

    assert StderrAccessLogger.access is GunicornLogger.access  # the line is gunicorn's business
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = Config()
    cfg.set("accesslog", "-")
    log = StderrAccessLogger(cfg)

    class Response:
        status, sent, headers = "200 OK", 5821, [("Content-Type", "application/json")]

    environ = {"REQUEST_METHOD": "POST", "RAW_URI": "/api/ask", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "PATH_INFO": "/api/ask", "QUERY_STRING": ""}
    log.access(Response(), type("Request", (), {"headers": []})(), environ, datetime.timedelta(microseconds=6543))
    assert stderr.getvalue().startswith('127.0.0.1 - - [') and '"POST /api/ask HTTP/1.1" 200 5821' in stderr.getvalue()


# --------------------------------------------------------------------------- a real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("qa-service")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from qa_service.cli import cli; cli()"]


@pytest.mark.slow
def test_serve_real_model_over_http(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_") and k != "FLASK_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    seeds, index = tmp_path / "seeds", tmp_path / "index"
    shutil.copytree(SEEDS, seeds)
    built = subprocess.run(_command() + ["index", str(seeds), "--index-dir", str(index)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    # Change one article: `serve --build` must notice the stale index and rebuild before serving.
    with open(seeds / "001_714cc25dd3f7c4d2.txt", "a", encoding="utf-8") as fh:
        fh.write("\n\nThe flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(_command() + ["serve", "--build", str(seeds), "--index-dir", str(index),
                                          "--port", str(port), "--workers", "2"],
                            env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or no worker booted yet
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)

        health = requests.get(base + "/healthz", timeout=10).json()
        assert health["index_loaded"] is True and health["model"] == "all-MiniLM-L6-v2" and health["articles"] == 5

        r = requests.post(base + "/api/ask", json={"question": QUESTION}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True and body["results"]
        texts = {}
        for hit in body["results"]:
            c = hit["citation"]
            if c["article_id"] not in texts:
                article = requests.get(f"{base}/api/articles/{c['article_id']}", timeout=10)
                texts[c["article_id"]] = article.json()["text"]
            assert texts[c["article_id"]][c["start"]:c["end"]] == hit["text"]
        assert any(h["citation"]["article_id"].startswith("003_") and "rebuild Gaza" in h["text"]
                   for h in body["results"][:3])

        # the rebuilt index holds the changed article; both workers answer (several requests)
        for _ in range(4):
            hits = requests.get(base + "/api/ask", params={"q": "flamingo parade with zebras", "k": 1},
                                timeout=60).json()["results"]
            assert "flamingo" in hits[0]["text"]

        bad = requests.post(base + "/api/ask", json={"question": " "}, timeout=10)
        assert bad.status_code == 400 and bad.json() == {
            "ok": False, "error": {"code": "question_empty", "message": "The question is empty; type a question."}}
        bad = requests.post(base + "/api/ask", data="{", headers={"Content-Type": "application/json"}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        bad = requests.post(base + "/api/ask", data="x" * 70_000, headers={"Content-Type": "application/json"},
                            timeout=10)
        assert bad.status_code == 413 and bad.json()["error"]["code"] == "body_too_large"
        with requests.Session() as session:  # refused unread: the connection closes, and says so; the next is new
            for _ in range(3):
                bad = session.post(base + "/api/ask", data="x" * 70_000,
                                   headers={"Content-Type": "application/json"}, timeout=10)
                assert bad.status_code == 413 and bad.headers["Connection"] == "close"
                assert session.get(base + "/healthz", timeout=10).status_code == 200

        page = requests.get(base + "/", params={"q": QUESTION}, timeout=60)
        assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
        assert "script-src 'self'" in page.headers["Content-Security-Policy"] and 'class="hit"' in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        out.close()
        err.close()
    assert code == 0
    stderr = (tmp_path / "stderr").read_text()
    assert "building index (the articles changed)" in stderr
    assert '"POST /api/ask HTTP/1.1" 200' in stderr  # the access log goes to stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "stdout").read_text().strip() == ""


def test_the_worker_keeps_a_connection_only_while_it_has_nothing_else():
    """``KeepAliveThreadWorker._linger_on``: one thread at a time, only with no other connection busy or queued, never
    its only thread, never HTTP/2, TLS, a stopping worker or bytes of a next request already read."""
    import io
    import threading
    from types import SimpleNamespace

    worker = object.__new__(KeepAliveThreadWorker)
    worker.alive, worker._held, worker._lingering, worker._count_lock = True, 1, False, threading.Lock()
    worker.cfg = SimpleNamespace(threads=4, is_ssl=False, keepalive=5)

    def conn(buffered=b"", http2=False):
        unreader = SimpleNamespace(buf=io.BytesIO(buffered))
        return SimpleNamespace(is_http2=http2, parser=SimpleNamespace(unreader=unreader))

    assert worker._linger_on(conn()) and worker._lingering
    assert not worker._linger_on(conn())  # another thread already waits on its connection
    worker._lingering = False
    for held in (0, 2):
        worker._held = held
        assert not worker._linger_on(conn()) and not worker._lingering
    worker._held = 1
    assert not worker._linger_on(conn(b"GET / HTTP/1.1\r\n"))  # a pipelined request: gunicorn re-queues it
    assert not worker._linger_on(conn(http2=True))
    for cfg in (SimpleNamespace(threads=1, is_ssl=False, keepalive=5), SimpleNamespace(threads=4, is_ssl=True,
                                                                                         keepalive=5)):
        worker.cfg = cfg
        assert not worker._linger_on(conn())
    worker.cfg, worker.alive = SimpleNamespace(threads=4, is_ssl=False, keepalive=5), False
    assert not worker._linger_on(conn()) and not worker._lingering
    worker.alive = True
    assert worker._linger_on(conn())


def _keepalive_server(threads: int, *keepalive: str, tuning: str = "keepalive") -> tuple[subprocess.Popen, int]:
    """The test server of tests/support/keepalive_server.py, with ``QA_TUNING=tuning``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_")}
    env["QA_TUNING"] = tuning
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "support" / "keepalive_server.py"), str(port),
                             str(threads), *keepalive], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the keep-alive test server did not start"
            time.sleep(0.05)


def _get(conn, path: str = "/") -> dict:
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    return __import__("json").loads(response.read())


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)  # gunicorn's graceful stop: a waiting thread lets go within a slice
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()


@pytest.mark.parametrize("threads", [4, 1])
def test_a_kept_connection_holds_up_no_other(threads):
    """While an idle worker's thread waits on one client's connection, other connections are answered at once (by
    another thread; with one thread the worker never waits on a connection); the kept one still gets its answers,
    pipelined requests included, and a stop lets go of it."""
    import http.client

    proc, port = _keepalive_server(threads)
    try:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        first = _get(kept)["thread"]
        time.sleep(0.2)  # the worker has nothing else: its thread now waits on this connection (with 4 threads)
        # A timeout far below the keep-alive (5 s): an answer held up behind the kept connection fails here.
        other = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        answered_by = _get(other, "/other")["thread"]
        if threads > 1:
            assert answered_by != first
            assert _get(kept)["thread"] == first  # the thread that waited on the connection answered it
        else:
            assert _get(kept)["thread"] == first == answered_by
        other.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # two requests in one write
            raw.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while got.count(b'"path"') < 2:
                data = raw.recv(65536)
                assert data, "the connection closed before both answers"
                got += data
            assert b'"/a"' in got and b'"/b"' in got
        time.sleep(0.2)
        assert _get(kept, "/slow")["path"] == "/slow"
        time.sleep(0.2)  # waiting on the connection again when the stop comes
        assert _stop(proc) == 0
        kept.close()
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_a_kept_connection_is_closed_when_its_keep_alive_runs_out():
    """A thread waiting on a connection lets it go after the keep-alive timeout (1 s here) by closing it, as the
    poller would have, not by handing it to the poller for another timeout."""
    import http.client

    proc, port = _keepalive_server(4, "1")
    try:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        _get(kept)
        kept.sock.settimeout(1.8)  # closed after 1 s: the read ends with the server's close, not by this timeout
        started = time.monotonic()
        assert kept.sock.recv(1) == b""
        assert time.monotonic() - started >= 0.9
        kept.close()
        assert _get(http.client.HTTPConnection("127.0.0.1", port, timeout=5))["path"] == "/"
    finally:
        _stop(proc)


@pytest.mark.parametrize("tuning", ["", "keepalive,one_write"])
def test_a_body_refused_unread_closes_the_connection_it_cannot_keep(tuning):
    """An answer given with more of the body unread than gunicorn drains (64 KiB) says ``Connection: close`` (gunicorn
    would close the connection after promising keep-alive); a smaller unread body is drained and the connection kept.
    By default and with the gunicorn tunings."""
    proc, port = _keepalive_server(4, tuning=tuning)
    try:
        for size, kept in ((10_000, True), (65_535, True), (65_536, False), (70_000, False), (2_000_000, False)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                head = f"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
                try:
                    raw.sendall(head + b"x" * size)
                except OSError:  # the server may close before a 2 MB body is all sent
                    pass
                answer = b""
                while b"\r\n\r\n" not in answer:
                    data = raw.recv(65536)
                    assert data
                    answer += data
                headers = answer.split(b"\r\n\r\n")[0].lower()
                assert headers.startswith(b"http/1.1 413")
                assert (b"connection: keep-alive" in headers) is kept and (b"connection: close" in headers) is not kept
                if kept:  # the same connection answers the next request
                    raw.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
                    more = answer.split(b"\r\n\r\n", 1)[1]
                    while b'"/next"' not in more:
                        data = raw.recv(65536)
                        assert data, "the kept connection was closed"
                        more += data
    finally:
        _stop(proc)
