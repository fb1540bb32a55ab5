"""A small articles folder with metadata in three formats (Markdown front matter, JSON Lines, a saved news page),
for tests that the metadata survives indexing and serving in every backend."""

from __future__ import annotations

import json
from pathlib import Path

MD = """---
title: Port of Mombasa reopens after the storm
date: 2025-03-14
url: https://example.com/news/mombasa-port
outlet: Coast Daily
author: Amina Otieno
---
The port of Mombasa reopened on Friday after three days of closure caused by the storm. Shipping lines said
the backlog of containers would take a week to clear. The harbour master praised the crews who worked overnight.
"""

RECORDS = [
    {"id": "rail-strike", "title": "Rail workers end their strike", "date": "2025-04-02",
     "url": "https://wire.example.org/rail-strike", "outlet": "Wire Service", "author": "J. Doe",
     "text": "Rail workers ended a two-week strike on Wednesday after the union accepted a new pay offer. "
             "Trains will run on the normal timetable from Monday, the operator said."},
    {"title": "Library opens a new wing", "date": "2025-05-20", "url": "https://city.example.net/library",
     "outlet": "City Paper",
     "text": "The city library opened a new wing for children on Tuesday. The wing holds twelve thousand books "
             "and a reading garden, and it is open every day of the week."},
]

HTML = """<!doctype html><html><head><title>Solar farm approved | Valley Times</title>
<meta property="og:title" content="Solar farm approved by the council">
<meta property="og:site_name" content="Valley Times">
<meta name="author" content="Pat Lee">
<meta property="article:published_time" content="2025-06-10T09:00:00Z">
<link rel="canonical" href="https://valleytimes.example.com/solar-farm">
</head><body><nav><a href="/">Home</a> <a href="/news">News</a></nav>
<div class="cookie-banner">We use cookies. Accept all cookies?</div>
<article><h1>Solar farm approved by the council</h1>
<p>The county council approved a solar farm on former farmland on Tuesday evening after a long debate.</p>
<p>The farm will power about four thousand homes and is expected to open in the spring of next year.</p>
<p>Residents who opposed the plan said they would consider an appeal to the regional planning board.</p>
</article><footer>Copyright Valley Times</footer></body></html>
"""

# id -> the metadata each must come back with
EXPECTED = {
    "mombasa": {"title": "Port of Mombasa reopens after the storm", "date": "2025-03-14",
                "source_url": "https://example.com/news/mombasa-port", "outlet": "Coast Daily",
                "author": "Amina Otieno"},
    "rail-strike": {"title": "Rail workers end their strike", "date": "2025-04-02",
                    "source_url": "https://wire.example.org/rail-strike", "outlet": "Wire Service",
                    "author": "J. Doe"},
    "news--solar": {"title": "Solar farm approved by the council", "date": "2025-06-10",
              "source_url": "https://valleytimes.example.com/solar-farm", "outlet": "Valley Times",
              "author": "Pat Lee"},
}


def write_formats_folder(folder: Path) -> Path:
    """Write mombasa.md, feed.jsonl (two records, one without an id) and news/solar.html into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mombasa.md").write_text(MD, encoding="utf-8")
    (folder / "feed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (folder / "news").mkdir(exist_ok=True)
    (folder / "news" / "solar.html").write_text(HTML, encoding="utf-8")
    return folder
