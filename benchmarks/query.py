"""The ``query``, ``throughput`` and ``web`` sections: POST /api/ask against in-process floors measured alongside.

``query`` times the served answer against the in-process ``Searcher.ask`` (ONNX) and the torch in-process path,
then how low the HTTP / in-process ratio can go at all; ``throughput`` runs closed-loop clients against
cores / CPU seconds of one question; ``web`` splits a served answer into stages. See
docs/decisions/benchmark-floors.md.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import load
from .harness import Bench, Row, time_calls


def section_query(b: Bench) -> None:
    """POST /api/ask p50/p95/p99 against the in-process floor (ONNX) and the sentence-transformers/torch floor.

    The three are interleaved question by question so a neighbour's load falls on all alike; then a canned-answer
    server and a gunicorn stub show how low the HTTP / in-process ratio can go. See docs/decisions/benchmark-floors.md.
    """

    from qa_service.config import Settings
    from qa_service.embedding.onnx_encoder import SERVING_THREADS
    from qa_service.embedding.torch_encoder import SentenceTransformerEmbedder
    from qa_service.retrieval import Searcher

    qs = b.questions
    searcher = b.searcher()
    torch_searcher = Searcher(Settings(index_dir=b.seed_index),
                              embedder=SentenceTransformerEmbedder("all-MiniLM-L6-v2"))
    server = b.server()
    conn = http.client.HTTPConnection(load.HOST, server.port, timeout=30)
    for q in qs[:4]:  # warm-up: both workers, both encoders
        searcher.ask(q, k=5)
        torch_searcher.ask(q, k=5)
        load.post_ask(conn, q)
    http_ms, inproc, torch_ms = [], [], []
    # Each timed ask's own encode, for the torch ratio's bound below (an interleaved encode meets colder caches).
    onnx_encodes, torch_encodes = _time_encodes(searcher), _time_encodes(torch_searcher)
    cpu = 0.0
    for i in range(b.sizes.latency_n):
        q = qs[i % len(qs)]
        t0 = time.perf_counter()
        status = load.post_ask(conn, q)
        http_ms.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise RuntimeError(f"POST /api/ask answered {status}")
        c0, t0 = time.process_time(), time.perf_counter()
        searcher.ask(q, k=5)
        inproc.append((time.perf_counter() - t0) * 1000)
        cpu += time.process_time() - c0
        if i < b.sizes.torch_n:
            t0 = time.perf_counter()
            torch_searcher.ask(q, k=5)
            torch_ms.append((time.perf_counter() - t0) * 1000)
            # torch's OpenMP threads keep spinning after a call, on the cores the server answers on; one untimed
            # ask lets them go idle before the next POST is timed (docs/decisions/benchmark-floors.md).
            searcher.ask(q, k=5)
            onnx_encodes.pop()  # not a timed ask
    del searcher.encode_questions, torch_searcher.encode_questions  # the class's own again
    # Questions that find the machine idle, as a lightly used service is asked: a thread woken on an idle core
    # starts later than on a busy one, which back-to-back questions never show.
    idle_http, idle_inproc = [], []
    for i in range(b.sizes.idle_n):
        q = qs[i % len(qs)]
        time.sleep(b.sizes.idle_gap)
        t0 = time.perf_counter()
        load.post_ask(conn, q)
        idle_http.append((time.perf_counter() - t0) * 1000)
        time.sleep(b.sizes.idle_gap)
        t0 = time.perf_counter()
        searcher.ask(q, k=5)
        idle_inproc.append((time.perf_counter() - t0) * 1000)
    # The same two back to back in alternating blocks: each side in its steady state, without the cache refill
    # after the other process's model that interleaving pays. The target stays on the interleaved row.
    block_http, block_inproc = [], []
    for start in range(0, b.sizes.latency_n, b.sizes.latency_block):
        block = [qs[i % len(qs)] for i in range(start, min(start + b.sizes.latency_block, b.sizes.latency_n))]
        for q in block:
            t0 = time.perf_counter()
            load.post_ask(conn, q)
            block_http.append((time.perf_counter() - t0) * 1000)
        for q in block:
            t0 = time.perf_counter()
            searcher.ask(q, k=5)
            block_inproc.append((time.perf_counter() - t0) * 1000)
    conn.close()
    answer = load.recorded_answer(server.port, qs[0])
    canned_ms = _canned_round_trips(b, searcher, answer)
    stub_ms, stub_encode = _stub_round_trips(b, searcher, answer.partition(b"\r\n\r\n")[2])
    served_cpu = cpu / b.sizes.latency_n
    cheapest = cpu_per_question(b)
    encode, _ = time_calls(lambda q: searcher.encode_questions([q]), qs, b.sizes.latency_n)
    pin, phttp = load.percentiles(inproc), load.percentiles(http_ms)
    encode_p50, torch_p50 = load.percentiles(encode)["p50"], load.percentiles(torch_ms)["p50"]
    b.facts["inproc_p50_ms"] = pin["p50"]
    for p in ("p50", "p95", "p99"):
        b.add(Row("query", f"POST /api/ask {p} vs in-process Searcher.ask (ONNX)", phttp[p], "ms", pin[p],
                  "in-process", "<= 1.25" if p == "p50" else ""))
    b.add(Row("query", "POST /api/ask p50 vs sentence-transformers/torch in-process Searcher.ask", phttp["p50"],
              "ms", torch_p50, "torch in-process", "<= 0.5"))
    b.add(Row("query", f"POST /api/ask p50, questions {b.sizes.idle_gap * 1000:.0f} ms apart (an idle machine) vs "
                       "in-process the same way", load.percentiles(idle_http)["p50"], "ms",
              load.percentiles(idle_inproc)["p50"], "in-process, idle",
              note=f"{b.sizes.idle_n} questions each; p90 {np.percentile(idle_http, 90):.1f} ms over HTTP"))
    b.add(Row("query", f"POST /api/ask p50 vs in-process, each back to back in blocks of {b.sizes.latency_block} "
                       "(the interleaved rows above alternate question by question)",
              load.percentiles(block_http)["p50"], "ms", load.percentiles(block_inproc)["p50"], "in-process, blocks",
              note=f"{len(block_http)} questions each; no cache refill after the other process's model"))
    # What of the web layer no server can remove: this client's round trip to a server that takes no time.
    canned_p50, web_ms = load.percentiles(canned_ms)["p50"], phttp["p50"] - pin["p50"]
    b.add(Row("query", "in-process p50 plus the same client's round trip to a server that answers at once (the "
                       "recorded bytes of a real answer), each round trip right after an in-process ask: the lowest "
                       "POST / in-process ratio any server reaches with this client", pin["p50"] + canned_p50, "ms",
              pin["p50"], "in-process",
              note=f"round trip p50 {canned_p50:.2f} ms (the client building its request and reading the answer, "
                   f"and loopback) of the web layer's {web_ms:.2f} (POST p50 - in-process p50): the server's own "
                   f"share {web_ms - canned_p50:.2f} ms, against {0.25 * pin['p50'] - canned_p50:.2f} ms that the "
                   f"1.25 target leaves it; {len(canned_ms)} round trips"))
    stub_p50 = load.percentiles(stub_ms)["p50"]
    b.add(Row("query", "in-process p50 plus gunicorn's part: the round trip to gunicorn set up as served, around an "
                       "app that only encodes the question and answers the recorded bytes, less that encode (each "
                       "right after an in-process ask): the lowest POST / in-process ratio with gunicorn and this "
                       "client",
              pin["p50"] + stub_p50, "ms", pin["p50"], "in-process",
              note=f"round trip less the worker's encode p50 {stub_p50:.2f} ms (its encode p50 "
                   f"{load.percentiles(stub_encode)['p50']:.2f}), of the web layer's {web_ms:.2f}: gunicorn's own part "
                   f"{stub_p50 - canned_p50:.2f} ms over the bare round trip, qa-service's app and the steps after "
                   f"the encode {web_ms - stub_p50:.2f} ms; {len(stub_ms)} round trips"))
    b.add(Row("query", "question encode p50 (ONNX, in-process) vs in-process Searcher.ask",
              encode_p50, "ms", pin["p50"], "in-process ask",
              note="share of a question spent encoding it; the vector is computed once and shared by every stage"))
    # The torch ratio's bound: over HTTP an answer is encode E + steps P + web layer W, the torch floor T + P, so
    # (E + W) / T is the ratio with P = 0: the torch target is reachable only when this row is below it. E, T and P
    # are taken inside the interleaved asks (docs/decisions/benchmark-floors.md).
    e_situ, t_situ = load.percentiles(onnx_encodes)["p50"], load.percentiles(torch_encodes)["p50"]
    p_steps = float(np.median([a - e for a, e in zip(inproc, onnx_encodes)]))
    b.add(Row("query", "bound of the torch ratio: ONNX encode + web layer (POST p50 - in-process p50) vs torch's "
                       "encode, each encode timed inside the interleaved asks",
              e_situ + phttp["p50"] - pin["p50"], "ms", t_situ, "torch encode",
              note=f"the torch ratio if search and answer took no time: it reaches 0.5 only below 0.5 here; ONNX "
                   f"encode {e_situ:.2f} ms, search and answer steps {p_steps:.2f} ms (each ask less its encode), "
                   f"web layer {phttp['p50'] - pin['p50']:.2f} ms"))
    b.add(Row("query", "CPU time of one in-process question, one encoder thread", cheapest * 1000, "ms",
              note=f"the throughput floor is cores / this; with the served {SERVING_THREADS} encoder thread(s) "
                   f"a question costs {served_cpu * 1000:.1f} ms of CPU (the latency floor above)"))
    workers = server.worker_pids()
    b.facts["worker_pids"] = workers
    b.facts["torch_in_workers"] = any(load.maps_torch(pid) for pid in workers)
    mem = [load.memory_mb(pid) for pid in workers]
    if mem:
        b.facts["seed_worker_memory_mb"] = mem[0]
        b.add(Row("query", "RSS of one serving worker, seeds index", mem[0]["rss"], "MiB",
                  note=f"PSS {mem[0]['pss']:.0f} MiB, private {mem[0]['private']:.0f} MiB; "
                       f"libtorch mapped in a worker: {'yes' if b.facts['torch_in_workers'] else 'no'}"))


def _round_trips_after_asks(b: Bench, searcher, port: int, what: str) -> list[tuple[float, object]]:
    """``latency_n`` POST /api/ask round trips (ms) to the server on ``port``, each right after an untimed in-process
    ask, as every POST of the interleaved rows follows one (the caches it leaves); each with its (read) response."""
    qs = b.questions
    out = []
    conn = http.client.HTTPConnection(load.HOST, port, timeout=30)
    try:
        for q in qs[:4]:
            load.post_ask(conn, q)
        for i in range(b.sizes.latency_n):
            q = qs[i % len(qs)]
            searcher.ask(q, k=5)
            t0 = time.perf_counter()
            conn.request("POST", "/api/ask", body=json.dumps({"question": q, "k": 5}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            took = (time.perf_counter() - t0) * 1000
            if response.status != 200:
                raise RuntimeError(f"{what} answered {response.status}")
            out.append((took, response))
    finally:
        conn.close()
    return out


def _canned_round_trips(b: Bench, searcher, answer: bytes) -> list[float]:
    """Round trips (ms) to a ``load.CannedServer`` answering ``answer`` (``_round_trips_after_asks``)."""
    with load.CannedServer(answer) as canned:
        return [took for took, _ in _round_trips_after_asks(b, searcher, canned.port, "the canned-answer server")]


def _stub_round_trips(b: Bench, searcher, body: bytes) -> tuple[list[float], list[float]]:
    """Round trips to ``stubserve`` (gunicorn as served, an app that only encodes the question and answers ``body``;
    ``_round_trips_after_asks``); return each round trip less the worker's encode, and those encodes (ms)."""
    from . import stubserve

    answer_file = b.work / "stub-answer.json"
    answer_file.write_bytes(body)
    server = load.Server(b.seed_index, b.work / "stubserve.log",
                         command=[sys.executable, str(Path(stubserve.__file__).resolve()), str(answer_file)]).start()
    try:
        server.wait_first_answer(b.questions[0], timeout=300)
        trips = _round_trips_after_asks(b, searcher, server.port, "the stub server")
    finally:
        server.stop()
    encodes = [float(response.getheader("X-Encode-Ms")) for _, response in trips]
    return [took - encode for (took, _), encode in zip(trips, encodes)], encodes


