"""Bounded load against a real `qa-service serve` on loopback: no failed requests at 8 and 32 clients, p99
latency reported, flat worker memory over 2,000 requests, reloads that drop nothing, and overload
answered with 503 instead of a hang.

Every run is bounded in requests and in time and stops by itself; only 127.0.0.1 is ever addressed.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests

from .support.live_server import API_KEY, FIGURES, LiveServer, link_copy, rss_kb, run_load

# A worker may grow a little as allocators settle; a per-request leak over 1,000 requests per worker would not fit.
MAX_RSS_GROWTH_KB = 24 * 1024


@pytest.mark.slow
def test_load_at_8_and_32_clients(live_service):
    url = live_service.url
    workers = live_service.worker_pids()
    assert len(workers) == 2
    warm = run_load(url, 8, 400, time_cap=90)  # first touches: lazy allocations, thread pools, caches
    assert warm.failed == 0, warm.failures[:3]
    before = {pid: rss_kb(pid) for pid in workers}

    at_8 = run_load(url, 8, 2000, time_cap=180)
    after = {pid: rss_kb(pid) for pid in workers}
    at_32 = run_load(url, 32, 1000, time_cap=120)

    FIGURES.append("load, " + at_8.summary())
    FIGURES.append("load, " + at_32.summary())
    FIGURES.append("worker RSS over the 2,000-request run: " + ", ".join(
        f"pid {pid} {before[pid] / 1024:.1f} -> {after[pid] / 1024:.1f} MB" for pid in workers))
    assert at_8.failed == 0, at_8.failures[:5]
    assert at_32.failed == 0, at_32.failures[:5]
    assert at_8.sent == 2000 and at_32.sent == 1000, "the time cap cut the run short"
    assert live_service.worker_pids() == workers, "a worker died or was restarted under load"
    for pid in workers:
        assert after[pid] - before[pid] < MAX_RSS_GROWTH_KB, (pid, before[pid], after[pid])


@pytest.mark.slow
def test_uploads_reach_every_worker_without_dropping_requests(live_service):
    """Questions keep flowing while an article is added and removed: none fails, both workers switch."""
    url = live_service.url
    stop = threading.Event()
    results = {"sent": 0, "failed": []}

    def ask_continuously():
        session = requests.Session()
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = session.get(url + "/api/ask", params={"q": "flamingo parade zebras", "k": 3}, timeout=30)
                ok = r.status_code == 200 and r.json()["ok"] is True
                detail = f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as exc:
                ok, detail = False, repr(exc)
            results["sent"] += 1
            if not ok:
                results["failed"].append(detail)

    clients = [threading.Thread(target=ask_continuously) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        text = ("date 2025-03-01 The flamingo parade in Tehran drew ten thousand zebras, the organisers said.\n\n"
                "The zebras walked from Azadi Square to the bazaar.")
        r = requests.post(url + "/api/articles", json={"id": "flamingo-live", "text": text},
                          headers={"X-API-Key": API_KEY}, timeout=120)
        assert r.status_code == 201, r.text
        live_service.wait_for_build(r.json()["build_id"])
        for _ in range(6):  # every worker now answers from the new index
            top = requests.get(url + "/api/ask", params={"q": "flamingo parade zebras", "k": 1}, timeout=30).json()
            assert top["results"][0]["citation"]["article_id"] == "flamingo-live"
        r = requests.delete(url + "/api/articles/flamingo-live", headers={"X-API-Key": API_KEY}, timeout=120)
        assert r.status_code == 200, r.text
        live_service.wait_for_build(r.json()["build_id"])
        assert requests.get(url + "/api/articles/flamingo-live", timeout=10).status_code == 404
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert results["sent"] > 20 and not results["failed"], results["failed"][:5]
    FIGURES.append(f"reloads under load: {results['sent']} questions during an upload and a removal "
                   f"(2 index switches in each of 2 workers), {len(results['failed'])} failed")


@pytest.mark.slow
def test_overload_gets_503_not_a_hang(real_index, tmp_path):
    """One worker taking at most one waiting question: a burst of 32 clients gets answers or 503s, fast."""
    link_copy(real_index.index_dir, tmp_path / "index")
    shutil.copytree(real_index.seeds_dir, tmp_path / "seeds")
    server = LiveServer(tmp_path / "index", tmp_path / "seeds", tmp_path / "server.log", workers=1,
                        env={"QA_MAX_QUEUE": "1", "QA_QUEUE_TIMEOUT": "0.2"}).start()
    try:
        burst = run_load(server.url, 32, 400, time_cap=60, timeout=20, ok_statuses=(200, 503))
        statuses = []
        for _ in range(40):
            r = requests.post(server.url + "/api/ask", json={"question": "Gaza ceasefire"}, timeout=20)
            statuses.append(r.status_code)
    finally:
        server.stop()
    assert burst.failed == 0, burst.failures[:5]  # every request got 200 or 503: no timeouts, no resets
    assert max(burst.latencies_ms) < 15_000
    assert burst.statuses.get(503, 0) > 0 and burst.statuses.get(200, 0) > 0, burst.statuses
    assert all(body == {"ok": False, "error": {"code": "overloaded",
                                               "message": "The service is busy; try again in a moment."}}
               for body in burst.error_bodies)
    assert statuses.count(200) == 40  # one at a time, everything is answered again
    FIGURES.append(f"overload (1 worker, queue 1, 0.2 s wait): {burst.sent} requests from 32 clients, "
                   f"{burst.statuses.get(200, 0)} answered, {burst.statuses.get(503, 0)} got 503 overloaded, "
                   f"0 hung; p99 {burst.percentile(99):.0f} ms, max {max(burst.latencies_ms):.0f} ms")
