"""An index embedded on a local Ray (2 CPUs, 2 encoder actors) equals the single-process build of the same articles."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from qa_service.config import Settings
from qa_service.store import PASSAGES_DB, SENTENCE_VECTORS, VECTORS, build_index, read_manifest

from .support.live_server import FIGURES

pytestmark = pytest.mark.slow
# A local Ray listens on loopback only when this is set before Ray is imported (qa_service.embedding.ray).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
pytest.importorskip("ray.data", reason="needs ray[data]")


@pytest.fixture
def ray_stopped():
    """Whatever happens in the test, leave no Ray running in this process."""
    assert not ray.is_initialized()
    yield
    if ray.is_initialized():
        ray.shutdown()


def _contents(index_dir: Path) -> tuple[dict, list, np.ndarray, np.ndarray]:
    import faiss

    manifest = read_manifest(index_dir)
    build = Path(manifest["_build_dir"])
    con = sqlite3.connect(build / PASSAGES_DB)
    passages = con.execute('SELECT id, article_id, start, "end", text, first_sentence, last_sentence '
                           'FROM passages ORDER BY id').fetchall()
    passages += con.execute('SELECT id, article_id, start, "end", NULL, NULL, NULL FROM sentences '
                            'ORDER BY id').fetchall()
    con.close()
    index = faiss.read_index(str(build / VECTORS))
    return manifest, passages, index.reconstruct_n(0, index.ntotal), np.load(build / SENTENCE_VECTORS)


def test_ray_build_equals_single_process_build(tmp_path, seed_articles, real_embedder, ray_stopped, monkeypatch):
    from qa_service.embedding import ray as ray_pool

    embedded_on_ray = []
    encode = ray_pool.RayEmbedder._encode

    def counting(self, ray_, texts, batch_size, progress, groups=None, total=None):
        embedded_on_ray.append((len(texts), total))
        return encode(self, ray_, texts, batch_size, progress, groups, total)

    monkeypatch.setattr(ray_pool.RayEmbedder, "_encode", counting)

    single = Settings(index_dir=tmp_path / "single")
    t0 = time.perf_counter()
    build_index(seed_articles, real_embedder, single)
    single_seconds = time.perf_counter() - t0
    assert not embedded_on_ray

    on_ray = Settings(index_dir=tmp_path / "ray", ray_address="local", ray_actors=2)
    t0 = time.perf_counter()
    with ray_pool.ray_scope():  # one local Ray for the whole build
        summary = build_index(seed_articles, real_embedder, on_ray)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
        assert ray.util.get_node_ip_address() == "127.0.0.1"  # listeners on loopback
    ray_seconds = time.perf_counter() - t0
    assert not ray.is_initialized(), "the Ray started for the build is shut down when the scope ends"

    m1, p1, v1, s1 = _contents(single.index_dir)
    m2, p2, v2, s2 = _contents(on_ray.index_dir)
    assert summary.reused_articles == 0
    # every vector came from Ray, in one pass: each passage's vector and its sentences' pooled vectors
    # (a sentence shared by two overlapping passages is pooled in both, then averaged)
    con = sqlite3.connect(Path(m1["_build_dir"]) / PASSAGES_DB)
    pooled = con.execute("SELECT sum(last_sentence - first_sentence + 1) FROM passages").fetchone()[0]
    con.close()
    assert m1["sentence_vectors"] == m2["sentence_vectors"] == "pooled"
    assert embedded_on_ray == [(m1["counts"]["passages"], m1["counts"]["passages"] + pooled)]
    assert p1 == p2 and len(p1) == m1["counts"]["passages"] + m1["counts"]["sentences"]
    assert v1.shape == v2.shape == (m1["counts"]["passages"], 384) and s1.shape == s2.shape
    assert np.abs(v1 - v2).max() <= 1e-5
    assert np.abs(s1 - s2).max() <= 1e-5
    # The manifest records the encoder that made the vectors (the build's ONNX export), not the Ray wrapper.
    for key in ("backend", "precision", "sha256", "inputs", "max_seq_length"):
        assert m2["encoder"][key] == m1["encoder"][key], key
    assert m2["encoder"]["backend"] == "onnx" and m2["model"] == m1["model"] == "all-MiniLM-L6-v2"
    assert json.loads((Path(m2["_build_dir"]) / "manifest.json").read_text())["dimension"] == 384
    FIGURES.append(f"Ray build (local Ray, 2 CPUs, 2 actors): {m1['counts']['passages']} passages + "
                   f"{m1['counts']['sentences']} sentences in {ray_seconds:.1f} s (Ray start "
                   f"{ray_pool._Session.started_seconds:.1f} s) vs {single_seconds:.1f} s in one process; "
                   f"max |difference| passages {np.abs(v1 - v2).max():.1e}, sentences {np.abs(s1 - s2).max():.1e}")


def test_without_an_address_the_embedder_is_used_as_is(fake_embedder):
    from qa_service.embedding.ray import maybe_distributed

    assert maybe_distributed(fake_embedder, Settings()) is fake_embedder
    wrapped = maybe_distributed(fake_embedder, Settings(ray_address="local", ray_actors=3))
    assert (wrapped.name, wrapped.dimension, wrapped.max_seq_length, wrapped.actors) == (
        fake_embedder.name, fake_embedder.dimension, fake_embedder.max_seq_length, 3)
    assert wrapped.count_tokens("Two words.") == fake_embedder.count_tokens("Two words.")
    assert wrapped.encode([]).shape == (0, fake_embedder.dimension)  # nothing to embed: no Ray started
    assert not ray.is_initialized()


def test_index_command_ray_options(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qa_service import cli as cli_module
    from qa_service import indexing

    seen = []

    def index_folder(settings, seeds, force=False, progress=True, notes=None):
        seen.append(settings)
        return indexing.IndexReport("ok", 0, 0, str(seeds), True)

    monkeypatch.setattr(indexing, "index_folder", index_folder)
    monkeypatch.delenv("QA_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("QA_RAY_ACTORS", raising=False)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    runner = CliRunner()
    for args, env, expected in (
        ([], {}, (None, 2)),
        (["--ray"], {}, ("local", 2)),
        (["--ray", "--ray-actors", "3"], {}, ("local", 3)),
        (["--ray=ray://head:10001"], {}, ("ray://head:10001", 2)),
        (["--ray", "10.0.0.5:6379"], {}, ("10.0.0.5:6379", 2)),
        ([], {"QA_RAY_ADDRESS": "local", "QA_RAY_ACTORS": "4"}, ("local", 4)),
        (["--ray-actors", "1"], {"QA_RAY_ADDRESS": "head:6379"}, ("head:6379", 1)),
    ):
        result = runner.invoke(cli_module.cli, ["index", str(seeds), "--index-dir", str(tmp_path / "i"), *args],
                               env=env)
        assert result.exit_code == 0, result.output
        assert (seen[-1].ray_address, seen[-1].ray_actors) == expected, args
    assert runner.invoke(cli_module.cli, ["index", str(seeds), "--ray-actors", "0"]).exit_code == 2
    assert not ray.is_initialized()


def test_index_command_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qa_service.cli import cli

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # ``import ray`` now raises ImportError
    (tmp_path / "seeds").mkdir()
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "seeds"), "--ray", "--index-dir", str(tmp_path / "i")])
    assert result.exit_code == 1 and "pip install 'ray[data]==2.60.0'" in result.output
    assert "Traceback" not in result.output


def test_a_ray_imported_without_the_loopback_setting_is_refused():
    """A local Ray is never started on the machine's address: Ray imported before the setting is refused, saying
    what to do."""
    import subprocess
    import sys
    import textwrap

    from .support.paths import REPO

    script = textwrap.dedent("""
        import ray
        from qa_service.embedding.ray import RayUnavailable, import_ray
        try:
            import_ray("local")
        except RayUnavailable as exc:
            print(exc)
        print("initialized" if ray.is_initialized() else "not started")
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in lines[0] and "before" in lines[0]
    assert lines[-1] == "not started"


