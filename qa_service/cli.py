"""The ``qa-service`` command line: index | ask | serve | eval | bench."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from . import indexing
from .config import DEFAULT_MODEL, Settings
from .errors import QAError
from .types import MODES, is_blank

logger = logging.getLogger("qa_service")


def _common(func):
    """Options every command shares; they also read QA_INDEX_DIR / QA_MODEL."""

    @click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path), envvar="QA_INDEX_DIR",
                  default="index", show_default=True, help="Where the index lives.")
    @click.option("--model", envvar="QA_MODEL", default=DEFAULT_MODEL, show_default=True,
                  help="sentence-transformers model name or folder (default: the shipped offline copy).")
    @click.option("--reranker", envvar="QA_RERANKER", default=None,
                  help="Optional cross-encoder name or folder to rerank the best candidates (off by default).")
    @click.option("--database-url", envvar="QA_DATABASE_URL", default=None, metavar="URL",
                  help="Keep the index in PostgreSQL with pgvector (postgresql://user@host/db) instead of the "
                  "FAISS folder; every service pointed at it shares it.")
    @functools.wraps(func)
    def wrapper(*args, index_dir, model, reranker, database_url, **kwargs):
        try:
            settings = Settings.from_env(index_dir=index_dir, model=model, reranker=reranker, database_url=database_url)
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
    level = logging.DEBUG if verbose else logging.WARNING
    # The level is set on the handler too: bm25s sets its own logger to DEBUG when imported, which would
    # otherwise print "Building index from tokens" on every build.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])


def _note(line: str) -> None:
    click.echo(line, err=True)


def ensure_index(settings: Settings, seeds_dir: Path, force: bool = False, progress: bool = True) -> str:
    """``indexing.ensure_index``, with its notes (skipped files, why it rebuilds) on stderr."""
    return indexing.ensure_index(settings, seeds_dir, force=force, progress=progress, notes=_note)


@cli.command()
@click.argument("seeds_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="seeds")
@click.option("--force", is_flag=True, help="Rebuild even when the index is up to date.")
@click.option("--quantize", type=click.Choice(["auto", "none", "int8"]), envvar="QA_QUANTIZE", default="auto",
              show_default=True, help="Precision of the ONNX encoder for passages and questions: none (fp32), "
              "int8 (faster, slightly different vectors), or auto: the existing index's, fp32 for a new one. "
              "Changing it rebuilds the index.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray actor pool: alone (or --ray=local) starts a local Ray, else the address of a "
              "Ray cluster [env QA_RAY_ADDRESS]. Needs the ray extra. Put it after SEEDS_DIR.")
@click.option("--ray-actors", type=click.IntRange(1, 1024), default=None,
              help="Encoder actors in the Ray pool [env QA_RAY_ACTORS; default 2].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (articles, passages, skipped files and "
              "records with their reasons, warnings, articles removed and added) instead of the summary line.")
@_common
def index(settings: Settings, seeds_dir: Path, force: bool, quantize: str, ray_address: str | None,
          ray_actors: int | None, as_json: bool) -> None:
    """Build (or refresh) the index from the articles in SEEDS_DIR and its subfolders.

    Every file or record not read is named with its reason. The index records the folder, so serve, eval and
    article writes use it from any working directory.
    """
    from .embedding.ray import RayUnavailable, import_ray, ray_scope

    settings = settings.with_(quantize=quantize)
    if ray_address is not None:
        settings = settings.with_(ray_address=ray_address)
    if ray_actors is not None:
        settings = settings.with_(ray_actors=ray_actors)
    if settings.ray_address:
        try:
            import_ray(settings.ray_address)  # say it is missing before the build, not after its ONNX export
        except RayUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    with ray_scope():  # a Ray started by the build serves both its passes, and is shut down here
        report = indexing.index_folder(settings, seeds_dir, force=force, progress=not as_json,
                                       notes=_note)
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
        return
    click.echo(_with_skipped(report))


def _with_skipped(report: indexing.IndexReport) -> str:
    """The summary line, then every file or record skipped with its reason (they scroll by during a build)."""
    if not report.skipped:
        return report.line
    lines = [report.line, f"{len(report.skipped)} file(s) or record(s) skipped:"]
    lines += [f"  {name}: {reason}" for name, reason in report.skipped]
    return "\n".join(lines)


def _print_hits(result: dict, title_of) -> None:
    """Print a result for people: each hit under its article's title (``title_of(article_id)`` when the citation
    has none: the lead sentence, never the file name), then where it is and its answer sentence."""

    def title(cited: dict) -> str:
        return cited.get("title") or title_of(cited["article_id"])

    if not result["results"]:
        click.echo("No passages found.")
    elif result.get("answerable") is False:
        names = result.get("names_not_in_articles") or []
        why = f" (no article mentions {', '.join(names)})" if names else ""
        click.echo(click.style(f"The articles do not seem to answer this{why}; the closest passages:", fg="yellow"))
    for hit in result["results"]:
        c = hit["citation"]
        head = f"{hit['rank']}. [{hit['score']:.3f}] {title(c)}"
        click.echo(click.style(head, bold=True))
        outlet = f"{c['outlet']} · " if c.get("outlet") else ""
        click.echo(f"   {outlet}{c['article_id']} · {c['date'] or 'undated'} · chars {c['start']}-{c['end']}")
        click.echo("   " + hit["text"].replace("\n", "\n   "))
        if hit.get("answer"):
            click.echo(click.style("   → " + hit["answer"]["text"], fg="green"))
        for other in hit.get("also_reported_by", []):
            by = f"{title(other)}, {other['outlet']}" if other.get("outlet") else title(other)
            click.echo(f"   also reported by {by} ({other['date'] or 'undated'}): {other['answer']['text']}")
        click.echo()


@cli.command()
@click.argument("question", required=False)
@click.option("-k", type=click.IntRange(1, 50), default=5, show_default=True, help="How many passages.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result structure.")
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True,
              help="Retrieval: fused dense + BM25, or one of them alone.")
@_common
def ask(settings: Settings, question: str | None, k: int, as_json: bool, mode: str) -> None:
    """Ask QUESTION (or, without one, read questions: one a line, interactively at a terminal).

    Reading from a pipe, no prompt is shown, blank lines are skipped and ``--json`` writes one JSON object a
    line; a reader that closes the pipe early (``| head``) ends it quietly.
    """
    from .retrieval import Searcher

    if question is not None and is_blank(question):
        raise click.UsageError("The question is empty.")
    searcher = Searcher(settings)
    piped = question is None and not sys.stdin.isatty()
    if question is not None:
        questions = [question]
    elif piped:
        questions = (line.rstrip("\n") for line in sys.stdin if not is_blank(line))
    else:
        click.echo("Ask a question (empty line or Ctrl-D to quit).", err=True)
        questions = _typed_questions()
    try:
        for q in questions:
            result = searcher.ask(q, k, mode=mode)
            if as_json:
                result.pop("took_ms", None)
                click.echo(json.dumps(result, ensure_ascii=False, indent=None if piped else 2))
            else:
                _print_hits(result, searcher.display_title)
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_closed_stdout()


def _typed_questions():
    """Questions typed at a terminal, until an empty line or end of input."""
    while True:
        try:
            line = input("? ")
        except EOFError:
            return
        if is_blank(line):
            return
        yield line


def _quiet_closed_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so the exit's flush cannot fail, and stop
    with status 0, as the Python documentation advises for SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests)
        pass
    raise SystemExit(0)


@cli.command("eval")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--mode", "modes", help="Retrieval modes to compare, comma-separated (e.g. dense,lexical,hybrid) "
              "[default: the Searcher's default].")
@click.option("--url", help="Ask a running service (POST URL/api/ask) instead of searching in-process.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable summary.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.json, report.md and recall.png into this folder.")
@click.option("--depth", type=click.IntRange(1, 1000), help="Passages retrieved per question "
              "[default: 100 for question files; BEIR: 20 x passages per document, 30..100; 50 over HTTP].")
@click.option("--seeds-dir", type=click.Path(file_okay=False, path_type=Path), envvar="QA_SEEDS_DIR",
              default=None, help="Articles the index is built from (question files) [default: the folder the "
              "index was built from, else seeds].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where BEIR corpora are indexed [default: INDEX_DIR/beir].")
@click.option("--split", default="test", show_default=True, help="BEIR qrels split (qrels/SPLIT.tsv).")
@click.option("--limit", type=click.IntRange(1), help="Evaluate only the first N questions.")
@click.option("--latency-sample", type=click.IntRange(0), default=200, show_default=True,
              help="In-process: time this many single questions (Searcher.ask).")
@click.option("--grouped", is_flag=True, help="In-process, score the grouped results the API shows "
              "instead of the raw passage ranking (question files).")
@click.option("--whole-documents", is_flag=True, help="BEIR folders: index each document as one passage "
              "(title + text, truncated by the model) scored by its plain cosine, as MTEB does; cached apart.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
@_common
def eval_(settings: Settings, path: Path, modes: str | None, url: str | None, as_json: bool, out_dir: Path | None,
          depth: int | None, seeds_dir: Path | None, cache_dir: Path | None, split: str, limit: int | None,
          latency_sample: int, grouped: bool, whole_documents: bool, progress: bool | None) -> None:
    """Evaluate retrieval on PATH: a JSON Lines question file or a BEIR folder."""
    import time

    from . import evaluation as ev

    started = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes else [None]
    try:
        dataset = ev.load_dataset(path, split)
    except ev.DatasetError as exc:
        raise click.BadParameter(exc.message, param_hint="PATH") from None
    if limit:
        dataset.questions = dataset.questions[:limit]
    if whole_documents and (url or dataset.format != "beir"):
        raise click.UsageError("--whole-documents applies to BEIR folders searched in-process (their own index), "
                               "not to question files or --url.")
    if url:
        backend = ev.HttpBackend(url)
    else:
        from .retrieval import Searcher

        if dataset.format == "beir":
            beir_settings, note = ev.ensure_beir_index(path, settings, cache_dir or settings.index_dir / "beir",
                                                       progress=progress, whole_documents=whole_documents)
            click.echo(note, err=True)
            # with the build's own query encoder, as the service does; BEIR corpora are always a FAISS folder
            searcher = Searcher(beir_settings.with_(database_url=None),
                                config=ev.retrieval_config(settings, whole_documents))
        else:
            folder = seeds_dir or indexing.articles_folder(settings)
            click.echo(ensure_index(settings, folder, progress=progress), err=True)
            searcher = Searcher(settings)
        backend = ev.LocalBackend(searcher, grouped=grouped and dataset.format == "questions")
    try:
        summaries = ev.evaluate(dataset, backend, mode_list, depth, latency_sample=latency_sample, progress=progress)
    except ev.UnknownMode as exc:
        raise click.BadParameter(exc.message, param_hint="--mode") from None
    if as_json:
        click.echo(json.dumps(ev.summary_json(summaries), indent=2, ensure_ascii=False))
    else:
        click.echo(ev.format_table(summaries))
    if out_dir:
        written = ev.write_report(summaries, out_dir)
        click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
    click.echo(f"evaluated {len(dataset.questions)} questions x {len(summaries)} mode(s) "
               f"in {time.perf_counter() - started:.1f} s", err=True)


@cli.command()
@click.option("--host", envvar="QA_HOST", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", envvar="QA_PORT", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", envvar="QA_WORKERS", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Worker processes; each loads the index and the model once.")
@click.option("--build", "build_from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              metavar="SEEDS_DIR", help="First build the index from SEEDS_DIR if it is missing or stale.")
@click.option("--public", is_flag=True, help="Allow a non-loopback --host (reachable from other machines).")
@_common
def serve(settings: Settings, host: str, port: int, workers: int, build_from: Path | None, public: bool) -> None:
    """Serve the JSON API and the web form under gunicorn.

    Articles can be added and removed over the API (POST/DELETE /api/articles) when QA_API_KEY is set;
    they are written to the --build folder, or else to QA_SEEDS_DIR, or else to the folder the index was built
    from.
    """
    from .web import server
    from .web.auth import check_security_settings

    if server.debug_requested():
        raise click.ClickException("Refusing to serve with FLASK_DEBUG set: Flask's debugger can run arbitrary "
                                   "code. Unset FLASK_DEBUG.")
    if not public and not server.is_loopback(host):
        raise click.UsageError(f"{host} is not a loopback address, so other machines could use the service. "
                               "Pass --public to allow that.")
    check_security_settings(settings)
    if build_from is not None:
        settings = settings.with_(seeds_dir=build_from)
        click.echo(server.build_in_subprocess(settings, build_from), err=True)
    else:
        settings = settings.with_(seeds_dir=indexing.articles_folder(settings))
    recovered = server.recover_writes(settings)
    if recovered:
        click.echo(recovered, err=True)
    server.check_index(settings)
    click.echo(f"serving http://{host}:{port}/ with {workers} worker(s); Ctrl-C stops", err=True)
    server.run(settings, host, port, workers)


def _load_benchmarks():
    """Import this checkout's benchmarks/suite.py (by path: a package of that name may be installed; pysbd had one)."""
    import importlib.util

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (folder / "suite.py").is_file():
        raise click.ClickException("The benchmarks/ folder is not here: run qa-service bench from a checkout "
                                   "installed with pip install -e .")
    name = "qa_service_benchmarks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.suite")


@cli.command()
@click.option("--quick", is_flag=True, help="Tiny inputs (seconds, not minutes): checks that the suite runs.")
@click.option("--sections", default=None, help="Comma-separated sections to run [default: every section].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results go: each run under runs/, the latest full run as latest.md and latest.json "
                   "[default: benchmarks/results/ of this checkout].")
def bench(quick: bool, sections: str | None, out_dir: Path | None) -> None:
    """Measure latency, throughput, build, cold start, scale, reading and a peer, each as a ratio to its floor."""
    suite = _load_benchmarks()
    chosen = [s.strip() for s in sections.split(",") if s.strip()] if sections else list(suite.SECTIONS)
    unknown = [s for s in chosen if s not in suite.SECTIONS]
    if unknown:
        raise click.BadParameter(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(suite.SECTIONS)}",
                                 param_hint="--sections")
    out_dir = out_dir or suite.REPO / "benchmarks" / "results"
    path = suite.run(out_dir, chosen, quick=quick, echo=lambda line: click.echo(line, err=True))
    click.echo(path.read_text(encoding="utf-8"))


def main() -> None:  # pragma: no cover
    cli()
