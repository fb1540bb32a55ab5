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


# --------------------------------------------------------------------------- index: folders, skipped files, --json

@pytest.fixture
def fake_model(monkeypatch):
    """``qa-service index`` in-process with the fake embedder (no model download, no torch)."""
    import qa_service.embedding as embedding

    from .support.fakes import FakeEmbedder

    monkeypatch.setattr(embedding, "load_embedder", lambda name: FakeEmbedder())
    return ["--model", FakeEmbedder.name]


def _index(folder, index_dir, *extra):
    return CliRunner().invoke(cli, ["index", str(folder), "--index-dir", str(index_dir), *extra])


def test_index_names_every_skipped_file_and_record_and_prints_json(tmp_path, fake_model):
    from .support.formats import write_formats_folder

    folder = write_formats_folder(tmp_path / "articles")
    (folder / "report.docx").write_bytes(b"PK\x03\x04 not an article")
    (folder / "notes.jsonl").write_text('{"title": "ok", "text": "A record with enough text to be read."}\n'
                                        '[1, 2]\n', encoding="utf-8")
    result = _index(folder, tmp_path / "index", *fake_model)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("indexed 5 articles,")
    assert "2 file(s) or record(s) skipped:" in result.stdout
    assert "  report.docx: unsupported type .docx" in result.stdout
    assert "notes.jsonl" in result.stdout and "line 2" in result.stdout

    (folder / "extra.txt").write_text("A late addition to the folder, long enough to be an article of its own.\n")
    again = _index(folder, tmp_path / "index", "--json", *fake_model)
    assert again.exit_code == 0, again.output
    body = json.loads(again.stdout)
    assert body["articles"] == 6 and body["passages"] >= 6 and body["up_to_date"] is False
    assert body["folder"] == str(folder.resolve())
    assert {"file": "report.docx", "reason": "unsupported type .docx"} in body["skipped"]
    assert any(s["file"].startswith("notes.jsonl") and "line 2" in s["file"] + s["reason"] for s in body["skipped"])
    assert len(body["skipped"]) == 2 and body["warnings"] == []
    assert (body["removed"], body["added"], body["replaced_folder"]) == (0, 1, None)
    fresh = json.loads(_index(folder, tmp_path / "index", "--json", *fake_model).stdout)
    assert fresh["up_to_date"] is True and fresh["passages"] is None and fresh["articles"] == 6


def test_a_folder_of_only_unsupported_files_says_which_formats_are_read(tmp_path, fake_model):
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "report.docx").write_bytes(b"PK\x03\x04")
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4")
    result = _index(folder, tmp_path / "index", *fake_model)
    assert result.exit_code == 1
    assert "skipped report.docx: unsupported type .docx" in result.output
    assert "skipped scan.pdf: unsupported type .pdf" in result.output
    assert "No usable articles" in result.output and "2 file(s) or record(s) skipped" in result.output
    for kind in (".txt", ".md", ".html", ".jsonl", ".json", ".csv", ".xml", ".rss", ".atom"):
        assert kind in result.output
    as_json = _index(folder, tmp_path / "index", "--json", *fake_model)
    assert as_json.exit_code == 1 and "No usable articles" in as_json.output


def test_indexing_another_folder_says_how_many_articles_it_removes_and_adds(tmp_path, fake_model):
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(SEEDS, first)
    second.mkdir()
    for name in sorted(p.name for p in SEEDS.iterdir())[:2]:  # two articles in common
        shutil.copy(SEEDS / name, second / name)
    from .support.formats import write_formats_folder

    write_formats_folder(second)
    assert _index(first, tmp_path / "index", *fake_model).exit_code == 0
    result = _index(second, tmp_path / "index", *fake_model)
    assert result.exit_code == 0, result.output
    assert (f"index: replacing 5 articles from {first.resolve()} with 6 from {second.resolve()} "
            "(3 removed, 4 added)") in result.stderr
    back = json.loads(_index(first, tmp_path / "index", "--json", *fake_model).stdout)
    assert (back["removed"], back["added"], back["replaced_folder"]) == (4, 3, str(second.resolve()))
    moved = tmp_path / "c"  # the same articles in another folder: the index is made to name the new one
    shutil.copytree(first, moved)
    result = _index(moved, tmp_path / "index", *fake_model)
    assert result.exit_code == 0, result.output
    assert f"replacing 5 articles from {first.resolve()} with 5 from {moved.resolve()} (0 removed, 0 added)" \
        in result.stderr
    assert f"building index (it was built from another folder, {first.resolve()})" in result.stderr
    assert "(5 unchanged articles not re-embedded)" in result.stdout


