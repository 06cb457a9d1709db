"""The errors that end a run with one line, `prog: error: message`, instead of a traceback.

Each script catches these around its `train()` and hands the message to `training.fail`. They
live here, beneath every other module, so that any module may raise them without importing the
module that usually does (no import cycles).
"""
from __future__ import annotations


class DataError(ValueError):
    """A data file is missing or malformed; the message is one line: "path:line: problem"."""

    def __init__(self, path: str, problem: str, lineno: int | None = None):
        self.path, self.problem, self.lineno = path, problem, lineno
        where = f"{path}:{lineno}" if lineno is not None else f"{path}"
        # One line even if a path or a quoted value carries a newline: logs and CI show one line.
        super().__init__(f"{where}: {problem}".replace("\r", "\\r").replace("\n", "\\n"))


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit what was asked of it."""


class TokenizerError(ValueError):
    """A tokenizer could not be trained, loaded or found; the message says which and why."""


class NonFiniteError(RuntimeError):
    """A loss, reward or gradient became NaN or inf; the run stops, the last checkpoint stays."""
