"""qa-service: semantic retrieval question answering over news articles, with exact citations."""

__version__ = "0.1.0"

__all__ = ["Settings", "Searcher", "build_index", "load_articles", "__version__"]


def __getattr__(name):  # lazy: importing the package must not load faiss, numpy or torch
    if name == "Settings":
        from .config import Settings

        return Settings
    if name == "Searcher":
        from .retrieval.searcher import Searcher

        return Searcher
    if name == "build_index":
        from .store import build_index

        return build_index
    if name == "load_articles":
        from .ingest import load_articles

        return load_articles
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
