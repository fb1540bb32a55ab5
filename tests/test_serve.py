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
from qa_service.web.server import KeepAliveThreadWorker, QAServer, WorkerActivity, gunicorn_options, is_loopback

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
    # gunicorn's gthread worker, which keeps an idle worker's connection on its thread (KeepAliveThreadWorker)
    from gunicorn.workers.gthread import ThreadWorker

    assert cfg.worker_class is KeepAliveThreadWorker and issubclass(cfg.worker_class, ThreadWorker)
    assert cfg.threads == 4 and cfg.timeout == 30 and not cfg.preload_app
    assert cfg.limit_request_line == 8190
    assert gunicorn_options("::1", 80, 1)["bind"] == ["[::1]:80"]
    # The workers' activity counters: one for each of 3 workers, twice over, plus 2; handed out by the master's
    # hooks before each fork, taken up after it (besides the heartbeat hook), and freed when a worker exits.
    activity = server.activity
    assert len(activity._counts) == 8
    worker = _Worker()
    cfg.pre_fork(None, worker)
    assert worker.qa_activity_slot == 0
    import gunicorn.util

    from qa_service.web import server as server_module

    # post_fork still runs the heartbeat hook, which remembers the worker and patches gunicorn's error page:
    # restored after the test.
    monkeypatch.setattr(server_module, "_worker", None)
    monkeypatch.setattr(gunicorn.util, "write_error", gunicorn.util.write_error)
    cfg.post_fork(None, worker)
    assert activity._slot == worker.qa_activity_slot and server_module._worker is worker
    activity._counts[worker.qa_activity_slot] = 1
    server.cfg.child_exit(None, worker)
    assert activity._counts[worker.qa_activity_slot] == 0 and worker.qa_activity_slot in activity._free



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

    from qa_service.web.server import OneWriteResponse, QAServer, gunicorn_options

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

    from qa_service.config import Settings

    monkeypatch.setattr(gw, "Response", stock)  # put back after the test
    QAServer(Settings(), gunicorn_options("127.0.0.1", 8000, 1))
    assert gw.Response is OneWriteResponse  # what gunicorn's workers build


@pytest.mark.parametrize("environ_extra, status, sent", [
    ({}, "200 OK", 5821),
    ({"HTTP_USER_AGENT": 'curl/8 "quoted"', "HTTP_REFERER": "http://127.0.0.1:8000/?q=a%22b"}, "404 NOT FOUND", 0),
    ({"HTTP_AUTHORIZATION": "Basic " + __import__("base64").b64encode(b'ann"e:secret').decode()}, 413, None),
    ({"RAW_URI": '/api/ask?q="x"', "REMOTE_ADDR": "::1"}, "400 BAD REQUEST", 87),
])
def test_the_access_line_is_gunicorns_own(environ_extra, status, sent, monkeypatch):
    """The cheaper access log writes exactly the line gunicorn's would, quotes escaped as gunicorn does."""
    import datetime
    import io
    import logging

    from gunicorn.config import Config
    from gunicorn.glogging import Logger as GunicornLogger

    from qa_service.web.server import StderrLogger

    cfg = Config()
    cfg.set("accesslog", "-")
    log = StderrLogger(cfg)
    monkeypatch.setattr(log, "now", lambda: "[27/Nov/2026:18:00:00 +0000]")
    stream = io.StringIO()
    for handler in log.access_log.handlers:
        if getattr(handler, "_gunicorn", False):  # gunicorn's own handler (not a test runner's)
            handler.setStream(stream)

    class Response:
        headers = [("Content-Type", "application/json"), ("X-Frame-Options", "DENY")]

    class Request:
        headers = [("HOST", "127.0.0.1:8000"), ("CONTENT-TYPE", "application/json")]

    response = Response()
    response.status = status
    if sent is not None:
        response.sent = sent
    environ = {"REQUEST_METHOD": "POST", "RAW_URI": "/api/ask", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "PATH_INFO": "/api/ask", "QUERY_STRING": "", **environ_extra}
    took = datetime.timedelta(microseconds=6543)
    log.access(response, Request(), environ, took)
    ours = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    GunicornLogger.access(log, response, Request(), environ, took)
    assert ours == stream.getvalue() and ours.count("\n") == 1 and '"POST ' in ours
    # A custom format is gunicorn's business: its own atoms, such as the request time in microseconds.
    cfg.set("access_log_format", "%(r)s %(D)s")
    stream.seek(0)
    stream.truncate()
    log.access(response, Request(), environ, took)
    assert stream.getvalue().endswith(" 6543\n")
    assert logging.getLevelName(log.access_log.level) == "INFO"


