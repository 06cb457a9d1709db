"""The errors that end a run with one line, `prog: error: message`, instead of a traceback.

Each script catches these around its `train()` and hands the message to `training.fail`. They
live here, beneath every other module, so that any module may raise them without importing the
module that usually does (no import cycles). `replacing` is here for the same reason: it is the
one way a file of a run is written atomically, and it turns a failed write into `WriteError` or
`CheckpointError`.
"""
from __future__ import annotations

import contextlib
import os
import re


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


class WriteError(OSError):
    """A file of a run could not be written (disk full, a read-only folder): "path: could not
    write it (cause)". Its temporary file is removed, so a file it was to replace stays whole."""


class NonFiniteError(RuntimeError):
    """A loss, reward or gradient became NaN or inf; the run stops, the last checkpoint stays."""


@contextlib.contextmanager
def replacing(path: str, error: type = WriteError, note: str = ""):
    """Write `path` atomically: the body writes the temporary file this yields (beside `path`, so
    the rename cannot cross file systems), which then replaces `path`. If anything fails the
    temporary file is removed and `path` is left as it was; a failed write (OSError, or the
    RuntimeError torch.save raises on a full disk) becomes `error`, one line naming `path` and
    the cause, with `note` after it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, WriteError):
            raise error(f"{path}: could not write it ({write_failure(e)}){note}") from None
        raise


def write_failure(e: BaseException) -> str:
    """What stopped a write, in a few words: the system's reason ("No space left on device"), or
    the first line of torch.save's message without its "[enforce fail at ...]" prefix."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)[:160] or type(e).__name__
