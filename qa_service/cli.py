"""The ``qa-service`` command line: index | ask | serve | eval | bench."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from .config import DEFAULT_MODEL, Settings
from .errors import QAError

logger = logging.getLogger("qa_service")


def _common(func):
    """Options every command shares; they also read QA_INDEX_DIR / QA_MODEL."""

    @click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path), envvar="QA_INDEX_DIR",
                  default="index", show_default=True, help="Where the index lives.")
    @click.option("--model", envvar="QA_MODEL", default=DEFAULT_MODEL, show_default=True,
                  help="sentence-transformers model name or folder (default: the shipped offline copy).")
    @functools.wraps(func)
    def wrapper(*args, index_dir, model, **kwargs):
        settings = Settings.from_env(index_dir=index_dir, model=model)
        try:
            return func(settings, *args, **kwargs)
        except QAError as exc:
            raise click.ClickException(exc.message) from None
        except FileNotFoundError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as exc:  # never a traceback for a person; the log has the details
            logger.debug("unexpected error", exc_info=True)
            raise click.ClickException(f"unexpected error: {type(exc).__name__}: {exc}") from None


@click.group(cls=_Group)
@click.version_option(package_name="qa-service")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def cli(verbose: bool) -> None:
    """Semantic question answering over news articles, with exact citations."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def ensure_index(settings: Settings, seeds_dir: Path, force: bool = False, progress: bool = True) -> str:
    """Build the index from ``seeds_dir`` unless it is fresh; return a one-line summary."""
    from .embedding import load_embedder
    from .ingest import load_articles
    from .store import build_index, index_status

    report = load_articles(seeds_dir)
    for name, reason in report.skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    for name, reason in report.warnings:
        click.echo(f"warning {name}: {reason}", err=True)
    if not report.articles:
        raise click.ClickException(f"No usable articles in {seeds_dir}.")
    fresh, reason = index_status(settings, report.articles)
    if fresh and not force:
        return f"index is up to date: {len(report.articles)} articles"
    click.echo(f"building index ({reason})", err=True)
    embedder = load_embedder(settings.model)
    summary = build_index(report.articles, embedder, settings, progress=progress)
    return f"indexed {summary.articles} articles, {summary.passages} passages in {summary.seconds:.1f} s"


@cli.command()
@click.argument("seeds_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="seeds")
@click.option("--force", is_flag=True, help="Rebuild even when the index is up to date.")
@_common
def index(settings: Settings, seeds_dir: Path, force: bool) -> None:
    """Build (or refresh) the index from the articles in SEEDS_DIR."""
    click.echo(ensure_index(settings, seeds_dir, force=force))


def _print_hits(result: dict) -> None:
    if not result["results"]:
        click.echo("No passages found.")
    for hit in result["results"]:
        c = hit["citation"]
        head = f"{hit['rank']}. [{hit['score']:.3f}] {c['title'] or c['source']}"
        click.echo(click.style(head, bold=True))
        click.echo(f"   {c['article_id']} · {c['date'] or 'undated'} · chars {c['start']}-{c['end']}")
        click.echo("   " + hit["text"].replace("\n", "\n   "))
        click.echo()


@cli.command()
@click.argument("question", required=False)
@click.option("-k", type=click.IntRange(1, 50), default=5, show_default=True, help="How many passages.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result structure.")
@_common
def ask(settings: Settings, question: str | None, k: int, as_json: bool) -> None:
    """Ask QUESTION (or, without one, read questions interactively)."""
    from .retrieval import Searcher

    searcher = Searcher(settings)
    questions = [question] if question is not None else None
    if questions is None:
        click.echo("Ask a question (empty line or Ctrl-D to quit).", err=True)

    def interactive():
        while True:
            try:
                line = input("? ")
            except EOFError:
                return
            if not line.strip():
                return
            yield line

    for q in questions or interactive():
        if not q.strip():
            raise click.UsageError("The question is empty.")
        result = searcher.ask(q, k)
        if as_json:
            result.pop("took_ms", None)
            click.echo(json.dumps(result, ensure_ascii=False, indent=2))
        else:
            _print_hits(result)


def main() -> None:  # pragma: no cover
    cli()
