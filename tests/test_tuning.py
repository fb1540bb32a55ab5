"""The opt-in tuning (``QA_TUNING``, ``qa_service/tuning/``) and the default-on gunicorn hooks, against the installed
gunicorn and Flask: each hook a tuning needs is checked here, and a missing one stops the start with a sentence."""

from __future__ import annotations

import inspect
import multiprocessing

import pytest

from qa_service.config import Settings
from qa_service.errors import ConfigError
from qa_service.tuning import NAMES, TuningUnavailable, parse_tuning
from qa_service.web.server import QAServer, gunicorn_options

QUESTION = "What did Pezeshkian say about rebuilding Gaza?"


class _Worker:  # what gunicorn hands its hooks: an object the master can tag before the fork
    pass


# --------------------------------------------------------------------------- the setting

def test_qa_tuning_names_tunings_or_all_and_nothing_by_default(monkeypatch):
    assert Settings().tuning == frozenset() and parse_tuning("") == frozenset()
    assert parse_tuning("all") == frozenset(NAMES) == {"keepalive", "one_write", "fast_path", "encoder_cores"}
    assert parse_tuning(" keepalive, ONE_WRITE ,") == {"keepalive", "one_write"}
    monkeypatch.setenv("QA_TUNING", "fast_path")
    assert Settings.from_env().tuning == {"fast_path"}
    monkeypatch.setenv("QA_TUNING", "")
    assert Settings.from_env().tuning == frozenset()
    with pytest.raises(ConfigError, match="unknown tuning \\(turbo\\).*keepalive, one_write, fast_path, encoder_cores"):
        parse_tuning("keepalive,turbo")


# --------------------------------------------------------------------------- the hooks, in the installed libraries

def test_the_installed_gunicorn_and_flask_have_every_hook_the_tunings_use():
    """Fails when an upgrade removes or changes what a tuning overrides or calls."""
    from flask import Flask
    from gunicorn.http.wsgi import Response, create
    from gunicorn.workers.gthread import ThreadWorker

    from qa_service.tuning import fast_path, keepalive, one_write

    keepalive.check_hooks()
    one_write.check_hooks()
    fast_path.check_hooks(Flask(__name__))
    # The same, spelled out: what each tuning relies on.
    assert [list(inspect.signature(getattr(ThreadWorker, name)).parameters) for name in
            ("init_process", "enqueue_req", "handle")] == [["self"], ["self", "conn"], ["self", "conn"]]
    assert list(inspect.signature(Response._emit_body).parameters) == ["self", "data"]
    assert inspect.signature(create).parameters["response_class"].default is None
    assert one_write.OneWriteResponse.__bases__ == (Response,)


@pytest.mark.parametrize("tuning, owner, name", [
    ("keepalive", "gunicorn.workers.gthread:ThreadWorker", "enqueue_req"),
    ("one_write", "gunicorn.http.wsgi:Response", "_emit_body"),
    ("fast_path", "flask:Flask", "finalize_request"),
])
def test_a_tuning_whose_hook_is_gone_stops_the_start(tuning, owner, name, fake_index, monkeypatch):
    import importlib

    module, _, cls = owner.partition(":")
    monkeypatch.delattr(getattr(importlib.import_module(module), cls), name)
    settings = fake_index.with_(tuning=parse_tuning(tuning))
    with pytest.raises(TuningUnavailable, match=f"QA_TUNING asks for '{tuning}'.*{name}"):
        QAServer(settings, gunicorn_options("127.0.0.1", 8000, 1, tuning=settings.tuning))
    QAServer(fake_index, gunicorn_options("127.0.0.1", 8000, 1))  # with the tuning off nothing needs it


def test_a_fast_path_whose_flask_hook_is_gone_stops_the_app(fake_index, fake_searcher, monkeypatch):
    from flask import Flask

    from qa_service.web import create_app

    monkeypatch.delattr(Flask, "handle_user_exception")
    with pytest.raises(TuningUnavailable, match="fast_path"):
        create_app(fake_index.with_(tuning=parse_tuning("fast_path")), searcher=fake_searcher)


# --------------------------------------------------------------------------- default-on: gunicorn's own answers

