"""Reading speed per format: articles per second that ``load_articles`` reads from synthetic files of each kind.

The files are generated here (no network, no corpus needed): news-sized articles of varied words with a
headline, a date, a URL and an outlet, written as plain text, Markdown, saved pages, JSON Lines, JSON, CSV and an
RSS feed. Each format is read from its own folder, end to end (walk, decode, extract, ids, syndication), after an
untimed pass that imports every reader's libraries, so the figure is what a build spends before embedding. A last
row times syndication alone over the JSON Lines articles.

``section_ingest`` is the bench's ``ingest`` section: those rows, and reading the plain-text folder against
``qa-service index`` of the same folder, since reading must never be what a build waits for.
"""

from __future__ import annotations

import csv
import json
import random
import time
from html import escape
from pathlib import Path

from typing import TYPE_CHECKING

from qa_service.ingest import assign_stories, load_articles

if TYPE_CHECKING:  # pragma: no cover
    from .harness import Bench

_WORDS = ("government minister officials said report city council port workers strike rain floods river camps "
          "water aid agencies health ministry talks union pay rise ships cargo exporters coffee fruit prices "
          "market bank rate investors court ruling appeal police station bridge tram line schools children "
          "election vote parliament budget tax energy power grid fuel harvest grain farmers drought week month "
          "year on Tuesday Wednesday Thursday after before during while because the a of in to and for with").split()


def _article(rng: random.Random, n: int) -> dict:
    paragraphs = []
    for _ in range(5):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(12, 24))).capitalize() + "."
                     for _ in range(3)]
        paragraphs.append(" ".join(sentences))
    return {"id": f"art-{n:05d}", "title": f"Synthetic report number {n} on the {rng.choice(_WORDS)}",
            "date": f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}", "url": f"https://news.example.com/story/{n}",
            "outlet": "Example News", "author": "Desk", "text": "\n\n".join(paragraphs)}


def _page(a: dict) -> str:
    body = "".join(f"<p>{escape(p)}</p>" for p in a["text"].split("\n\n"))
    return (f'<html><head><title>{escape(a["title"])}</title><link rel="canonical" href="{a["url"]}">'
            f'<meta property="og:site_name" content="{a["outlet"]}"><meta name="author" content="{a["author"]}">'
            f'<meta property="article:published_time" content="{a["date"]}"><script>var x = 1;</script></head>'
            f'<body><nav><a href="/">Home</a><a href="/world">World</a></nav><article><h1>{escape(a["title"])}</h1>'
            f'{body}</article><aside><h2>Most read</h2><a href="/x">Other story</a></aside>'
            f"<footer>Contact us | Privacy policy</footer></body></html>")


