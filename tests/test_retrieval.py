"""Hybrid retrieval: modes, filters before ranking, spelling variants, dates, answer sentences, grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qa_service.config import Settings
from qa_service.errors import InvalidRequest
from qa_service.retrieval import fusion
from qa_service.retrieval.dates import _MONTHS, date_preference, question_period
from qa_service.retrieval.lexical import (LexicalIndex, TOP_BLOCK, Vocabulary, analyze, background_idfs, blended_idf,
                                          corpus_idf, top_positive, translit_key, words)
from qa_service.types import Filters


def test_rrf_and_convex_fusion_by_hand():
    dense = np.array([0.9, 0.5, 0.1])
    lexical = np.array([0.0, 4.0, 2.0])
    rrf = fusion.reciprocal_rank_fusion([dense, lexical], [1.0, 1.0], k=60,
                                        present=[np.ones(3, bool), lexical > 0])
    assert rrf == pytest.approx([1 / 61, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    assert fusion.convex_fusion(dense, lexical / lexical.max(), 0.5) == pytest.approx([0.45, 0.75, 0.30])
    assert fusion.convex_fusion(dense, np.zeros(3), 0.5) == pytest.approx(dense * 0.5)


def _top_by_sorting(scores, k):
    positive = np.flatnonzero(scores > 0)
    return positive[np.lexsort((positive, -scores[positive]))][:k]


@pytest.mark.parametrize("kind", ["distinct", "ties", "sparse", "zeros", "negative"])
def test_top_positive_is_exact_against_a_full_sort(kind):
    """The block-maximum bound may only skip texts that cannot be in the top k; ties at the k-th score are broken
    by id, whatever path (small arrays sort all positives, large ones only those above the bound)."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(0, 40 * TOP_BLOCK))
        k = int(rng.integers(1, 60))
        if kind == "distinct":
            scores = rng.random(n, dtype=np.float32)
        elif kind == "ties":
            scores = np.round(rng.random(n) * 4).astype(np.float32)
        elif kind == "sparse":
            scores = np.where(rng.random(n) < 0.01, rng.random(n), 0).astype(np.float32)
        elif kind == "zeros":
            scores = np.zeros(n, dtype=np.float32)
        else:
            scores = (rng.random(n) - 0.7).astype(np.float32)
        got = top_positive(scores, k)
        assert got.dtype == np.int64
        assert np.array_equal(got, _top_by_sorting(scores, k))
    assert len(top_positive(np.ones(10, dtype=np.float32), 0)) == 0


def test_best_of_runs_is_each_maximum():
    from qa_service.retrieval.searcher import best_of_runs

    rng = np.random.default_rng(3)
    runs = [rng.normal(size=n).astype(np.float32) for n in (3, 0, 1, 5, 0, 0, 2)] + [np.zeros(0, np.float32)]
    best = best_of_runs(runs)
    assert best.dtype == np.float32 and best.tolist() == [r.max() if len(r) else 0.0 for r in runs]
    assert best_of_runs([]).shape == (0,) and best_of_runs([np.zeros(0, np.float32)]).tolist() == [0.0]
    assert best_of_runs([np.array([-0.5, -0.2], np.float32)]).tolist() == [np.float32(-0.2)]


def test_lexical_search_ranks_by_bm25_with_a_filter():
    texts = [f"filler words {i} about nothing" for i in range(2000)] + ["ceasefire talks in Doha"] * 3
    index = LexicalIndex.build(texts)
    scores, ids = index.search("ceasefire talks", 5)
    assert ids.tolist() == [2000, 2001, 2002] and np.all(scores > 0)
    scores, ids = index.search("ceasefire talks", 5, allowed=np.array([5, 2001, 2002]))
    assert ids.tolist() == [2001, 2002]


def test_background_idf_lifts_names_over_words_a_small_index_happens_to_hold_rarely():
    """Five news articles name Haniyeh in most passages and say "met" once: plain BM25 then ranks a passage that
    met someone in Doha above one where Haniyeh received someone in Doha. English frequencies put that right."""
    texts = (["Haniyeh received the foreign minister in Doha."]
             + [f"Haniyeh spoke about the war, statement {i}." for i in range(6)]
             + ["Al-Hayya met the foreign minister in Doha.", "The ceasefire talks went on."])
    index = LexicalIndex.build(texts)
    question = "Who met Haniyeh in Doha?"
    plain, blended = index.scores(question), index.scores(question, background_docs=1000)
    assert np.argmax(plain) == 7 and np.argmax(blended) == 0
    assert np.array_equal(index.scores(question, background_docs=0), plain)

    # By hand: each term's BM25 column, scaled by its blended idf over its corpus idf.
    background = background_idfs(question)
    assert set(background) == set(analyze(question)) == {"who", "met", "haniyeh", "doha"}
    assert background["haniyeh"] > background["doha"] > background["met"]  # rarer in English, higher
    expected = np.zeros(len(texts))
    for term in analyze(question):
        df = sum(term in analyze(t) for t in texts)
        idf = corpus_idf(df, len(texts))
        expected += index.scores(term) * blended_idf(idf, background[term], len(texts), 1000) / idf
    np.testing.assert_allclose(blended, expected, rtol=1e-5)


