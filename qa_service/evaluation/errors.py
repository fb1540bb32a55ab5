"""The errors an evaluation raises, each with its code, and the import of evaluation-only dependencies."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import QAError


class EvaluationError(QAError):
    code = "evaluation_error"


class DatasetError(EvaluationError):
    """The question file or BEIR folder cannot be read."""

    code = "dataset_invalid"


class UnknownMode(EvaluationError):
    """A retrieval mode the Searcher (or service) does not offer."""

    code = "unknown_mode"


class ServiceError(EvaluationError):
    """The HTTP service could not be reached or answered with an error."""

    code = "service_error"
    status = 502


def import_extra(module: str, package: str, what: str) -> ModuleType:
    """Import an evaluation-only dependency (the ``eval`` extra), or refuse with a sentence saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvaluationError(f"{what} needs {package}, which comes with the eval extra: "
                              "pip install -e '.[eval]'") from None