def test_workers_see_each_other_answering_through_shared_memory():
    """``WorkerActivity``: counters in memory shared across the fork; each worker sees the others', not its own."""
    import multiprocessing

    activity = WorkerActivity(workers=2)
    a, b = _Worker(), _Worker()
    activity.assign(a)
    activity.assign(b)
    assert a.qa_activity_slot != b.qa_activity_slot
    seen = multiprocessing.get_context("fork").Queue()
    started, release = multiprocessing.get_context("fork").Event(), multiprocessing.get_context("fork").Event()

    def worker_b():
        activity.adopt(b)
        seen.put(activity.others_answering())
        with activity.answering():
            started.set()
            release.wait(30)

    child = multiprocessing.get_context("fork").Process(target=worker_b)
    child.start()
    activity.adopt(a)  # this process plays worker a
    assert started.wait(30)
    assert seen.get(timeout=30) is False  # b alone
    assert activity.others_answering()  # a sees b answering
    with activity.answering(), activity.answering():  # two questions of this worker's threads
        assert activity._counts[a.qa_activity_slot] == 2
        assert activity.others_answering()  # its own count does not matter
    assert activity._counts[a.qa_activity_slot] == 0
    release.set()
    child.join(30)
    assert not activity.others_answering()

    # A worker killed mid-answer: the master clears its flag when it reaps it, and re-uses the slot.
    dead = _Worker()
    activity.assign(dead)
    activity._counts[dead.qa_activity_slot] = 1
    assert activity.others_answering()
    activity.release(dead)
    assert not activity.others_answering()

    # More workers than flags (a reload overlapping old and new workers): the extra one just does not publish.
    extra = [_Worker() for _ in range(len(activity._counts) + 1)]
    for w in extra:
        activity.assign(w)
    assert extra[-1].qa_activity_slot is None
    lone = WorkerActivity(workers=1)
    lone.adopt(extra[-1])
    with lone.answering():
        assert not any(lone._counts)
    with pytest.raises(RuntimeError):
        with activity.answering():  # a failed answer still lowers the count
            raise RuntimeError("boom")
    assert activity._counts[activity._slot] == 0


def test_the_app_marks_its_answers_and_shares_cores_with_other_workers(fake_searcher):
    """``create_app(activity=...)`` hands the encoder the "others answering" signal, at start and after a reload,
    and counts the question in this worker's counter while the worker holds it."""
    from qa_service.web import create_app

    activity = WorkerActivity(workers=2)
    me = _Worker()
    activity.assign(me)
    activity.adopt(me)

    class Embedder:
        def __init__(self, inner):
            self.inner, self.shared = inner, None

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def share_cores(self, contended):
            self.shared = contended

    class Recording:
        def __init__(self, inner):
            self.inner, self.embedder, self.flags = inner, Embedder(inner.embedder), []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def ask(self, question, k=5, filters=None, mode="hybrid"):
            self.flags.append(activity._counts[me.qa_activity_slot])
            return self.inner.ask(question, k=k, filters=filters, mode=mode)

    searcher = Recording(fake_searcher)
    app = create_app(fake_searcher.settings, searcher, activity=activity)
    assert searcher.embedder.shared == activity.others_answering
    response = app.test_client().post("/api/ask", json={"question": "Who leads Hamas?"})
    assert response.status_code == 200
    assert searcher.flags == [1] and activity._counts[me.qa_activity_slot] == 0

    fresh = Recording(fake_searcher)
    state = app.extensions["qa_service"]
    state._share_cores(fresh)
    assert fresh.embedder.shared == activity.others_answering


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
            except requests.ConnectionError:
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
                texts[c["article_id"]] = requests.get(f"{base}/api/articles/{c['article_id']}", timeout=10).json()["text"]
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


def _keepalive_server(threads: int, *keepalive: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_")}
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


def test_a_body_refused_unread_closes_the_connection_it_cannot_keep():
    """An answer given with more of the body unread than gunicorn drains (64 KiB) says ``Connection: close`` (gunicorn
    would close the connection after promising keep-alive); a smaller unread body is drained and the connection kept."""
    proc, port = _keepalive_server(4)
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