def test_blended_idf_leaves_a_large_index_and_an_unknown_term_alone():
    assert blended_idf(2.0, 10.0, n=9, background_docs=1000) == pytest.approx((9 * 2 + 1000 * 10) / 1009)
    assert blended_idf(2.0, 10.0, n=10_000_000, background_docs=1000) == pytest.approx(2.0, abs=1e-3)
    assert blended_idf(2.0, None, n=9, background_docs=1000) == 2.0
    assert blended_idf(2.0, 10.0, n=9, background_docs=0) == 2.0


def test_hybrid_blends_idf_and_lexical_mode_stays_plain_bm25(fake_searcher):
    backend = fake_searcher.backend
    question = "Who met Haniyeh in Doha?"
    qvec = fake_searcher.encode_questions([question])[0]
    with backend.snapshot():
        hybrid = backend.candidates(qvec, question, 50, "hybrid", None, True, (0.3, 0.2), 1000)
        plain = backend.candidates(qvec, question, 50, "hybrid", None, True, (0.3, 0.2), 0)
        lexical = backend.candidates(qvec, question, 50, "lexical", None, False, (0.3, 0.2), 1000)
        everything = backend.lexical.scores(question)
    assert np.array_equal(plain.lexical, everything[plain.pids])
    assert np.array_equal(lexical.lexical, everything[lexical.pids])
    blended = backend.lexical.scores(question, 1000)
    assert np.array_equal(hybrid.lexical, blended[hybrid.pids]) and not np.allclose(blended, everything)
    assert not np.allclose(hybrid.lexical_mix, plain.lexical_mix[np.searchsorted(plain.pids, hybrid.pids)])


def test_a_window_that_says_he_is_found_by_the_name_its_lead_gives_him(tmp_path, fake_embedder):
    """An article without a headline names its subject in the lead; a later window says only "He stressed ...".
    BM25 reads every window with its article's lead, so the name finds that window over an equal one elsewhere."""
    from qa_service.retrieval import Searcher
    from qa_service.store import build_index
    from qa_service.types import Article

    filler = " ".join(f"Paragraph {i} describes the long meeting and its many guests." for i in range(4))
    named = Article("a", "a.txt", None, None, "Foreign Minister Abbas Araghchi met the delegation in Doha. "
                    f"{filler} He stressed again and again that the leaders must be prosecuted.", "h1")
    other = Article("b", "b.txt", None, None, "A court in The Hague heard the case on Monday. "
                    f"{filler} Judges stressed that the leaders must be prosecuted.", "h2")
    settings = Settings(index_dir=tmp_path / "index", model=fake_embedder.name, max_tokens=24, overlap_sentences=0)
    build_index([named, other], fake_embedder, settings)
    searcher = Searcher(settings, embedder=fake_embedder)
    hits = searcher.search("Did Araghchi say the leaders must be prosecuted?", k=3, mode="lexical", group=False)
    assert hits[0].citation.article_id == "a" and "He stressed" in hits[0].text
    assert "Araghchi" not in hits[0].text  # found through its lead, not its own words
    assert hits[0].text == named.text[hits[0].citation.start:hits[0].citation.end]


def test_lexical_analysis_folds_quotes_and_numbers():
    assert words("Iran’s 47,400 Palestinians") == ["iran", "47400", "palestinians"]
    assert analyze("Iran’s") == analyze("Iran's") == ["iran"]
    assert translit_key("Araqchi") == translit_key("Araghchi")
    assert translit_key("Haniya") == translit_key("Haniyeh")
    assert translit_key("al-Hayyah") == translit_key("al-Hayya")


@pytest.fixture(scope="module")
def model_words():
    """The words the shipped model's tokenizer holds whole: what ``Searcher.prepare`` passes as ``known``."""
    from tokenizers import Tokenizer

    from qa_service.embedding import resolve_model_path, whole_words

    return whole_words(Tokenizer.from_file(str(Path(resolve_model_path("all-MiniLM-L6-v2")) / "tokenizer.json"))
                       .get_vocab())


