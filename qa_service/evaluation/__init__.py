"""Batch evaluation behind ``qa-service eval``: question files or BEIR folders, run, scored with ir-measures, reported.

In-process, question files are judged on every passage of the index ("exact"), over HTTP on the passages any
mode retrieved ("pooled"); BEIR passage hits are reduced to documents (max-passage) and scored against the qrels.
See docs/decisions/evaluation-method.md. The modules: ``datasets`` (inputs), ``beir_index`` (a corpus's own
index), ``relevance``, ``backends`` (Searcher or URL), ``runners``, ``metrics``, ``pipeline`` (``evaluate``),
``report``.
"""

from .backends import Backend, HttpBackend, LocalBackend
from .beir_index import (WHOLE_DOCUMENT_MAX_TOKENS, WHOLE_DOCUMENT_SUFFIX, beir_index_dir, beir_settings_for,
                         ensure_beir_index, retrieval_config, whole_document_embedder)
from .datasets import UNANSWERABLE_KIND, Dataset, Question, beir_articles, load_beir, load_dataset, load_questions
from .errors import DatasetError, EvaluationError, ServiceError, UnknownMode
from .metrics import CURVE_CUTOFFS, CUTOFFS, METRIC_NAMES, build_qrels, per_query_scores, summarize
from .pipeline import default_depth, evaluate
from .relevance import normalize_text, passage_docno, passage_is_relevant
from .report import format_markdown, format_table, plot_recall_curves, summary_json, write_report
from .runners import (BEIR_DEPTH_PER_PASSAGES_PER_DOC, DEFAULT_DEPTH, HTTP_DEPTH, MIN_BEIR_DEPTH, ModeRun,
                      run_mode)

__all__ = [
    "BEIR_DEPTH_PER_PASSAGES_PER_DOC", "CURVE_CUTOFFS", "CUTOFFS", "DEFAULT_DEPTH", "HTTP_DEPTH", "METRIC_NAMES",
    "MIN_BEIR_DEPTH", "UNANSWERABLE_KIND", "WHOLE_DOCUMENT_MAX_TOKENS", "WHOLE_DOCUMENT_SUFFIX", "Backend",
    "Dataset", "DatasetError", "EvaluationError", "HttpBackend", "LocalBackend", "ModeRun", "Question",
    "ServiceError", "UnknownMode", "beir_articles", "beir_index_dir", "beir_settings_for", "build_qrels",
    "default_depth", "ensure_beir_index", "evaluate", "format_markdown", "format_table", "load_beir",
    "load_dataset", "load_questions", "normalize_text", "passage_docno", "passage_is_relevant",
    "per_query_scores", "plot_recall_curves", "retrieval_config", "run_mode", "summarize", "summary_json",
    "whole_document_embedder", "write_report",
]