def _time_encodes(searcher) -> list[float]:
    """Time every ``searcher.encode_questions`` call from now on (ms, appended to the returned list) until the
    instance attribute set here is deleted."""
    times: list[float] = []
    encode = searcher.encode_questions

    def timed(texts):
        t0 = time.perf_counter()
        try:
            return encode(texts)
        finally:
            times.append((time.perf_counter() - t0) * 1000)

    searcher.encode_questions = timed
    return times


# ---------------------------------------------------------------------- throughput

def cpu_per_question(b: Bench) -> float:
    """CPU seconds of one in-process question with a one-thread encoder: the cheapest a question gets.

    Serving encodes on more threads for latency, which costs some CPU in thread hand-offs; the throughput floor
    is taken at the cheaper setting, so those hand-offs count against the service, not in its favour.
    """
    if "cpu_per_question_s" not in b.facts:
        from qa_service.config import Settings
        from qa_service.embedding.onnx_encoder import OnnxEmbedder
        from qa_service.retrieval import Searcher
        from qa_service.store import read_manifest

        encoder = OnnxEmbedder.from_manifest(read_manifest(b.seed_index), threads=1)
        searcher = Searcher(Settings(index_dir=b.seed_index), embedder=encoder)
        for q in b.questions[:4]:
            searcher.ask(q, k=5)
        _, b.facts["cpu_per_question_s"] = time_calls(lambda q: searcher.ask(q, k=5), b.questions,
                                                      b.sizes.latency_n)
    return b.facts["cpu_per_question_s"]