def test_eval_finds_the_articles_folder_the_index_names_from_any_directory(tmp_path, fake_model, monkeypatch):
    """``eval`` of a question file without --seeds-dir uses the folder the index was built from, wherever it runs."""
    seeds = tmp_path / "data" / "seeds"
    shutil.copytree(SEEDS, seeds)
    index_dir = tmp_path / "data" / "index"
    assert _index(seeds, index_dir, *fake_model).exit_code == 0
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who met Iran's foreign minister in Doha?",
                                     "relevant": ["004_9aeb4bd2e5102b83"]}) + "\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("QA_SEEDS_DIR", raising=False)
    monkeypatch.setattr("qa_service.retrieval.Searcher",
                        _searcher_with_fake_encoder(), raising=True)
    result = CliRunner().invoke(cli, ["eval", str(questions), "--index-dir", str(index_dir), "--json",
                                      "--latency-sample", "0", *fake_model])
    assert result.exit_code == 0, result.output
    assert "does not exist" not in result.output
    assert "index is up to date: 5 articles" in result.stderr


def _searcher_with_fake_encoder():
    from qa_service.retrieval import Searcher

    from .support.fakes import FakeEmbedder

    class FakeSearcher(Searcher):
        def __init__(self, settings, **kwargs):
            super().__init__(settings, embedder=FakeEmbedder(), **kwargs)

    return FakeSearcher


def test_serve_writes_to_the_folder_the_index_names_from_any_directory(tmp_path, fake_model, monkeypatch):
    """Without --build or QA_SEEDS_DIR, ``serve`` hands its workers the folder the index was built from."""
    import qa_service.web.server as server

    seeds = tmp_path / "data" / "seeds"
    shutil.copytree(SEEDS, seeds)
    index_dir = tmp_path / "data" / "index"
    assert _index(seeds, index_dir, *fake_model).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("QA_SEEDS_DIR", raising=False)
    served = []
    monkeypatch.setattr(server, "run", lambda settings, host, port, workers: served.append(settings))
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(index_dir), *fake_model])
    assert result.exit_code == 0, result.output
    assert served[0].seeds_dir == seeds.resolve()
    monkeypatch.setenv("QA_SEEDS_DIR", str(tmp_path / "data" / "seeds"))  # an explicit folder still wins
    assert CliRunner().invoke(cli, ["serve", "--index-dir", str(index_dir), *fake_model]).exit_code == 0
    assert served[1].seeds_dir == tmp_path / "data" / "seeds"


def test_piped_questions_give_one_json_line_each_and_skip_blank_lines(fake_searcher, monkeypatch):
    import qa_service.retrieval

    monkeypatch.setattr(qa_service.retrieval, "Searcher", lambda settings: fake_searcher)
    result = CliRunner().invoke(cli, ["ask", "--json", "-k", "2"],
                                input="Who met Iran's foreign minister in Doha?\n\n  \nWhat did Pezeshkian say?\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line)["question"] for line in lines] == ["Who met Iran's foreign minister in Doha?",
                                                               "What did Pezeshkian say?"]
    assert "?" not in result.stdout.split("{", 1)[0]  # no prompt before the first object


def test_a_closed_pipe_ends_ask_quietly(fake_searcher, monkeypatch):
    import qa_service.cli
    import qa_service.retrieval

    monkeypatch.setattr(qa_service.retrieval, "Searcher", lambda settings: fake_searcher)

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(qa_service.cli.click, "echo", closed)
    result = CliRunner().invoke(cli, ["ask", "What did Pezeshkian say?"])
    assert result.exit_code == 0 and "Error" not in result.output


@pytest.mark.slow
def test_ask_composes_with_pipes(real_index):
    """Real processes: questions piped in with a blank line give JSON Lines; `| head` closes the pipe quietly."""
    env = dict(os.environ, QA_INDEX_DIR=str(real_index.index_dir))
    piped = subprocess.run([str(BIN), "ask", "--json", "-k", "1"], input="Who met Iran's foreign minister?\n\n"
                           "What did Pezeshkian say?\n", env=env, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert len([json.loads(line) for line in piped.stdout.splitlines()]) == 2
    questions = "".join(f"What did Pezeshkian say about Gaza, part {i}?\n" for i in range(40))
    proc = subprocess.Popen([str(BIN), "ask", "-k", "50"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdin.write(questions.encode())
    proc.stdin.close()
    assert proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does, long before 40 x 50 passages are printed
    assert proc.wait(timeout=300) == 0
    assert b"Error" not in proc.stderr.read()
