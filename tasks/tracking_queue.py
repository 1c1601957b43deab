"""The tracking queue: a stage never waits on its MLflow server.

With a tracking server (an http(s) URI) every record a stage makes — metrics, params and tags
(ours, the TRL callback's and the system metrics'), its tables, the run's end — is appended to
a spool file, `.rlhf/tracking/<stage>-<time>-<pid>.jsonl`, and one sender thread delivers them
in order. MLflow's own asynchronous logging is the way in (`MLFLOW_ENABLE_ASYNC_LOGGING`; its
queue on the store is replaced by this one) but not the queue: MLflow's drops a batch once its
HTTP retries are spent, and delivers out of order. While the server is away the sender warns
once and retries the same record every `RETRY_S`; memory holds one record, the file the rest,
so an outage may last as long as the disk allows. When the run ends, the stage waits up to
`$RLHF_TRACKING_WAIT_S` seconds (default 30) for the sender; what is still unsent stays in the
spool file, which `rlhf replay <file>` delivers later. Each attempt is kept short with MLflow's
own `MLFLOW_HTTP_REQUEST_*` settings (a value of the user's is kept).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.async_logging.async_logging_queue import AsyncLoggingQueue
from mlflow.utils.async_logging.run_operations import RunOperations

from tasks.stages import state_dir

log = logging.getLogger(__name__)

WAIT_ENV = "RLHF_TRACKING_WAIT_S"
RETRY_S = 2.0
QUIET = {"send_to_api": False}  # the sender's own lines: no flow run of Prefect's to go to
SHORT_HTTP = {  # an attempt fails in seconds; the queue retries, not each request
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # it reads the run back, at its end
}


class TrackingQueue(AsyncLoggingQueue):
    """MLflow's async-logging queue interface over a spool file and one sender thread."""

    def __init__(self, store: Any, uri: str, path: Path) -> None:  # not MLflow's threads
        self.store, self.uri, self.path = store, uri, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = path.open("a")
        self._writer.write(json.dumps({"op": "store", "uri": uri}) + "\n")
        self._writer.flush()
        self._reader = path.open()
        self._reader.readline()  # the header
        self._unsent_at = self._reader.tell()
        self._done = threading.Condition()
        self._stop = threading.Event()
        self.written = self.sent = 0
        self.away_since: float | None = None
        self._sender = threading.Thread(target=self._send_all, name="rlhf-tracking", daemon=True)
        self._sender.start()

    # What MLflow's store calls: always active; its flushes wait only for a server that answers.
    def is_active(self) -> bool:
        return True

    def is_idle(self) -> bool:
        return False

    def activate(self) -> None:
        pass

    def end_async_logging(self) -> None:
        pass

    def shut_down_async_logging(self) -> None:
        pass  # set_terminated calls it before update_run_info, where the queue closes

    def flush(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self.sent == self.written or self.away_since is not None)

    def log_batch_async(
        self, run_id: str, params: list[Param], tags: list[RunTag], metrics: list[Metric]
    ) -> RunOperations:
        self.put(
            {
                "op": "batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params],
                "tags": [[t.key, t.value] for t in tags],
            }
        )
        done: Future[None] = Future()
        done.set_result(None)
        return RunOperations(operation_futures=[done])

    def update_run_info(
        self, run_id: str, run_status: int, end_time: int | None, run_name: str | None
    ) -> None:
        """The store's method while the queue is installed: the run's status goes in order
        after its records; a final status closes the queue."""
        status = RunStatus.to_string(run_status)
        self.put({"op": "run", "run_id": run_id, "status": status, "end_time": end_time})
        if RunStatus.is_terminated(run_status):
            self.close()

    def put(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str)
        with self._done:
            self._writer.write(line + "\n")
            self._writer.flush()
            self.written += 1
            self._done.notify_all()

    def _send_all(self) -> None:
        while True:
            with self._done:
                self._done.wait_for(lambda: self.sent < self.written or self._stop.is_set())
                if self._stop.is_set():  # closed: the rest stays in the file
                    return
                record = json.loads(self._reader.readline())
            while not self._attempt(record):
                if self._stop.wait(RETRY_S):
                    return
            with self._done:
                self.sent += 1
                self._unsent_at = self._reader.tell()  # where a rewrite of the file starts
                self._done.notify_all()

    def _attempt(self, record: dict[str, Any]) -> bool:
        """Deliver `record`: True when it is delivered (or refused for good), False while the
        server is away."""
        try:
            deliver(self.store, record)
        except Exception as exc:
            if refused(exc):
                log.warning(
                    "MLflow refused a %s record (%s); skipped", record["op"], exc, extra=QUIET
                )
                return True
            if self.away_since is None:
                self.away_since = time.time()
                log.warning(
                    "MLflow server %s unreachable since %s: training goes on; its records wait "
                    "in %s",
                    self.uri,
                    time.strftime("%H:%M:%S", time.localtime(self.away_since)),
                    self.path,
                    extra=QUIET,
                )
            return False
        if self.away_since is not None:
            log.info("MLflow server back after %.0f s", time.time() - self.away_since, extra=QUIET)
            self.away_since = None
        return True

    def close(self) -> int:
        """Wait up to $RLHF_TRACKING_WAIT_S for the sender, then stop it; what is unsent stays
        in the spool file (nothing left: the file goes). How many records are unsent."""
        wait_s = float(os.environ.get(WAIT_ENV, "30"))
        with self._done:
            self._done.wait_for(lambda: self.sent == self.written, timeout=wait_s)
        self._stop.set()
        with self._done:
            self._done.notify_all()
        self._sender.join(timeout=30)  # an attempt in flight: a few seconds (SHORT_HTTP)
        uninstall(self.store)
        self._writer.close()
        with self._done:
            unsent = self.written - self.sent
            self._reader.seek(self._unsent_at)
            rest = self._reader.read() if unsent else ""
        self._reader.close()
        if not unsent:
            self.path.unlink(missing_ok=True)
            return 0
        header = json.dumps({"op": "store", "uri": self.uri})
        temp = self.path.with_suffix(".tmp")
        temp.write_text(header + "\n" + rest)
        temp.replace(self.path)
        log.warning(
            "%d MLflow records unsent (the server %s does not answer); kept in %s; to deliver "
            "them: rlhf replay %s",
            unsent,
            self.uri,
            self.path,
            self.path,
        )
        return unsent