def test_bench_ray_section_runs(tmp_path, real_index, ray_stopped):
    """``qa-service bench --sections ray`` on tiny inputs: Ray's start, 1 and 2 actors against one process."""
    import os
    import shutil

    from qa_service.cli import _load_benchmarks

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(real_index.index_dir, work / "seeds-index", copy_function=os.link)
    suite = _load_benchmarks()
    text = suite.run(tmp_path / "out", ["ray"], quick=True, work=work, echo=lambda _: None).read_text()
    assert "| ray | local Ray start" in text
    for actors in (1, 2):
        assert f"| ray | {actors} actor(s): passages/s vs single-process encode |" in text
    assert "| ray | 2 actors vs 1 actor(s), passages/s |" in text
    assert not ray.is_initialized()


def test_ray_build_into_postgres_equals_the_folder_build(tmp_path, postgres, seed_articles, fake_embedder,
                                                          fake_searcher, ray_stopped):
    """`qa-service index --ray --database-url ...`: the Ray pool fills PostgreSQL, which then answers exactly
    as the single-process FAISS index of the same articles (fake embedder, pickled to the actors)."""
    from qa_service.backends.postgres_writer import PostgresWriter
    from qa_service.embedding import ray as ray_pool
    from qa_service.retrieval import Searcher

    from .support.postgres import QUESTIONS, cited, new_database

    settings = Settings(index_dir=tmp_path / "pg", model=fake_embedder.name, ray_address="local", ray_actors=2,
                        database_url=new_database(postgres, "ray_build"))
    with ray_pool.ray_scope(), PostgresWriter(settings) as writer:
        summary = writer.sync(seed_articles, fake_embedder)
        assert ray.is_initialized()
    assert not ray.is_initialized() and summary["embedded"] == len(seed_articles)
    on_pg = Searcher(settings.with_(ray_address=None), embedder=fake_embedder)
    for question in QUESTIONS[:6]:
        assert cited(on_pg.ask(question)) == cited(fake_searcher.ask(question))
