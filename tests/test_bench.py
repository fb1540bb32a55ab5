"""`qa-service bench` runs on tiny inputs and writes its results; a real serving worker never maps torch.

Benchmarks are not timed tests: these check that the code runs, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from click.testing import CliRunner

from qa_service.cli import _load_benchmarks, cli


@pytest.fixture
def bench_work(tmp_path, real_index):
    """A work folder whose seeds index is a hard-linked copy of the session's real index (no rebuild)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(real_index.index_dir, work / "seeds-index", copy_function=os.link)
    return work


@pytest.mark.slow
def test_quick_bench_writes_markdown_and_workers_have_no_torch(tmp_path, bench_work):
    suite = _load_benchmarks()
    lines = []
    out = tmp_path / "out"
    path = suite.run(out, ["query", "throughput", "cold", "scale"], quick=True, work=bench_work, echo=lines.append)
    text = path.read_text(encoding="utf-8")
    assert path.parent == out / "runs" and path.name.startswith("bench-") and path.name.endswith("-quick.md")
    # a quick run's figures judge nothing: it writes its own files only, and leaves latest.md / latest.json alone
    assert sorted(p.name for p in out.iterdir()) == ["runs"]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    assert "| section | measure | value | floor | ratio | target | met | note |" in text
    for section in ("query", "throughput", "cold", "scale"):
        assert f"| {section} |" in text
    assert "POST /api/ask p50" in text and "recall@10" in text and "first 200 answer" in text
    assert "bound of the torch ratio" in text
    rows = {r["measure"]: r for r in json.loads(path.with_suffix(".json").read_text())["rows"]}
    canned = next(r for m, r in rows.items() if "a server that answers at once" in m)
    stub = next(r for m, r in rows.items() if "gunicorn set up as served" in m)
    for row in (canned, stub):  # the in-process p50 plus a round trip: above the floor it shares with the POST rows
        assert row["floor"] == rows["POST /api/ask p50 vs in-process Searcher.ask (ONNX)"]["floor"] < row["value"]
    assert "its encode p50" in stub["note"] and "gunicorn's own part" in stub["note"]
    facts = json.loads(path.with_suffix(".json").read_text())["facts"]
    assert facts["worker_pids"] and facts["torch_in_workers"] is False  # /proc/<worker>/maps has no libtorch
    assert "index re-embedded: no" in text


@pytest.mark.slow
def test_web_section_times_each_stage_of_a_served_answer(tmp_path, bench_work):
    """A traced server's records line up with the client's requests (the section refuses them otherwise)."""
    suite = _load_benchmarks()
    path = suite.run(tmp_path / "out", ["web"], quick=True, work=bench_work, echo=lambda line: None)
    rows = [r for r in json.loads(path.with_suffix(".json").read_text())["rows"] if r["section"] == "web"]
    by_measure = {r["measure"]: r for r in rows}
    assert len(rows) == len(_webtrace().STAGES) + 1 and all(r["value"] is not None for r in rows)
    assert all(f"{label}, p50" in by_measure for _, _, label in _webtrace().STAGES)
    ask = by_measure["Searcher.ask (the in-process answer), p50"]["value"]
    total = next(r for r in rows if r["measure"].startswith("POST /api/ask p50 vs the same worker"))
    assert 0 < ask < total["value"] and total["floor"] == ask


def _webtrace():
    import importlib

    _load_benchmarks()
    return importlib.import_module("qa_service_benchmarks.webtrace")


@pytest.mark.slow
def test_webtrace_lines_up_requests_and_refuses_a_shifted_record():
    webtrace = _webtrace()
    client = [(0.9999, 1.0, 1.010), (1.9999, 2.0, 2.012)]
    record = {"poll": 0.0001, "handle": 0.0002, "parsed": 0.0004, "app": 0.0005, "ask": 0.001, "asked": 0.008,
              "app_done": 0.0085, "written": 0.0088, "logged": 0.0089}
    records = [{"poll": 0.5, "handle": 0.5}] + [{k: sent + v for k, v in record.items()} for _, sent, _ in client] \
        + [{"poll": 3.0, "handle": 3.0}]  # a close before and after: no request
    times = webtrace.stage_times(client, records)
    assert [round(v, 6) for v in times["Searcher.ask (the in-process answer)"]] == [7.0, 7.0]
    assert [round(v, 6) for v in times["until the client has read the answer"]] == [1.1, 3.1]
    assert [round(v, 6) for v in times[webtrace.STAGES[0][2]]] == [0.1, 0.1]  # building, before the first send
    with pytest.raises(ValueError, match="line up"):
        webtrace.stage_times(client, [{k: 5.0 + v for k, v in record.items()}] * 2)