def install(uri: str, stage: str) -> TrackingQueue | None:
    """Route the stage's records through a TrackingQueue when `uri` is a server."""
    if not uri.startswith(("http://", "https://")):
        return None
    for name, value in SHORT_HTTP.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store(uri)  # MLflow's one store per URI, which every client of it uses
    name = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
    queue = TrackingQueue(
        store, uri, state_dir() / "tracking" / name
    )  # the project's, not a copy's
    store._async_logging_queue = queue
    store.update_run_info = queue.update_run_info
    logging.getLogger("urllib3.connectionpool").addFilter(_retries)  # the queue's warning says it
    mlflow.config.enable_async_logging(True)
    return queue


def _retries(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Retrying")


def uninstall(store: Any) -> None:
    """MLflow's own queue and methods again, and synchronous logging."""
    mlflow.config.enable_async_logging(False)
    logging.getLogger("urllib3.connectionpool").removeFilter(_retries)
    store.__dict__.pop("update_run_info", None)
    store._async_logging_queue = AsyncLoggingQueue(logging_func=store.log_batch)


def installed() -> TrackingQueue | None:
    from mlflow.tracking._tracking_service.utils import _get_store

    queue = getattr(_get_store(), "_async_logging_queue", None)
    return queue if isinstance(queue, TrackingQueue) else None


def log_table(data: dict[str, list[Any]], artifact_file: str) -> None:
    """`mlflow.log_table` on the active run, through the queue if one is installed."""
    if (queue := installed()) is None:
        mlflow.log_table(data, artifact_file)
        return
    run_id = mlflow.active_run().info.run_id
    queue.put({"op": "table", "run_id": run_id, "data": data, "file": artifact_file})


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """`mlflow.log_dict` on the active run, through the queue if one is installed."""
    if (queue := installed()) is None:
        mlflow.log_dict(data, artifact_file)
        return
    run_id = mlflow.active_run().info.run_id
    queue.put({"op": "dict", "run_id": run_id, "data": data, "file": artifact_file})


def deliver(store: Any, record: dict[str, Any]) -> None:
    """Send one spooled record through MLflow (the store's own, synchronous methods)."""
    run_id, op = record["run_id"], record["op"]
    if op == "batch":
        metrics = [
            Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]
        ]
        params = [Param(key, value) for key, value in record["params"]]
        tags = [RunTag(key, value) for key, value in record["tags"]]
        type(store).log_batch(store, run_id, metrics, params, tags)
    elif op == "run":
        status = RunStatus.from_string(record["status"])
        type(store).update_run_info(store, run_id, status, record["end_time"], None)
    elif op == "table":
        mlflow.MlflowClient(store_uri(store)).log_table(run_id, record["data"], record["file"])
    elif op == "dict":
        mlflow.MlflowClient(store_uri(store)).log_dict(run_id, record["data"], record["file"])


def store_uri(store: Any) -> str:
    return store.get_host_creds().host


def refused(exc: Exception) -> bool:
    """The server answered and said no (a 4xx): sending it again would not help."""
    return isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500


def replay(path: Path) -> tuple[int, int]:
    """Deliver a spool file left by a stage, in order; what is still unsent stays in it (the
    file goes once everything is delivered). (delivered, left)."""
    from mlflow.tracking._tracking_service.utils import _get_store

    lines = path.read_text().splitlines()
    header, records = lines[0], lines[1:]
    store = _get_store(json.loads(header)["uri"])
    for done, line in enumerate(records):
        try:
            deliver(store, json.loads(line))
        except Exception as exc:
            if refused(exc):
                log.warning("MLflow refused a record (%s); skipped", exc)
                continue
            path.write_text("\n".join([header, *records[done:]]) + "\n")
            return done, len(records) - done
    path.unlink()
    return len(records), 0


def command(path: Path) -> int:
    """`rlhf replay FILE`: deliver it, say what happened."""
    from tasks.errors import MissingInput, UserError

    if not path.is_file():
        raise MissingInput(f"{path}: no such spool file (delivered already?)")
    sent, left = replay(path)
    if left:
        raise UserError(
            f"{path}: {sent} records delivered, {left} left: the MLflow server does not "
            "answer; run this again once it does"
        )
    print(f"rlhf: {sent} MLflow records delivered; {path} removed")
    return 0