def section_throughput(b: Bench) -> None:
    """Closed-loop clients over loopback against the floor: cores / CPU seconds of one in-process question."""
    cores = os.cpu_count() or 1
    floor = cores / cpu_per_question(b)
    server = b.server()
    workers = server.worker_pids()
    for clients in b.sizes.clients:
        cpu0, self0, load0 = load.cpu_seconds(workers), time.process_time(), os.getloadavg()[0]
        r = load.closed_loop(server.port, b.questions, clients, b.sizes.throughput_seconds, b.sizes.throughput_max)
        served = load.cpu_seconds(workers) - cpu0
        clients_cpu = time.process_time() - self0
        # Where the cores went: the server's CPU per answer (vs in-process), and the share of both cores that
        # the workers and the load generator got at all (the rest went to other processes on the machine).
        per_answer = served / r["requests"] * 1000 if r["requests"] else float("nan")
        share = (served + clients_cpu) / (cores * r["seconds"])
        b.add(Row("throughput", f"{clients} client(s): answers/s", r["rps"], "req/s", floor,
                  f"{cores} cores / CPU per question", ">= 0.8" if clients == 8 else "",
                  note=f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['requests']} answers, "
                       f"{r['failures']} failures; server CPU per answer {per_answer:.1f} ms; workers + clients "
                       f"got {share:.0%} of the {cores} cores (load average {load0:.1f} before)"))
    b.close()


