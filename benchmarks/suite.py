"""``qa-service bench``: run the chosen sections in order and write the results; each figure is judged against a
floor measured in the same run (docs/decisions/benchmark-floors.md).

Sections (``--sections``, in this order): ``query``, ``throughput`` and ``web`` (``query.py``), ``build``, ``cold``
and ``ray`` (``build.py``; ``ray`` needs the ``ray`` extra), ``ingest`` (reading speed per format, ``ingest.py``),
``scale`` (``scale.py``), ``peer`` (``peer.py``, needs the ``peer`` extra) and ``postgres`` (``postgres.py``, needs
the ``postgres`` extra). Each run's files go to ``<out>/runs/``; a full-size run also replaces ``<out>/latest.md``
and ``<out>/latest.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .build import section_build, section_cold, section_ray
from .harness import REPO, RUNS, Bench, Sizes, write_results
from .ingest import section_ingest
from .peer import section_peer
from .postgres import section_postgres
from .query import section_query, section_throughput, section_web
from .scale import section_scale

__all__ = ["REPO", "SECTIONS", "Sizes", "run"]

_SECTIONS: dict[str, Callable[[Bench], None]] = {
    "query": section_query, "throughput": section_throughput, "build": section_build, "cold": section_cold,
    "ingest": section_ingest, "scale": section_scale, "peer": section_peer, "web": section_web, "ray": section_ray,
    "postgres": section_postgres,
}
SECTIONS = tuple(_SECTIONS)


def run(out: Path, sections: list[str] | None = None, quick: bool = False, work: Path | None = None,
        echo: Callable[[str], None] = print, sizes: Sizes | None = None) -> Path:
    """Run the chosen sections; write the results under ``out`` (``harness.write_results``); return its Markdown."""
    sections = list(sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(work) if work is not None else out / RUNS / f".work-{started:%Y%m%dT%H%M%S}"
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(work=work, out=out, sizes=sizes or (Sizes.quick() if quick else Sizes()), echo=echo)
    b.facts["load_before"] = os.getloadavg()[0]
    b.facts["tuning"] = os.environ.get("QA_TUNING", "")
    try:
        for name, section in _SECTIONS.items():
            if name in sections:
                echo(f"[{name}]")
                s0 = time.perf_counter()
                section(b)
                b.facts[f"{name}_seconds"] = time.perf_counter() - s0
    finally:
        b.close()
    seconds = time.perf_counter() - t0
    path = write_results(out, b.rows, b.facts, started, seconds, quick)
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    echo(f"wrote {path} ({seconds / 60:.1f} min)")
    return path
