"""Chunking: sentence boundaries, exact offsets (a property over seeds and generated text), token limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from qa_service.chunking import split_article, split_sentences
from qa_service.types import Article

from .support.fakes import FakeEmbedder

count = FakeEmbedder().count_tokens


def sentences_of(text):
    return [text[s:e] for s, e in split_sentences(text)]


@pytest.mark.parametrize("text,expected", [
    ("It began on Oct. 7, 2023 in Gaza. Talks followed.", ["It began on Oct. 7, 2023 in Gaza.", "Talks followed."]),
    ("On Jan.19, a ceasefire began. It held.", ["On Jan.19, a ceasefire began.", "It held."]),
    ("The U.S. and Qatar mediated. Egypt too.", ["The U.S. and Qatar mediated.", "Egypt too."]),
    ("Inflation was 3.5 percent in 2024. It fell.", ["Inflation was 3.5 percent in 2024.", "It fell."]),
    ("He said: “They met in Doha.” Then they left.", ["He said: “They met in Doha.”", "Then they left."]),
    ('They discussed "the war." Nothing more.', ['They discussed "the war."', "Nothing more."]),
    ("One paragraph\n\nAnother paragraph", ["One paragraph", "Another paragraph"]),
])
def test_sentence_boundaries(text, expected):
    assert sentences_of(text) == expected


def test_seed_sentence_cases(seed_articles):
    all_sentences = [s for a in seed_articles for s in sentences_of(a.text)]
    assert any("On Jan.19, a ceasefire agreement" in s and s.endswith("subsequent phases of the deal.")
               for s in all_sentences)
    assert any("(Oct. 7, 2023 Hamas attack) a turning point" in s for s in all_sentences)
    assert any(s.endswith("with support from the US.") for s in all_sentences)
    assert not any(s in ("Oct.", "U.S.", "Jan.") for s in all_sentences)


def check_passages(article, passages, max_tokens):
    assert passages or not article.text.strip()
    for p in passages:
        assert article.text[p.start:p.end] == p.text
        assert p.text == p.text.strip() and p.text
        assert count(p.text) <= max_tokens
    # every sentence is covered by some passage, and passages advance
    covered = set()
    for p in passages:
        covered.update(range(p.start, p.end))
    for s, e in split_sentences(article.text):
        assert all(i in covered for i in range(s, e) if not article.text[i].isspace())
    starts = [p.start for p in passages]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


@pytest.mark.parametrize("max_tokens", [16, 64, 128])
def test_offsets_exact_for_every_seed_passage(seed_articles, max_tokens):
    for article in seed_articles:
        check_passages(article, split_article(article, count, max_tokens, 1).passages(article), max_tokens)


def test_overlap_shares_a_sentence(seed_articles):
    article = seed_articles[0]
    passages = split_article(article, count, 64, 1).passages(article)
    assert len(passages) > 2
    multi = 0
    for a, b in zip(passages, passages[1:]):
        if len(split_sentences(a.text)) > 1:  # a one-sentence window has nothing to carry over
            multi += 1
            last_start = a.start + split_sentences(a.text)[-1][0]
            assert b.start == last_start  # the last sentence of a starts b
    assert multi >= 2


_words = st.sampled_from(["Gaza", "Oct.", "7,", "U.S.", "Jan.19,", "3.5", "“quoted", "text.”", "Mr.", "Smith",
                          "said", "the", "ceasefire", "held.", "(Israeli)", "al-Hayya", "Iran’s", "47,400", "—",
                          "end.", "Why?", "Yes!", "e.g.", "i.e.", "...", "'single'", "\u00e9t\u00e9",
                          "\u0645\u0631\u062d\u0628\u0627"])
_sentence = st.lists(_words, min_size=1, max_size=40).map(" ".join)
_paragraph = st.lists(_sentence, min_size=1, max_size=6).map(" ".join)
_text = st.lists(_paragraph, min_size=1, max_size=5).map("\n\n".join)


@hsettings(max_examples=150, deadline=None)
@given(text=_text, max_tokens=st.sampled_from([8, 24, 128]), overlap=st.sampled_from([0, 1, 2]))
def test_offsets_property_generated(text, max_tokens, overlap):
    article = Article("gen", "gen.txt", None, None, text)
    check_passages(article, split_article(article, count, max_tokens, overlap).passages(article), max_tokens)


@pytest.mark.slow
def test_real_tokenizer_never_truncates(seed_articles, real_embedder):
    from qa_service.config import Settings
    from qa_service.store import chunk_articles

    passages = chunk_articles(seed_articles, real_embedder, Settings()).passages
    assert passages
    for p in passages:
        # +2 for [CLS]/[SEP]: must fit the model's window, so nothing is cut off when embedding
        assert real_embedder.count_tokens(p.text) + 2 <= real_embedder.max_seq_length
        assert real_embedder.count_tokens(p.text) <= Settings().max_tokens


def _greedy_windows(text, sentences, count_tokens, max_tokens, overlap):
    """The plain packing rule, one count per sentence added: the reference ``pack_sentences`` must equal."""
    windows, i, n = [], 0, len(sentences)
    while i < n:
        j = i + 1
        while j < n and count_tokens(text[sentences[i][0]:sentences[j][1]]) <= max_tokens:
            j += 1
        windows.append((i, j - 1))
        if j >= n:
            break
        i = max(i + 1, j - overlap)
    return windows


def _not_additive(text):
    """A counter whose count of joined sentences is not their sum (one token per 3 characters, spaces included)."""
    return -(-len(text) // 3)


@hsettings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), max_tokens=st.integers(3, 60),
       overlap=st.integers(0, 2), additive=st.booleans())
def test_packing_equals_the_plain_rule_for_any_counter(lengths, max_tokens, overlap, additive):
    from qa_service.chunking import pack_sentences

    words = [" ".join(["w"] * n) + "." for n in lengths]
    text = " ".join(words)
    spans, at = [], 0
    for w in words:
        spans.append((at, at + len(w)))
        at += len(w) + 1
    counter = count if additive else _not_additive
    # sentences longer than the limit are cut before packing (counted_units); keep the spans that fit
    spans = [s for s in spans if counter(text[s[0]:s[1]]) <= max_tokens] or spans[:1]
    expected = _greedy_windows(text, spans, counter, max_tokens, overlap)
    assert pack_sentences(text, spans, counter, max_tokens, overlap) == expected
    own = [counter(text[s:e]) for s, e in spans]
    assert pack_sentences(text, spans, counter, max_tokens, overlap, own) == expected


def test_cutting_many_articles_on_worker_processes_gives_the_same_cut(seed_articles, monkeypatch):
    from qa_service import chunking

    pools = []
    real_pool = chunking.fork_pool
    monkeypatch.setattr(chunking, "fork_pool", lambda n: pools.append(n) or real_pool(n))
    articles = list(seed_articles) * 8  # 40 articles: over the pool's threshold
    assert len(articles) >= chunking.PARALLEL_MIN_TEXTS
    alone = [split_article(a, count, 60, 1) for a in articles]
    assert chunking.split_articles(articles, count, 60, 1, processes=2) == alone
    assert pools == [2]  # the forked path ran
    assert chunking.split_articles(articles, count, 60, 1, processes=1) == alone
    assert chunking._JOB is None  # nothing of the job is left behind for a later fork
    for article, (units, windows) in zip(articles, alone):
        assert units == chunking.counted_units(article.text, count, 60)[0]
        assert [(units[i][0], units[j][1]) for i, j in windows] == \
            [(p.start, p.end) for p in split_article(article, count, 60, 1).passages(article)]


def test_a_process_that_answers_questions_never_forks(seed_articles, fake_index, tmp_path, monkeypatch):
    """Once a ``Searcher`` exists (a web worker: encoder thread pools started, other threads in the tokenizer),
    neither cutting nor a build's lexical files fork: they run here and give the same result."""
    from qa_service import chunking, store
    from qa_service.config import Settings
    from qa_service.retrieval import Searcher

    pools = []
    real_pool = chunking.fork_pool
    monkeypatch.setattr(chunking, "fork_pool", lambda n: pools.append(n) or real_pool(n))
    monkeypatch.setattr(chunking, "cores", lambda: 2)
    monkeypatch.setattr(store, "LEXICAL_PARALLEL_MIN", 1)  # the seeds stand in for a large archive
    articles = list(seed_articles) * 8
    assert chunking.can_fork()
    forked = chunking.split_articles(articles, count, 60, 1, processes=2)
    forked_build = Settings(index_dir=tmp_path / "forked", model="fake-hash-64")
    store.build_index(seed_articles, FakeEmbedder(), forked_build)
    assert len(pools) == 2  # a fresh process (a build, the CLI) forks for both
    pools.clear()

    Searcher(fake_index, embedder=FakeEmbedder())
    assert not chunking.can_fork()
    assert chunking.split_articles(articles, count, 60, 1, processes=2) == forked
    here = Settings(index_dir=tmp_path / "here", model="fake-hash-64")
    store.build_index(seed_articles, FakeEmbedder(), here)
    assert pools == [], "a process that answers questions forked"
    with pytest.raises(RuntimeError, match="may not fork"):
        real_pool(2)
    question = "Gaza ceasefire"
    assert [h.citation.start for h in Searcher(here, embedder=FakeEmbedder()).search(question, mode="lexical")] == \
        [h.citation.start for h in Searcher(forked_build, embedder=FakeEmbedder()).search(question, mode="lexical")]