def section_web(b: Bench) -> None:
    """Where POST /api/ask spends its time outside the searcher, stage by stage (``webtrace``).

    One traced worker, one client on one keep-alive connection, questions ``web_gap`` apart; no targets: the rows say
    where the web layer's share of the HTTP / in-process ratio goes (docs/decisions/benchmark-floors.md).
    """
    from . import webtrace

    trace = b.work / "webtrace.json"
    server = load.Server(b.seed_index, b.work / "webtrace.log", workers=1,
                         command=[sys.executable, str(Path(webtrace.__file__).resolve()), str(trace)]).start()
    client: list[tuple[float, float, float]] = []
    try:
        server.wait_first_answer(b.questions[0], timeout=300)
        conn = http.client.HTTPConnection(load.HOST, server.port, timeout=30)
        for q in b.questions[:8]:
            load.post_ask(conn, q)
        first_send: list[float] = []
        send = conn.send

        def timed_send(data):  # http.client writes a request's headers and its body in separate sends
            if not first_send:
                first_send.append(time.perf_counter())
            return send(data)

        conn.send = timed_send
        for i in range(b.sizes.web_n):
            time.sleep(b.sizes.web_gap)
            first_send.clear()
            t0 = time.perf_counter()
            if load.post_ask(conn, b.questions[i % len(b.questions)]) != 200:
                raise RuntimeError("POST /api/ask failed under the traced server")
            client.append((t0, first_send[0], time.perf_counter()))
        conn.close()
        time.sleep(1.2)  # the worker saves its records every half second
        records = webtrace.read_records(trace)
    finally:
        server.stop()
    answered = sum("parsed" in r for r in records)
    if answered < len(client):
        raise RuntimeError(f"the traced worker recorded {answered} requests, the client sent {len(client)}")
    times = webtrace.stage_times(client, records)
    for label, values in times.items():
        b.add(Row("web", f"{label}, p50", float(np.median(values)) if values else None, "ms",
                  note=f"{len(values)} requests, p90 {np.percentile(values, 90):.3f} ms" if values else "not recorded"))
    total = load.percentiles([(read - started) * 1000 for started, _, read in client])["p50"]
    ask = [v for _, _, label in webtrace.STAGES if label.startswith("Searcher.ask") for v in times[label]]
    b.add(Row("web", "POST /api/ask p50 vs the same worker's Searcher.ask p50 (a traced server: timers cost a little)",
              total, "ms", float(np.median(ask)) if ask else None, "Searcher.ask in the worker",
              note=f"{len(client)} questions {b.sizes.web_gap * 1000:.0f} ms apart, one client, one worker"))

