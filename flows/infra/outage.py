"""A stage outlives its Prefect server: the server only shows the work.

Prefect 3 runs a flow's task runs on the client (their states go out as events, in the
background), so training itself never waits on the API, with two exceptions this module
removes: a task with tags asks the API for a tag-concurrency slot on every run (the stage's
process tag is therefore kept on the flow run only), and the flow run's final state is proposed
with the client's retries (about a minute per call).

`watch(api)` probes the API's /health while the stage runs. Once it stops answering it logs one
warning, then, through Prefect's own settings, stops sending logs to the API and makes the
client fail at once instead of retrying, and quiets the background workers' reports of each
failed send. The stage trains to its end; the flow engine's failure to record the final state
is then ignored (`outcome`), and the next stage marks the flow run Crashed
(`tasks.tracking.crash_dead_flow_runs`), on the server it finds or starts.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

PROBE_S = 2.0  # between two /health probes
MISSES = 2  # probes in a row without an answer: the server is gone
_NOISY = ("prefect.events.clients", "prefect._internal.concurrency", "prefect.client")

lost_since: datetime.datetime | None = None
_finished: list[Any] = []  # the stage body's return value, once it returned


def finished(result: Any) -> Any:
    """Record the stage body's result (the flow engine may fail to report it afterwards)."""
    _finished[:] = [result]
    return result


def untagged_tasks() -> contextlib.AbstractContextManager[Any]:
    """The flow run's tags minus the process tag, for its task runs: a tagged task run takes
    a tag-concurrency slot through the API, every run."""
    from prefect.context import TagsContext

    from tasks.tracking import PROCESS_TAG

    current = TagsContext.get().current_tags
    return TagsContext(current_tags={t for t in current if not t.startswith(PROCESS_TAG)})


@contextlib.contextmanager
def watch(api: str) -> Iterator[None]:
    """Probe `api` while the block runs; see the module docstring."""
    global lost_since
    lost_since, _finished[:] = None, []
    stop = threading.Event()
    thread = threading.Thread(target=_probe, args=(api, stop), name="rlhf-prefect", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _probe(api: str, stop: threading.Event) -> None:
    misses = 0
    while not stop.wait(PROBE_S):
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                misses = 0
        except (OSError, ValueError):
            misses += 1
            if misses >= MISSES:
                _lost()
                return


def _lost() -> None:
    """Warn once and stop depending on the API (Prefect's settings, read at each call)."""
    global lost_since
    from prefect.context import GLOBAL_SETTINGS_CONTEXT

    lost_since = datetime.datetime.now(datetime.UTC)
    for name in _NOISY:
        logging.getLogger(name).addFilter(_drop)
    logging.raiseExceptions = False  # Prefect's log worker then drops a failed batch quietly
    settings = GLOBAL_SETTINGS_CONTEXT.settings
    settings.logging.to_api.enabled = False
    settings.client.max_retries = 0
    log.warning(
        "prefect server unreachable since %s: the stage goes on; its flow run will show "
        "Crashed (the next stage marks it)",
        lost_since.strftime("%H:%M:%S UTC"),
    )


def _drop(record: logging.LogRecord) -> bool:
    return False


def outcome(run: Callable[[], Any]) -> Any:
    """`run()` (the stage's flow); if the API was lost and the stage's body had returned, its
    result in spite of the engine's failure to record the final state."""
    try:
        return run()
    except Exception:
        if lost_since is None or not _finished:
            raise
        return _finished[0]


def drain_s(default: float) -> float:
    """How long to wait for Prefect's logs and events at exit: not at all without a server."""
    return 0.0 if lost_since is not None else default
