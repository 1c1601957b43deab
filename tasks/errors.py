"""The errors a user can fix: each is one line saying where, what is wrong and how to fix it.

`rlhf` prints a `UserError` as `rlhf: error: <message>` and exits 1; any other exception is an
internal error, printed with a hint to rerun with `--debug` for the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (params, data, paths, models, a signal), phrased for them."""


class ParamsError(UserError):
    """A bad params value. Raised while reading the file, the message starts with `file:line:`;
    raised later with `key` (its dotted key), the CLI prefixes the file and line it came from."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(UserError):
    """A bad input example or file, naming file, line and field."""


class MissingInput(UserError):
    """A file or model an upstream stage writes is not there: run that stage."""


class TrainingDiverged(UserError):
    """A non-finite loss, gradient or score: training stopped before it reached the weights."""


class StageFailed(UserError):
    """A deployment run that failed, crashed, was cancelled or timed out."""


class HandoffFailed(UserError):
    """A stage could not move to or from a worker that shares no disk (flows/infra/handoff.py):
    the code is not committed or pushed, the DVC remote is missing or unreachable, an object
    does not match its hash."""


class Terminated(BaseException):
    """SIGTERM arrived (a worker cancelling the run, `docker stop`, `dvc repro` killed). A
    BaseException, like KeyboardInterrupt: no `except Exception` on the way out swallows it.
    Inside a flow Prefect raises its own TerminationSignal first, then re-sends the signal."""


SIGNALLED: list[str] = []  # every SIGTERM that reached the stage, in order


def stop_if_signalled() -> None:
    """Raise Terminated if a SIGTERM arrived. The handler raises where the main thread happens
    to be, and code that runs there (a `__del__`, a weakref callback) prints and drops the
    exception: the stage still stops, at its next step (a TRL callback, PPO's loop)."""
    if SIGNALLED:
        raise Terminated(SIGNALLED[-1])
