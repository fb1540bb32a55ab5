"""Helpers for the tests that run against a real PostgreSQL."""

from __future__ import annotations

import json

from .paths import SHARED

DEV_QUESTIONS = [json.loads(line)["question"] for line in (SHARED / "eval" / "dev.jsonl").read_text().splitlines()
                 if line.strip()] if (SHARED / "eval" / "dev.jsonl").exists() else []
QUESTIONS = DEV_QUESTIONS + ["What did Araqchi say?", "Haniya al-Hayyah ceasefire", "47,400 killed", "zzzz qqqq"]


def cited(result: dict) -> list[tuple]:
    """What two backends must agree on for every hit: citation, rounded score, answer span, grouped copies."""
    return [(h["citation"]["article_id"], h["citation"]["start"], h["citation"]["end"], round(h["score"], 4),
             h["answer"]["start"], h["answer"]["end"], len(h["also_reported_by"])) for h in result["results"]]


def new_database(server, name: str) -> str:
    """Create an empty database on ``server``; return its URL."""
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + "/" + name