@pytest.mark.parametrize("with_known", [False, True])
@pytest.mark.parametrize("variant,indexed", [
    ("Araqchi", "araghchi"), ("Pezeshkiyan", "pezeshkian"), ("Haniya", "haniyeh"), ("al-Hayyah", "al-hayya"),
    ("Galant", "gallant"), ("Binyamin", "benjamin"),
])
def test_name_variants_found_in_vocabulary(seed_articles, model_words, with_known, variant, indexed):
    vocab = Vocabulary.from_texts(a.text for a in seed_articles)
    _corrected, found = vocab.correct(f"What did {variant} say?", model_words if with_known else frozenset())
    assert indexed in found[variant]


def test_words_of_the_language_are_not_corrected_into_other_words(seed_articles, model_words):
    vocab = Vocabulary.from_texts(a.text for a in seed_articles)
    question = "Apart from multilateral forums, what other diplomatic channel did Bagheri Kani use?"
    # Neither word is in the articles; close indexed words exist ("forms", "diplomacy").
    assert vocab.correct(question)[1] == {"forums": ["forms"], "diplomatic": ["diplomacy"]}
    assert vocab.correct(question, model_words) == (question, {})
    # a misspelling the model does not know as a word is still corrected
    assert vocab.correct("Who is Binyamin?", model_words)[0] == "Who is Benjamin?"


def test_whole_words_of_wordpiece_sentencepiece_and_bpe_vocabularies():
    from qa_service.embedding import whole_words

    tokens = ["[CLS]", "##ums", "forums", "Diplomatic", "\u2581channel", "\u0120meeting", "<s>", "a", "2024", "don't"]
    assert whole_words(tokens) == {"forums", "diplomatic", "channel", "meeting"}


def test_searcher_passes_the_model_words_to_the_spelling_correction(fake_searcher):
    question = "Which multilateral forums did Kani attend?"
    assert fake_searcher.prepare(question)[0] != question  # the fake model knows no words: "forums" -> "forms"
    fake_searcher.embedder.known_words = frozenset({"forums"})
    fake_searcher._prepared = None
    try:
        assert fake_searcher.prepare(question) == (question, question)
    finally:
        del fake_searcher.embedder.known_words
        fake_searcher._prepared = None


def test_variant_spelling_finds_the_other_spelling(fake_searcher):
    for question, expected_word in [("Araqchi statement", "Araghchi"), ("Ismail Haniya bureau", "Haniyeh"),
                                    ("Pezeshkiyan remark", "Pezeshkian"), ("Khalil al-Hayyah", "al-Hayya")]:
        hits = fake_searcher.search(question, k=5, mode="lexical")
        assert any(expected_word in h.text for h in hits), question


def test_modes_and_unknown_mode(fake_searcher):
    for mode in ("dense", "lexical", "hybrid"):
        hits = fake_searcher.search("ceasefire prisoner exchange", k=3, mode=mode)
        assert hits and [h.rank for h in hits] == list(range(1, len(hits) + 1))
    with pytest.raises(InvalidRequest) as err:
        fake_searcher.search("x", mode="magic")
    assert err.value.code == "invalid_mode"


def test_filters_apply_before_ranking(fake_searcher):
    only = "003_ef52944349a1f149"
    for mode in ("dense", "lexical", "hybrid"):
        hits = fake_searcher.search("Araghchi Doha meeting", k=5, filters=Filters(sources=(only,)), mode=mode)
        assert hits, mode  # filtering first still fills results from the allowed article
        assert {h.citation.article_id for h in hits} == {only}
    by_name = fake_searcher.search("Gaza", k=5, filters=Filters(sources=("002_043a94255de812b2.txt",)))
    assert {h.citation.article_id for h in by_name} == {"002_043a94255de812b2"}
    dated = fake_searcher.search("Gaza ceasefire", k=10, filters=Filters(date_from="2025-01-01", date_to="2025-01-31"))
    assert dated and {h.citation.date for h in dated} == {"2025-01-31"}
    assert fake_searcher.search("Gaza", k=5, filters=Filters(date_from="2030-01-01")) == []
    with pytest.raises(InvalidRequest) as err:
        fake_searcher.search("Gaza", filters=Filters(sources=("nope",)))
    assert err.value.code == "unknown_source"