def test_cutting_on_workers_returns_in_a_process_that_only_notes_sigterm(seed_articles):
    """A gunicorn worker's SIGTERM handler only sets a flag; forked workers inherit it. The pool must still end."""
    import subprocess
    import sys
    import textwrap

    from .support.paths import REPO

    script = textwrap.dedent(f"""
        import signal
        from qa_service.chunking import split_article, split_articles
        from qa_service.ingest import load_articles
        signal.signal(signal.SIGTERM, lambda *_: None)
        articles = load_articles({str(REPO / "seeds")!r}).articles * 8
        count = lambda t: len(t.split())
        assert split_articles(articles, count, 60, 1, processes=2) == [split_article(a, count, 60, 1) for a in articles]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _plain_words(text):
    """A counter that splits only at ASCII whitespace: sentences joined by anything else count as one word there."""
    import re

    return len(re.findall(r"[^ \t\n\r]+", text))


@hsettings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=25), max_tokens=st.integers(2, 40),
       overlap=st.integers(0, 2), gaps=st.lists(st.sampled_from([" ", "\n", " \n\n", "\t", "\x1c", "\u00a0", "\u2003"]),
                                                min_size=25, max_size=25))
def test_adding_counts_packs_as_counting_windows_does(lengths, max_tokens, overlap, gaps):
    """``additive``: windows over plain whitespace are measured by the sum of their sentences' counts; a window
    with any other character between its sentences (which a tokenizer may join words across) is counted on its
    text. Either way the windows are the plain rule's."""
    from qa_service.chunking import pack_sentences

    text, spans = "", []
    for n, gap in zip(lengths, gaps):
        if spans:
            text += gap
        sentence = " ".join(["w"] * n) + "."
        spans.append((len(text), len(text) + len(sentence)))
        text += sentence
    spans = [s for s in spans if _plain_words(text[s[0]:s[1]]) <= max_tokens] or spans[:1]
    own = [_plain_words(text[s:e]) for s, e in spans]
    expected = _greedy_windows(text, spans, _plain_words, max_tokens, overlap)
    assert pack_sentences(text, spans, _plain_words, max_tokens, overlap, own, additive=True) == expected


def _shipped_tokenizer_json() -> str:
    from pathlib import Path

    from qa_service.embedding import resolve_model_path

    return (Path(resolve_model_path("all-MiniLM-L6-v2")) / "tokenizer.json").read_text(encoding="utf-8")


def test_only_a_whitespace_splitting_wordpiece_tokenizer_is_taken_to_add_up():
    import json

    from qa_service.embedding import token_counts_add_up

    shipped = _shipped_tokenizer_json()
    assert token_counts_add_up(shipped)
    config = json.loads(shipped)

    def changed(path, value):
        c = json.loads(shipped)
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return json.dumps(c)

    assert not token_counts_add_up(changed(["pre_tokenizer"], {"type": "Metaspace", "replacement": "▁"}))
    assert not token_counts_add_up(changed(["pre_tokenizer"], {"type": "ByteLevel"}))
    assert not token_counts_add_up(changed(["model", "type"], "BPE"))
    assert not token_counts_add_up(changed(["normalizer"], {"type": "Sequence", "normalizers": []}))
    assert not token_counts_add_up(changed(["added_tokens"], config["added_tokens"] + [{"content": "New York"}]))
    assert not token_counts_add_up("not json")
    assert token_counts_add_up(changed(["normalizer"], None))


def test_with_the_shipped_tokenizer_adding_counts_cuts_exactly_as_counting(seed_articles):
    """The shipped tokenizer adds up; cutting the seeds, and texts with odd characters between sentences, gives
    the same units and windows with sentence counts added as with every window counted."""
    from tokenizers import Tokenizer

    from qa_service.chunking import split_article

    tok = Tokenizer.from_str(_shipped_tokenizer_json())
    tok.no_truncation()
    tok.no_padding()

    def real_count(text):
        return len(tok.encode(text, add_special_tokens=False).ids)

    odd = ("Prices rose in Doha.\x1cTalks went on.\u00a0Hamas said no. \u2003Qatar said yes!"
           "Then they met;\x0bagain.\r\nIt’s “done”. Über-café sales fell 3.5%. 東京 talks. [MASK] it.")
    articles = list(seed_articles) + [Article("odd", "odd.txt", None, None, odd * 3)]
    for max_tokens in (126, 40, 12):
        for article in articles:
            assert split_article(article, real_count, max_tokens, 1, additive=True) == \
                split_article(article, real_count, max_tokens, 1)


def test_embedders_say_whether_their_counts_add_up(real_embedder):
    from qa_service.evaluation import whole_document_embedder

    assert real_embedder.counts_add_up is True
    assert whole_document_embedder(real_embedder).counts_add_up is False  # clipped counts do not add up
    assert real_embedder.counts_add_up is True


@hsettings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.sampled_from([" ", "  ", "\n", "\t", "\x1c", "\u00a0", "\u2003"]), min_size=1, max_size=60),
       max_tokens=st.integers(1, 12))
def test_adding_counts_cuts_over_long_sentences_as_counting_pieces_does(gaps, max_tokens):
    """An over-long sentence is cut word by word; with ``additive`` each word is counted once and a piece is the sum
    of its words where only plain whitespace separates them: the same pieces and counts as counting each piece."""
    from qa_service.chunking import counted_units

    text = "".join(f"w{i}{gap}" for i, gap in enumerate(gaps)) + "end"
    assert counted_units(text, _plain_words, max_tokens, additive=True) == counted_units(text, _plain_words, max_tokens)
