"""Reports of an evaluation: the terminal table, report.md, the recall@k chart and the ``--json`` summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..files import write_atomically, write_text_atomically
from .errors import import_extra
from .metrics import METRIC_NAMES


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + [s["mode"] for s in summaries]
    rows = [[name] + [_fmt(s["metrics"][name]) for s in summaries] for name in METRIC_NAMES]
    if any(s.get("answer_sentence", {}).get("n") for s in summaries):
        rows.append(["answer in sentence@1"] + [_fmt(s["answer_sentence"]["holds_answer"]) for s in summaries])
    rows.append(["latency p50 ms"] + [_fmt(s["latency_ms"]["p50"], 1) for s in summaries])
    rows.append(["latency p95 ms"] + [_fmt(s["latency_ms"]["p95"], 1) for s in summaries])
    rows.append(["questions/s (batched)" if summaries and summaries[0]["backend"] == "in-process" else "questions/s"]
                + [_fmt(s["questions_per_s"], 1) for s in summaries])
    if summaries and summaries[0]["format"] == "questions":
        rows.append(["unanswerable flagged"] + [_fmt(s["abstention"]["unanswerable_flagged"]) for s in summaries])
        rows.append(["answerable refused"] + [_fmt(s["abstention"]["answerable_refused_rate"]) for s in summaries])
    return header, rows


def _kind_rows(summaries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    kinds = list(summaries[0]["by_kind"]) if summaries else []
    header = ["kind", "n"] + [f"{s['mode']} R@1/R@5/MRR" for s in summaries]
    rows = []
    for kind in kinds:
        row = [kind, str(summaries[0]["by_kind"][kind]["n"])]
        for s in summaries:
            m = s["by_kind"][kind]
            row.append("n/a" if m["recall@1"] is None else
                       f"{_fmt(m['recall@1'])}/{_fmt(m['recall@5'])}/{_fmt(m['mrr@10'])}")
        rows.append(row)
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _title(summaries: Sequence[dict]) -> str:
    s = summaries[0]
    what = (f"{s['n']} questions ({s['n_answerable']} answerable, {s['abstention']['unanswerable']} unanswerable)"
            if s["format"] == "questions" else f"{s['n']} queries")
    unit = "passages" if s["format"] == "questions" else "documents (max-passage)"
    return (f"{s['dataset']}: {what}; {s['backend']}; top {s['depth']} passages, scored as {unit}, "
            f"{s['judgments']} judgments")


def format_table(summaries: Sequence[dict]) -> str:
    """Return the terminal report: one column per mode, plus the per-kind breakdown for question files."""
    parts = [_title(summaries), "", _text_table(*_table_rows(summaries))]
    if summaries and summaries[0]["by_kind"]:
        parts += ["", _text_table(*_kind_rows(summaries))]
    missing = summaries[0].get("no_relevant_passage") if summaries else None
    if missing:
        parts += ["", f"no passage in the index contains the answer of: {', '.join(missing)}"]
    return "\n".join(parts)


def format_markdown(summaries: Sequence[dict], chart: str | None = None) -> str:
    """Return report.md."""
    parts = [f"# Evaluation: {summaries[0]['dataset']}", "", _title(summaries) + ".", "",
             _md_table(*_table_rows(summaries))]
    if summaries[0]["by_kind"]:
        parts += ["", "## By kind", "", _md_table(*_kind_rows(summaries))]
    if summaries[0].get("no_relevant_passage"):
        parts += ["", "No passage in the index contains the answer of: "
                  + ", ".join(summaries[0]["no_relevant_passage"])]
    if chart:
        parts += ["", f"![recall@k per mode]({chart})"]
    parts += ["", "recall@k: share of answerable questions with a relevant passage in the top k (Success@k)"
              if summaries[0]["format"] == "questions" else "recall@k: standard R@k over the qrels", ""]
    return "\n".join(parts)


def plot_recall_curves(summaries: Sequence[dict], path: Path | str) -> None:
    """Draw recall@k against k, one line per mode, into a PNG."""
    matplotlib = import_extra("matplotlib", "matplotlib", "The recall@k chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for s in summaries:
            points = [(int(k), v) for k, v in s["recall_curve"].items() if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=s["mode"])
        ax.set_xscale("log")
        ticks = ([int(k) for k in summaries[0]["recall_curve"] if int(k) in (1, 2, 3, 5, 10, 20, 50)]
                 if summaries else [])
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (passages)" if summaries and summaries[0]["format"] == "questions" else "k (documents)")
        ax.set_ylabel("recall@k")
        ax.set_title(f"{summaries[0]['dataset']}: recall@k" if summaries else "recall@k")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        write_atomically(Path(path), lambda fh: fig.savefig(fh, format="png"), binary=True)
    finally:
        plt.close(fig)


def summary_json(summaries: Sequence[dict]) -> dict | list[dict]:
    """Return what ``--json`` prints: the summary of the one mode, or a list with several."""
    return summaries[0] if len(summaries) == 1 else list(summaries)


def write_report(summaries: Sequence[dict], out_dir: Path | str) -> list[Path]:
    """Write report.json, report.md and recall.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "recall.png"]
    write_text_atomically(paths[0], json.dumps(summary_json(summaries), indent=2, ensure_ascii=False))
    write_text_atomically(paths[1], format_markdown(summaries, chart=paths[2].name))
    plot_recall_curves(summaries, paths[2])
    return paths
