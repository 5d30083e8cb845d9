"""Expected failures: each maps to an exit code and a one-line message, never a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on. The message names the problem and what to do."""

    exit_code = 1


class ConfigError(PipelineError):
    """Bad usage or an invalid config value."""

    exit_code = 2


class StorageError(PipelineError):
    """The object store cannot be reached or refused a request."""


class DataError(PipelineError):
    """The dataset is missing, malformed or does not decode."""


class IntegrityError(DataError):
    """A stored object does not match its recorded sha256."""