def test_question_periods():
    assert (str(question_period("What happened in June 2024?"))
            == "(datetime.date(2024, 6, 1), datetime.date(2024, 6, 30))")
    lo, hi = question_period("talks in late January 2025")
    assert (lo.isoformat(), hi.isoformat()) == ("2025-01-20", "2025-01-31")
    assert question_period("during 2023 the war") is not None
    assert question_period("What did Pezeshkian say?") is None
    pref = date_preference("in late January 2025", ["2025-01-31", "2025-02-09", "2024-06-20", None])
    assert pref[0] == 1.0 and 0.5 < pref[1] < 1.0 and pref[2] == 0.0 and pref[3] == 0.5


def test_a_year_the_calendar_lacks_names_no_period_and_never_raises():
    assert question_period("What happened in January 0000?") is None
    assert question_period("January 0000 and then March 2024").__repr__().startswith("(datetime.date(2024, 3, 1)")
    assert date_preference("What happened in late Feb 0000?", ["2024-02-01"]) is None


@given(st.sampled_from(["in", "early", "mid", "late", "during", "of"]), st.sampled_from(sorted(_MONTHS)),
       st.integers(0, 9999), st.sampled_from(["", ".", ",", "?"]))
def test_every_month_and_four_digit_year_reads_without_error(word, month, year, tail):
    period = question_period(f"What happened {word} {month} {year:04d}{tail}")
    assert period is None or period[0] <= period[1]


def test_date_in_question_prefers_that_time(fake_searcher):
    june = fake_searcher.search("Hamas and Iran's foreign minister meeting in June 2024", k=3)
    assert june[0].citation.date == "2024-06-20"


def test_answer_sentence_is_exact_and_inside_the_passage(fake_searcher, seed_articles):
    texts = {a.id: a.text for a in seed_articles}
    for q in ["bilateral meetings with foreign ministers", "death toll women children", "JCPOA renewal October 9"]:
        for hit in fake_searcher.search(q, k=5):
            a = hit.extra["answer"]
            c = hit.citation
            assert c.start <= a["start"] < a["end"] <= c.end
            assert texts[c.article_id][a["start"]:a["end"]] == a["text"]
            for other in hit.extra["also_reported_by"]:
                assert texts[other["article_id"]][other["start"]:other["end"]] == other["text"]
                oa = other["answer"]
                assert texts[other["article_id"]][oa["start"]:oa["end"]] == oa["text"]


def test_no_overlapping_windows_of_one_article(fake_searcher):
    for q in ["Gaza", "Hamas Iran foreign minister", "ceasefire"]:
        hits = fake_searcher.search(q, k=10)
        for i, a in enumerate(hits):
            for b in hits[i + 1:]:
                if a.citation.article_id == b.citation.article_id:
                    assert a.citation.end <= b.citation.start or b.citation.end <= a.citation.start


def test_ask_structure(fake_searcher):
    result = fake_searcher.ask("Who met in Doha?", k=3)
    assert set(result) >= {"question", "mode", "answerable", "results", "took_ms"}
    assert isinstance(result["answerable"], bool)
    for r in result["results"]:
        assert set(r) >= {"rank", "score", "text", "citation", "answer", "also_reported_by"}


def test_question_preparation_is_remembered_per_vocabulary(fake_searcher, monkeypatch):
    """One answer prepares its question once, not three times; a new vocabulary (a reload) prepares again."""
    import copy

    vocabulary = fake_searcher.vocabulary
    calls = []
    correct = type(vocabulary).correct

    def counting(self, question, known=frozenset()):
        calls.append(question)
        return correct(self, question, known)

    monkeypatch.setattr(type(vocabulary), "correct", counting)
    question = "What did Araqchi say to the Hamas delegation about a ceasefire?"
    fake_searcher._prepared = None
    fake_searcher.ask(question)
    assert calls == [question]
    remembered = fake_searcher.prepare(question)
    assert calls == [question]
    fake_searcher._prepared = None  # forgotten: computed afresh, and the same
    assert fake_searcher.prepare(question) == remembered and calls == [question, question]
    reloaded = copy.copy(vocabulary)
    monkeypatch.setattr(type(fake_searcher.backend), "vocabulary", property(lambda self: reloaded))
    fake_searcher.prepare(question)
    assert calls == [question, question, question]


@pytest.mark.parametrize("text, blank", [
    ("", True), ("  \n\t", True), ("\u00a0", True), ("\u200b\ufeff\u2060", True),
    ("x", False), ("\u200bx", False), ("می\u200cخواهم", False), ("?", False),
])
def test_is_blank_sees_invisible_characters(text, blank):
    from qa_service.types import is_blank

    assert is_blank(text) is blank
