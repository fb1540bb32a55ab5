"""Fakes, live servers and small apps shared by the tests."""
