"""The errors an evaluation raises, each with the code the CLI and the API report."""

from __future__ import annotations

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
