"""The machinery every benchmark section shares: sizes, rows judged against a floor measured in the same run,
the run's state (seeds index, in-process Searcher, served seeds), timing helpers, and writing the results.

A ratio measured in one run cancels most of the noise of a shared machine, where absolute times move with the
neighbours' load; see docs/decisions/benchmark-floors.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from qa_service.files import write_text_atomically

from . import load

REPO = Path(__file__).resolve().parent.parent
RUNS = "runs"  # each run's files, under the results folder (not tracked); latest.md / latest.json beside it
# Questions about the shipped seeds (the dev file adds more when it is there).
SEED_QUESTIONS = [
    "What did Pezeshkian say about rebuilding Gaza?",
    "Who met Iran's foreign minister in Doha?",
    "How many Palestinians have been killed in Gaza?",
    "When did the ceasefire agreement go into effect?",
    "Which countries mediate the agreement between Hamas and Israel?",
    "What did the International Criminal Court do in November?",
    "Who leads the Shura Council of Hamas?",
    "What happened to prisoners during the exchange?",
]


@dataclass
class Sizes:
    """How much work each section does; ``quick`` is for the test suite (tiny, seconds)."""

    latency_n: int = 200
    latency_block: int = 25  # questions per block in the back-to-back blocks row
    torch_n: int = 100
    idle_n: int = 60  # questions that find the machine idle (``idle_gap`` seconds after the last one)
    idle_gap: float = 0.1
    throughput_seconds: float = 12.0
    throughput_max: int = 4000
    clients: tuple[int, ...] = (1, 8, 32)
    build_docs: int = 200
    build_rounds: int = 3  # raw encode + build pairs behind each build row with a target (their median)
    cold_runs: int = 3
    scale: tuple[int, ...] = (100_000, 1_000_000)
    scale_threshold: int | None = None  # None: Settings().ann_threshold
    scale_queries: int = 200
    flat_timing_queries: int = 20
    peer_scifact_queries: int = 100
    peer_scifact_distractors: int = 400
    ray_passages: int = 300
    ray_actors: tuple[int, ...] = (1, 2)
    pg_latency_n: int = 100
    pg_clients: tuple[int, ...] = (8, 32)
    pg_synthetic: int = 100_000
    served_scale: int = 100_000  # passages of the full index a real worker serves in ``scale`` (0: skip)
    basis_titles: int = 2_000  # SciFact titles embedded as the basis of synthetic vectors (``scale._basis``)
    web_n: int = 300  # questions through the traced server of ``web``
    web_gap: float = 0.005  # seconds between them (the client sleeps)
    reading_articles: int = 200  # articles of each format read in ``ingest``

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(latency_n=15, latency_block=5, torch_n=5, idle_n=3, throughput_seconds=1.0, throughput_max=60,
                   clients=(1, 8), build_docs=8, build_rounds=2, cold_runs=1, scale=(3_000,), scale_threshold=1_000,
                   scale_queries=20,
                   flat_timing_queries=5, peer_scifact_queries=0, peer_scifact_distractors=0, ray_passages=24,
                   pg_latency_n=5, pg_clients=(8,), pg_synthetic=300,
                   served_scale=300, basis_titles=200, web_n=10, reading_articles=12)


@dataclass
class Row:
    """One figure, the floor it is judged by (measured in the same run), and the target its ratio must meet."""

    section: str
    measure: str
    value: float | None
    unit: str = ""
    floor: float | None = None
    floor_label: str = ""
    target: str = ""  # e.g. "<= 1.25" (ratio = value / floor)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.floor:
            return None
        return self.value / self.floor

    @property
    def met(self) -> bool | None:
        if not self.target or self.ratio is None:
            return None
        op, bound = self.target.split()
        return self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)


@dataclass
class Bench:
    """One run: where it works, what it has measured so far, and shared objects between sections."""

    work: Path
    out: Path
    sizes: Sizes
    seeds: Path = REPO / "seeds"
    shared: Path = REPO.parent / "shared"
    echo: Callable[[str], None] = print
    rows: list[Row] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    _server: load.Server | None = None
    _searcher: object = None

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.echo("  " + format_row(row))

    @property
    def questions(self) -> list[str]:
        qs = list(SEED_QUESTIONS)
        dev = self.shared / "eval" / "dev.jsonl"
        if dev.is_file():
            qs += [json.loads(line)["question"] for line in dev.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        return qs

    @property
    def seed_index(self) -> Path:
        """A fresh index of the seeds (built once per run with ``qa-service index``)."""
        path = self.work / "seeds-index"
        if not (path / "CURRENT").exists():
            run_cli(["index", str(self.seeds), "--index-dir", str(path)], self.work / "seeds-index.log")
        return path

    def searcher(self):
        if self._searcher is None:
            from qa_service.config import Settings
            from qa_service.retrieval import Searcher

            self._searcher = Searcher(Settings(index_dir=self.seed_index))
        return self._searcher

    def server(self) -> load.Server:
        if self._server is None:
            self._server = load.Server(self.seed_index, self.work / "serve.log").start()
            self._server.wait_first_answer(SEED_QUESTIONS[0])
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def run_cli(args: list[str], log: Path, **env: str) -> float:
    """Run ``qa-service ARGS`` (with ``env`` added to a clean environment) to completion; return its wall time."""
    started = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.run(load.qa_service_command() + args, stdout=fh, stderr=subprocess.STDOUT,
                              env=load.clean_env(**env), check=False)
    if proc.returncode:
        raise RuntimeError(f"qa-service {' '.join(args)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - started


def time_calls(fn, items: list, n: int) -> tuple[list[float], float]:
    """Call ``fn`` on ``n`` items (cycling); return latencies in ms and CPU seconds per call (this process)."""
    latencies = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        fn(items[i % len(items)])
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, (time.process_time() - cpu0) / max(n, 1)



def format_row(row: Row) -> str:
    value = "n/a" if row.value is None else f"{row.value:,.3g}" if abs(row.value) < 100 else f"{row.value:,.0f}"
    text = f"{row.measure}: {value} {row.unit}".rstrip()
    if row.floor:
        text += f" | floor {row.floor:,.3g} ({row.floor_label}) | ratio {row.ratio:.2f}"
    if row.target:
        text += f" | target {row.target} {'met' if row.met else 'MISSED'}"
    return text


COMPACT_MEASURE = 90  # characters of a measure's wording kept in the tracked summary (latest.md)


def markdown(rows: list[Row], facts: dict, started: datetime, seconds: float, quick: bool,
             compact: bool = False) -> str:
    """The run as a Markdown table. ``compact`` (the tracked latest.md): measures shortened and no note column,
    since the whole wording and every note are in latest.json and the run's own file."""
    def num(x):
        return "" if x is None else f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"

    lines = [f"# qa-service benchmark, {started:%Y-%m-%d %H:%M} UTC{' (quick)' if quick else ''}", "",
             f"Machine: {os.cpu_count()} cores, shared (load average {facts.get('load_before', 0):.1f} when the run "
             f"started); the whole run took {seconds / 60:.1f} min; QA_TUNING={facts.get('tuning', '')!r}. "
             "Ratios are value / floor, both measured in this run."
             + (" Measures are shortened and notes left out here; both are whole in latest.json." if compact else ""),
             "",
             "| section | measure | value | floor | ratio | target | met |" + ("" if compact else " note |"),
             "|---|---|---|---|---|---|---|" + ("" if compact else "---|")]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        floor = f"{num(r.floor)} ({r.floor_label})" if r.floor else ""
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        measure = r.measure
        if compact and len(measure) > COMPACT_MEASURE:
            measure = measure[:COMPACT_MEASURE].rsplit(" ", 1)[0] + " …"
        lines.append(f"| {r.section} | {measure} | {num(r.value)} {r.unit} | {floor} | {ratio} | {r.target} | "
                     f"{met} |" + ("" if compact else f" {r.note} |"))
    if facts.get("peer_skipped"):
        lines += ["", f"peer: skipped, {facts['peer_skipped']}."]
    if facts.get("ray_skipped"):
        lines += ["", f"ray: skipped, {facts['ray_skipped']}."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[Row], facts: dict, started: datetime, seconds: float,
                  quick: bool) -> Path:
    """Write the run's Markdown and JSON into ``out/runs/``; a full-size run also replaces ``out/latest.md`` and
    ``out/latest.json`` atomically. Return the run's Markdown path.

    A quick run (tiny sizes, a check that the suite runs) leaves ``latest.*`` alone: its figures judge nothing.
    """
    text = markdown(rows, facts, started, seconds, quick)
    public = {k: (str(v) if isinstance(v, Path) else v) for k, v in facts.items() if not k.startswith("_")}
    data = json.dumps({"started": started.isoformat(), "seconds": seconds, "quick": quick, "facts": public,
                       "rows": [{**r.__dict__, "ratio": r.ratio, "met": r.met} for r in rows]}, indent=2, default=str)
    runs = Path(out) / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"bench-{started:%Y%m%dT%H%M%S}{'-quick' if quick else ''}.md"
    write_text_atomically(path, text)
    write_text_atomically(path.with_suffix(".json"), data)
    if not quick:
        write_text_atomically(Path(out) / "latest.md", markdown(rows, facts, started, seconds, quick, compact=True))
        write_text_atomically(Path(out) / "latest.json", data)
    return path
