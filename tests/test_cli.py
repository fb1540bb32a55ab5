"""The qa-service command line: exit codes, messages without tracebacks, and the real end-to-end path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qa_service.cli import cli

from .support.paths import SEEDS

BIN = Path(sys.executable).parent / "qa-service"


def test_ask_without_index_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["ask", "anything", "--index-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "No index found" in result.output and "qa-service index" in result.output
    assert "Traceback" not in result.output


def test_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["ask", "q", "-k", "0"]).exit_code == 2
    assert runner.invoke(cli, ["ask", "q", "-k", "abc"]).exit_code == 2
    for blank in ("", "  ", "\u200b\ufeff"):  # checked before any index is opened
        result = runner.invoke(cli, ["ask", blank, "--index-dir", str(tmp_path / "none")])
        assert result.exit_code == 2 and "The question is empty" in result.output
    assert runner.invoke(cli, ["nosuchcommand"]).exit_code == 2
    assert runner.invoke(cli, ["index", str(tmp_path / "missing")]).exit_code == 2


def test_index_with_no_usable_articles(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = CliRunner().invoke(cli, ["index", str(tmp_path), "--index-dir", str(tmp_path / "idx")])
    assert result.exit_code == 1
    assert "skipped empty.txt: empty file" in result.output
    assert "No usable articles" in result.output


@pytest.mark.slow
def test_index_and_ask_json_end_to_end(tmp_path):
    """Real model, real subprocesses: build, rebuild only when stale, ask --json with exact citations."""
    env = dict(os.environ, QA_INDEX_DIR=str(tmp_path / "index"))
    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS, seeds)
    first = subprocess.run([str(BIN), "index", str(seeds)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("indexed 5 articles,") and "passages in" in first.stdout
    again = subprocess.run([str(BIN), "index", str(seeds)], env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == "index is up to date: 5 articles"

    ask = subprocess.run([str(BIN), "ask", "Who met Iran's foreign minister in Doha?", "--json", "-k", "5"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ask.returncode == 0, ask.stderr
    result = json.loads(ask.stdout)
    assert result["question"] == "Who met Iran's foreign minister in Doha?"
    assert len(result["results"]) == 5
    from qa_service.ingest import load_articles

    texts = {a.id: a.text for a in load_articles(seeds).articles}
    for rank, hit in enumerate(result["results"], 1):
        c = hit["citation"]
        assert hit["rank"] == rank
        assert set(c) >= {"article_id", "source", "title", "date", "start", "end"}
        assert texts[c["article_id"]][c["start"]:c["end"]] == hit["text"]
    top_sources = {h["citation"]["article_id"] for h in result["results"][:3]}
    assert top_sources & {"000_13c1da738e689733", "001_714cc25dd3f7c4d2", "004_9aeb4bd2e5102b83",
                          "002_043a94255de812b2"}

    # a model mismatch is one clear message, exit 1
    bad = subprocess.run([str(BIN), "ask", "x", "--model", str(tmp_path / "other-model")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "built with model" in bad.stderr and "Traceback" not in bad.stderr


def test_the_indexing_library_prints_nothing_and_hands_its_notes_over(tmp_path, capsys):
    """``indexing.ensure_index`` (behind ``qa-service index`` and ``serve --build``) returns or raises; what a person
    should read goes to its ``notes`` callback, never to the terminal."""
    from qa_service.config import Settings
    from qa_service.errors import QAError
    from qa_service.indexing import ensure_index

    (tmp_path / "empty.txt").write_text("")
    notes = []
    with pytest.raises(QAError, match="No usable articles") as raised:
        ensure_index(Settings(index_dir=tmp_path / "idx"), tmp_path, notes=notes.append)
    assert raised.value.code == "no_articles"
    assert notes == ["skipped empty.txt: empty file"]
    assert capsys.readouterr() == ("", "")