def _write(folder: Path, kind: str, items: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        for a in items:
            (folder / f"{a['id']}.txt").write_text(f"{a['title']}\n\nPublished {a['date']}\n\n{a['text']}\n",
                                                   encoding="utf-8")
    elif kind == "md":
        for a in items:
            meta = "".join(f"{k}: {json.dumps(a[k])}\n" for k in ("title", "date", "url", "outlet", "author"))
            (folder / f"{a['id']}.md").write_text(f"---\n{meta}---\n\n{a['text']}\n", encoding="utf-8")
    elif kind == "html":
        for a in items:
            (folder / f"{a['id']}.html").write_text(_page(a), encoding="utf-8")
    elif kind == "jsonl":
        (folder / "export.jsonl").write_text("".join(json.dumps(a) + "\n" for a in items), encoding="utf-8")
    elif kind == "json":
        (folder / "export.json").write_text(json.dumps(items), encoding="utf-8")
    elif kind == "csv":
        with open(folder / "export.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(items[0]))
            writer.writeheader()
            writer.writerows(items)
    elif kind == "rss":
        entries = "".join(
            f"<item><title>{escape(a['title'])}</title><link>{a['url']}</link><pubDate>{a['date']}</pubDate>"
            f"<description>{escape(''.join(f'<p>{escape(p)}</p>' for p in a['text'].split(chr(10) * 2)))}"
            f"</description></item>" for a in items)
        (folder / "feed.rss").write_text(f'<?xml version="1.0"?><rss version="2.0"><channel><title>Example News'
                                         f"</title>{entries}</channel></rss>", encoding="utf-8")


FORMATS = ("txt", "md", "html", "jsonl", "json", "csv", "rss")


def reading_speed(tmp_dir: Path | str, articles: int = 200, formats: tuple[str, ...] = FORMATS) -> list[dict]:
    """One row per format (``format``, ``articles``, ``seconds``, ``articles_per_s``) and one for syndication."""
    tmp_dir = Path(tmp_dir)
    rng = random.Random(20)
    items = [_article(rng, n) for n in range(articles)]
    rows, read = [], []
    for kind in formats:  # untimed: each reader's libraries are imported on first use, once per process
        _write(tmp_dir / f"warm-up-{kind}", kind, items[:2])
        load_articles(tmp_dir / f"warm-up-{kind}")
    for kind in formats:
        folder = tmp_dir / f"reading-{kind}"
        _write(folder, kind, items)
        start = time.perf_counter()
        report = load_articles(folder)
        seconds = time.perf_counter() - start
        if len(report.articles) != articles:
            raise RuntimeError(f"{kind}: read {len(report.articles)} of {articles} articles ({report.skipped[:3]})")
        read += report.articles if kind == "jsonl" else []
        rows.append({"format": kind, "articles": articles, "seconds": round(seconds, 4),
                     "articles_per_s": round(articles / max(seconds, 1e-9), 1)})
    if read:
        start = time.perf_counter()
        assign_stories(read)
        seconds = time.perf_counter() - start
        rows.append({"format": "syndication", "articles": len(read), "seconds": round(seconds, 4),
                     "articles_per_s": round(len(read) / max(seconds, 1e-9), 1)})
    return rows


# Reading the plain-text folder may take at most this share of the build's own steps over the same articles.
READING_SHARE_OF_BUILD = 0.2
_WHAT = {"txt": "plain text", "md": "Markdown with front matter", "html": "saved news pages", "jsonl": "JSON Lines",
         "json": "a JSON array", "csv": "CSV", "rss": "an RSS feed", "syndication": "syndication alone (MinHash)"}


def section_ingest(b: "Bench") -> None:
    """Articles read per second for each format, then the plain-text folder's reading time against a build of it.

    The build is ``qa-service index`` with the ONNX encoder, as the ``build`` section runs it; its share counts the
    build's own steps (chunk, embed, write, checksum: the manifest's ``build_seconds``) without loading or exporting
    the encoder, a cost per build and not per article, so the comparison is the strict one.
    """
    import shutil

    from qa_service.embedding.export_cache import remember_export
    from qa_service.manifest import live_manifest, read_manifest

    from .harness import Row, run_cli  # here, so that this file also runs as a script (see the end)

    folder = b.work / "reading"
    shutil.rmtree(folder, ignore_errors=True)
    rows = reading_speed(folder, b.sizes.reading_articles)
    for r in rows:
        what = _WHAT[r["format"]] if r["format"] == "syndication" else f"reading {_WHAT[r['format']]} ({r['format']})"
        b.add(Row("ingest", f"{what}, {r['articles']} articles", r["articles_per_s"], "articles/s",
                  note=f"{r['seconds']:.3f} s"))
    txt = next(r for r in rows if r["format"] == "txt")
    remember_export(live_manifest(b.seed_index))  # the seeds' export serves this build too: no second export
    index_dir = b.work / "reading-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    wall = run_cli(["index", str(folder / "reading-txt"), "--index-dir", str(index_dir)], b.work / "reading-index.log")
    phases = read_manifest(index_dir).get("build_seconds") or {}
    steps = sum(v for k, v in phases.items() if k != "encoder")
    b.add(Row("ingest", f"reading {txt['articles']} plain-text articles vs building them (the build's own steps)",
              txt["seconds"], "s", floor=steps or None, floor_label="chunk + embed + write",
              target=f"<= {READING_SHARE_OF_BUILD}",
              note=f"reading is {100 * txt['seconds'] / steps if steps else 0:.1f}% of the build's own steps; "
                   f"qa-service index took {wall:.1f} s in all, with start-up, reading and the encoder"))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qa-reading-") as folder:
        for row in reading_speed(folder):
            print(f"{row['format']:12s} {row['articles']:6d} articles {row['seconds']:8.3f} s "
                  f"{row['articles_per_s']:10.1f} articles/s")