def test_the_installed_gunicorn_has_the_hooks_served_by_default():
    """gunicorn's error page writer (replaced by ``write_error_body``) and a request's ``must_close`` (set by the
    ``pre_request`` hook): the pin in pyproject.toml keeps these; this fails when an upgrade changes them."""
    import gunicorn.util
    from gunicorn.workers.base import Worker

    from qa_service.web.server import check_gunicorn

    check_gunicorn()
    assert list(inspect.signature(gunicorn.util.write_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert "write_error" in Worker.handle_error.__code__.co_names  # gunicorn calls it through the module


def test_a_gunicorn_without_its_error_page_writer_stops_the_start(fake_index, monkeypatch):
    import gunicorn.util

    monkeypatch.delattr(gunicorn.util, "write_error")
    with pytest.raises(ConfigError, match="write_error"):
        QAServer(fake_index, gunicorn_options("127.0.0.1", 8000, 1))


def test_gunicorns_own_error_answers_have_the_services_shape():
    import json

    from qa_service.web.headers import SECURITY_HEADERS
    from qa_service.web.server import write_error_body

    class Sock:
        def __init__(self):
            self.data = b""

        def gettimeout(self):
            return None

        def setblocking(self, flag):
            pass

        def sendall(self, data):
            self.data += data

    for status, reason, code in ((400, "Bad Request", "bad_request"), (414, "Request-URI Too Long",
                                                                         "request_uri_too_large"),
                                 (431, "Request Header Fields Too Large", "header_fields_too_large"),
                                 (500, "Internal Server Error", "internal_error")):
        sock = Sock()
        write_error_body(sock, status, reason, "Invalid request line: GET /<script>")
        head, body = sock.data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == f"HTTP/1.1 {status} {reason}" and "Connection: close" in lines
        assert f"Content-Length: {len(body)}" in lines and "Content-Type: application/json" in lines
        assert all(f"{name}: {value}" in lines for name, value in SECURITY_HEADERS.items())
        assert json.loads(body)["error"]["code"] == code and b"script" not in body


@pytest.mark.parametrize("length, closes", [(0, False), (65_535, False), (65_536, True), (2_000_000, True)])
def test_a_large_body_is_answered_with_connection_close(length, closes):
    """The ``pre_request`` hook marks a request with a body of 64 KiB or more, and gunicorn's response closes."""
    import gunicorn.http.wsgi as gw
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    from qa_service.web.server import close_after_large_body

    cfg = Config()
    raw = f"POST /api/ask HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n\r\n".encode() + b"x" * length
    req = next(RequestParser(cfg, iter([raw]), ("127.0.0.1", 5000)))
    close_after_large_body(None, req)
    resp, _ = gw.create(req, None, ("127.0.0.1", 5000), ("127.0.0.1", 8000), cfg)
    resp.start_response("413 Request Entity Too Large", [("Content-Length", "0")])
    assert resp.should_close() is closes
    assert ("Connection: close\r\n" in resp.default_headers()) is closes


# --------------------------------------------------------------------------- encoder_cores (tuning/encoder_cores.py)

def test_encoder_cores_wires_the_workers_activity_into_gunicorns_hooks(fake_index, monkeypatch):
    """The master makes the activity before any fork and hands a counter out before each fork (``assign``), the
    worker takes it up after (``adopt``, besides the heartbeat hook), and the master frees it when the worker exits
    (``release``)."""
    import gunicorn.util

    from qa_service.tuning.encoder_cores import WorkerActivity, share_cores
    from qa_service.web import server as server_module

    server = QAServer(fake_index.with_(tuning=parse_tuning("encoder_cores")),
                      gunicorn_options("127.0.0.1", 8123, workers=3))
    activity, cfg = server.activity, server.cfg
    assert isinstance(activity, WorkerActivity) and server.share_cores is share_cores
    calls = []
    for name in ("assign", "adopt", "release"):
        monkeypatch.setattr(activity, name, lambda worker, name=name: calls.append((name, worker)))
    monkeypatch.setattr(server_module, "_worker", None)
    monkeypatch.setattr(gunicorn.util, "write_error", gunicorn.util.write_error)
    worker = _Worker()
    cfg.pre_fork(None, worker)
    cfg.post_fork(None, worker)
    cfg.child_exit(None, worker)
    assert calls == [("assign", worker), ("adopt", worker), ("release", worker)]
    assert server_module._worker is worker  # gunicorn_options' own post_fork still runs


def _in_child(target) -> None:
    child = multiprocessing.get_context("fork").Process(target=target)
    child.start()
    child.join(30)
    assert child.exitcode == 0


def test_workers_see_each_other_answering_through_shared_memory():
    """``WorkerActivity``: counters in memory shared across the fork; each worker sees the others', not its own; the
    master clears a worker killed mid-answer; a worker beyond the counters does not publish."""
    import os

    from qa_service.tuning.encoder_cores import WorkerActivity

    activity = WorkerActivity(workers=2)
    a, b = _Worker(), _Worker()
    activity.assign(a)
    activity.assign(b)
    assert a.qa_activity_slot != b.qa_activity_slot
    fork = multiprocessing.get_context("fork")
    seen, started, release = fork.Queue(), fork.Event(), fork.Event()

    def worker_b():
        activity.adopt(b)
        seen.put(activity.others_answering())
        with activity.answering():
            started.set()
            release.wait(30)

    child = fork.Process(target=worker_b)
    child.start()
    activity.adopt(a)  # this process plays worker a
    assert started.wait(30)
    assert seen.get(timeout=30) is False  # b alone
    assert activity.others_answering()  # a sees b answering
    with activity.answering(), activity.answering():  # two questions of this worker's threads
        assert activity.others_answering()
    release.set()
    child.join(30)
    assert not activity.others_answering()
    with pytest.raises(RuntimeError):
        with activity.answering():  # a failed answer still lowers the count
            raise RuntimeError("boom")

    def b_sees_nobody():
        activity.adopt(b)
        os._exit(0 if not activity.others_answering() else 1)

    _in_child(b_sees_nobody)

    dead = _Worker()
    activity.assign(dead)

    def killed_mid_answer():
        activity.adopt(dead)
        answer = activity.answering()
        answer.__enter__()
        os._exit(0)  # killed: the answer never ends

    _in_child(killed_mid_answer)
    assert activity.others_answering()
    activity.release(dead)  # the master reaps it
    assert not activity.others_answering()

    extra = [_Worker() for _ in range(16)]
    for w in extra:
        activity.assign(w)
    assert extra[-1].qa_activity_slot is None  # more workers than counters (a reload overlapping old and new)

    def extra_does_not_publish():
        activity.adopt(extra[-1])
        answer = activity.answering()
        answer.__enter__()
        os._exit(0)

    _in_child(extra_does_not_publish)
    assert not activity.others_answering()


def test_the_app_marks_its_answers_and_shares_cores_with_other_workers(fake_searcher):
    """``create_app(activity=..., share_cores=...)`` hands the encoder and the activity to ``share_cores`` at start
    and after a reload, and counts the question in this worker's counter while the worker holds it."""
    from qa_service.tuning.encoder_cores import WorkerActivity
    from qa_service.web import create_app

    activity = WorkerActivity(workers=2)
    me, other = _Worker(), _Worker()
    activity.assign(me)
    activity.assign(other)
    activity.adopt(me)
    shared = []

    def share_cores(embedder, given):
        shared.append((embedder, given))

    class Recording:
        def __init__(self, inner):
            self.inner, self.answering = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def ask(self, question, k=5, filters=None, mode="hybrid"):
            with activity.answering():  # a second question of this worker: others still see it as busy
                self.answering.append(activity.others_answering())
            return self.inner.ask(question, k=k, filters=filters, mode=mode)

    searcher = Recording(fake_searcher)
    app = create_app(fake_searcher.settings, searcher, activity=activity, share_cores=share_cores)
    assert shared == [(fake_searcher.embedder, activity)]
    response = app.test_client().post("/api/ask", json={"question": QUESTION})
    assert response.status_code == 200 and searcher.answering == [False]
    fresh = Recording(fake_searcher)
    app.extensions["qa_service"]._share_cores(fresh)
    assert shared[-1] == (fake_searcher.embedder, activity)
