"""Retrieval: index backends behind one ``Searcher``."""

from .searcher import Searcher

__all__ = ["Searcher"]
