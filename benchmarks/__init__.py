"""Benchmarks of qa-service (``qa-service bench``): each figure is printed next to a floor measured in the same run."""