@pytest.mark.slow
def test_canned_server_replays_the_recorded_answer_to_every_request():
    """The bare round trip's server: each request (headers, then its body, sent apart) gets the recorded bytes."""
    import http.client
    import importlib
    import socket
    import time

    _load_benchmarks()
    load = importlib.import_module("qa_service_benchmarks.load")
    body = b'{"ok":true}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nX-Mark: 1\r\n\r\n" + body
    with load.CannedServer(answer, idle_seconds=20) as canned:
        conn = http.client.HTTPConnection(load.HOST, canned.port, timeout=10)
        for question in ("one", "two", "a question of some length " * 20):
            assert load.post_ask(conn, question) == 200
        conn.request("POST", "/api/ask", body="{}", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.read() == body and response.getheader("X-Mark") == "1"
        conn.close()
        with socket.create_connection((load.HOST, canned.port), timeout=10) as raw:  # a body split across sends
            raw.sendall(b"POST /api/ask HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
            time.sleep(0.05)
            raw.sendall(b"56789")
            got = b""
            while len(got) < len(answer):
                got += raw.recv(65536)
            assert got == answer
    with load.CannedServer(answer, idle_seconds=0.3) as idle:  # bounded: no connection for a while, and it is gone
        deadline = time.monotonic() + 10
        while idle.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.proc.returncode == 0
    with pytest.raises(RuntimeError, match="did not start"):
        with load.CannedServer(answer, idle_seconds=-1):  # a negative timeout: the listener refuses to start
            pass


@pytest.mark.slow
def test_build_and_peer_sections_run(tmp_path, bench_work):
    """The build section runs `qa-service index` on a tiny corpus; the peer section runs txtai or says why not."""
    suite = _load_benchmarks()
    sizes = suite.Sizes.quick()
    sizes.build_docs = 3
    sizes.latency_n = 3
    out = tmp_path / "out"
    path = suite.run(out, ["build", "peer"], work=bench_work, sizes=sizes, echo=lambda _: None)
    text = path.read_text(encoding="utf-8")
    # not a quick run: its files in runs/, and latest.md / latest.json are this run's
    assert path.parent == out / "runs" and not path.name.endswith("-quick.md")
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "latest.md", "runs"]
    _assert_compact_copy((out / "latest.md").read_text(encoding="utf-8"), text)
    assert (out / "latest.json").read_text(encoding="utf-8") == path.with_suffix(".json").read_text(encoding="utf-8")
    assert "qa-service index, passages/s" in text
    # the re-index row: other articles into the same folder, sharing the first build's export (the section
    # itself raises if the export was not shared)
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    reindex = [r for r in rows if r["measure"].startswith("qa-service index into that folder again")]
    assert len(reindex) == 1 and reindex[0]["value"] > 0 and reindex[0]["floor"] > 0
    # each row with a target is the median of the rounds (quick: 2, so the re-index also ran back into the
    # first corpus, which the section checks was embedded afresh with the shared export)
    assert "median of 2 rounds" in reindex[0]["note"]
    # the build target is held by builds with the model's export on the machine; the first build on a machine,
    # which exports it, and that one-time cost are rows of their own
    builds = {r["measure"].split(" (")[0].split(",")[1].strip(): r for r in rows
              if r["section"] == "build" and r["measure"].startswith("qa-service index, ")}
    assert builds["passages/s vs raw ONNX encode of the same passages"]["target"] == ">= 0.9"
    assert "median of 2 rounds" in builds["passages/s vs raw ONNX encode of the same passages"]["note"]
    assert builds["first build on a machine"]["target"] == "" and builds["first build on a machine"]["value"] > 0
    once = [r for r in rows if r["measure"].startswith("the first build's one-time cost")]
    assert len(once) == 1 and once[0]["unit"] == "s"
    try:
        import txtai  # noqa: F401
    except ImportError:
        assert "peer: skipped" in text
    else:
        assert "txtai hybrid" in text


@pytest.mark.slow
def test_ingest_section_reads_every_format_and_compares_reading_to_a_build(tmp_path, bench_work):
    """A row per format in articles/s, syndication alone, and the plain-text reading time as a share of the
    build of the same articles."""
    suite = _load_benchmarks()
    path = suite.run(tmp_path / "out", ["ingest"], quick=True, work=bench_work, echo=lambda _: None)
    rows = [r for r in json.loads(path.with_suffix(".json").read_text())["rows"] if r["section"] == "ingest"]
    speeds = [r for r in rows if r["unit"] == "articles/s"]
    for kind in ("txt", "md", "html", "jsonl", "json", "csv", "rss"):
        row = next(r for r in speeds if f"({kind})" in r["measure"])
        assert row["value"] > 0 and "12 articles" in row["measure"]
    assert any("syndication" in r["measure"] for r in speeds)
    share = next(r for r in rows if r["measure"].startswith("reading 12 plain-text articles vs building them"))
    assert share["unit"] == "s" and share["value"] > 0 and share["floor"] > 0 and share["target"] == "<= 0.2"
    assert share["met"] is True  # reading is a small part of a build
    assert "| ingest |" in path.read_text(encoding="utf-8")


def test_reading_speed_reads_every_article_of_every_format(tmp_path):
    """The ``ingest`` section's figures: each format's folder read whole (the function raises on a short read)."""
    suite = _load_benchmarks()
    assert "ingest" in suite.SECTIONS
    ingest = __import__("importlib").import_module("qa_service_benchmarks.ingest")
    rows = ingest.reading_speed(tmp_path, articles=4)
    assert [r["format"] for r in rows] == [*ingest.FORMATS, "syndication"]
    assert all(r["articles"] == 4 and r["articles_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_postgres_section_runs(tmp_path, bench_work):
    """Both backends served side by side on the seeds and a tiny synthetic corpus; every row has its FAISS floor."""
    suite = _load_benchmarks()
    path = suite.run(tmp_path / "out", ["postgres"], quick=True, work=bench_work, echo=lambda _: None)
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    measures = {r["measure"]: r for r in rows if r["section"] == "postgres"}
    for label in ("seeds", "300 synthetic"):
        for what in ("in-process Searcher.ask p50", "POST /api/ask p50", "answers/s at 8 clients"):
            row = measures[f"{label}: {what}, PostgreSQL vs FAISS"]
            assert row["value"] > 0 and row["floor"] > 0 and row["ratio"] is not None
    assert "failures 0 vs 0" in measures["seeds: answers/s at 8 clients, PostgreSQL vs FAISS"]["note"]


@pytest.mark.slow
def test_ray_section_is_skipped_without_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # ``import ray`` now raises ImportError
    suite = _load_benchmarks()
    path = suite.run(tmp_path / "out", ["ray"], quick=True, work=tmp_path / "work", echo=lambda _: None)
    assert "ray: skipped, Ray is not installed" in path.read_text(encoding="utf-8")


def test_results_go_to_runs_and_each_full_run_replaces_latest(tmp_path, monkeypatch):
    """Each run's Markdown and JSON land in runs/ (the default work folder inside it is removed afterwards); a
    full-size run replaces latest.md and latest.json, a quick one does not; no temporary file stays behind."""
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # the ray section then only says it is skipped
    suite = _load_benchmarks()
    out = tmp_path / "results"
    quick = suite.run(out, ["ray"], quick=True, echo=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["runs"]
    first = suite.run(out, ["ray"], echo=lambda _: None)
    time.sleep(1.1)  # run files are named by the second the run started
    second = suite.run(out, ["ray"], echo=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "latest.md", "runs"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        p.name for run in (quick, first, second) for p in (run, run.with_suffix(".json")))
    assert quick.name.endswith("-quick.md") and first.name != second.name
    _assert_compact_copy((out / "latest.md").read_text(encoding="utf-8"), second.read_text(encoding="utf-8"))
    latest = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    assert latest == json.loads(second.with_suffix(".json").read_text(encoding="utf-8"))
    assert latest["quick"] is False and latest["rows"] == [] and "ray_skipped" in latest["facts"]
    assert "ray: skipped, Ray is not installed" in (out / "latest.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_bench_command_rejects_unknown_sections():
    result = CliRunner().invoke(cli, ["bench", "--sections", "query,nonsense"])
    assert result.exit_code == 2 and "nonsense" in result.output


def _assert_compact_copy(latest: str, run: str) -> None:
    """latest.md is the run's own table, compact: the same header and one line a row, without the note column."""
    assert latest.splitlines()[0] == run.splitlines()[0] != ""
    assert len(latest.splitlines()) == len(run.splitlines())
    assert "| note |" in run and "| note |" not in latest


def test_the_tracked_summary_shortens_long_measures_and_leaves_notes_to_the_json():
    from datetime import datetime, timezone

    from benchmarks.harness import COMPACT_MEASURE, Row, markdown

    long = "a measure " * 30
    rows = [Row("query", long.strip(), 8.5, "ms", 6.4, "in-process", "<= 1.35", note="p99 12 ms, 0 failures")]
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    full, compact = markdown(rows, {}, started, 60, False), markdown(rows, {}, started, 60, False, compact=True)
    assert long.strip() in full and "p99 12 ms, 0 failures" in full
    assert long.strip() not in compact and "p99 12 ms" not in compact and " …" in compact
    row = next(line for line in compact.splitlines() if line.startswith("| query"))
    assert len(row.split("|")[2].strip()) <= COMPACT_MEASURE + 2 and "1.33" in row
