"""MLflow: one run per stage, named after it, with lineage tags; summary metrics also to DVC.

The run is opened by the stage's flow and is the active run of its thread, so transformers'
MLflow callback (TRL trainers) logs its per-step metrics into it. An exception inside the run
marks it FAILED (KILLED on Ctrl-C or SIGTERM); a run whose process was killed outright is closed
as KILLED by the stage's next start; a stage that resumes a checkpoint continues its run. No run
is left RUNNING.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import mlflow
import psutil
from mlflow.entities import Experiment
from prefect.exceptions import TerminationSignal

from tasks import tracking_queue
from tasks.catalog import log_datasets
from tasks.config import TrackingConfig
from tasks.errors import SIGNALLED, Terminated
from tasks.io import resumable_run_id, write_json
from tasks.lineage import pipeline_id, upstream_hashes
from tasks.params import Params
from tasks.stages import CHECKPOINTS_DIR, METRICS_DIR, STAGE, project_root

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
DEFAULT_TRACKING_URI = f"{SQLITE}mlflow.db"
END_REASON = "rlhf.end_reason"  # why a run ended KILLED
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's system metrics monitor logs under it
FLOW_RUN_TAG = "rlhf.prefect_flow_run_id"
PROCESS_TAG = "rlhf-process:"  # on a flow run: host/pid/start ms of the `rlhf stage` running it
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"
# A DVC experiment (`dvc exp run`, queued or not) names itself and its baseline commit.
DVC_EXP_TAGS = {"rlhf.dvc_exp": "DVC_EXP_NAME", "rlhf.baseline": "DVC_EXP_BASELINE_REV"}
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "peft",
    "prefect",
    "mlflow",
    "dvc",
)
# Whole key words only: `hf_token` is a secret, `max_new_tokens` is not.
_SECRET = re.compile(
    r"(^|_)(token|secret|password|passwd|api_?key|apikey|credentials?)$", re.IGNORECASE
)


def tracking_uri(cfg: TrackingConfig) -> str:
    """params → $MLFLOW_TRACKING_URI → `mlflow.db` of the project. A relative SQLite path is
    the project's (`project_root`), not the working directory's: an experiment's copy under
    `.dvc/tmp/exps/` would take its runs along when DVC deletes it."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = uri.removeprefix(SQLITE)
    if uri.startswith(SQLITE) and not path.startswith("/"):
        return f"{SQLITE}{project_root().resolve() / path}"
    return uri


def _experiment(uri: str, name: str) -> Experiment:
    """The stage's experiment, created if new. A SQLite store is opened under a file lock: the
    stages of a sweep (`dvc queue start -j N`) start together, and MLflow creates the tables
    of a new database and the experiment without one (`table ... already exists`). Its
    artifacts go to the project's `mlruns/`, not the working directory's (MLflow's default)."""
    local = uri.startswith(SQLITE)
    with (
        open(f"{uri.removeprefix(SQLITE)}.lock", "a") if local else contextlib.nullcontext() as lock
    ):
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released with the file
        client = mlflow.MlflowClient()  # opens the store: creates or upgrades the database
        if not client.get_experiment_by_name(name):
            artifacts = str(project_root().resolve() / "mlruns") if local else None
            client.create_experiment(name, artifact_location=artifacts)
    return mlflow.set_experiment(name)


def is_main_process() -> bool:
    """False in the extra processes of `accelerate launch` (RANK > 0): only rank 0 tracks and
    writes outputs, the others train."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[mlflow.ActiveRun | None]:
    """Open the stage's MLflow run (tags, flattened params) for the duration of the block: the
    run of the checkpoint it resumes from, if any, else a new one. Runs of this stage whose
    process died (`kill -9`, a lost machine) are closed as KILLED first."""
    with _noting_sigterm():
        if not is_main_process():
            yield None
            return
        mlflow.set_tracking_uri(uri := tracking_uri(params.tracking))
        experiment = _experiment(uri, params.tracking.experiment)
        client = mlflow.MlflowClient()
        if experiment.tags.get(EXPERIMENT_KIND) != TRAINING:  # the UI opens on the runs table
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING)
        close_dead_runs(client, experiment.experiment_id, stage)
        crash_dead_flow_runs(stage)
        resumed = _continuable(client, resumable_run_id(CHECKPOINTS_DIR / stage, params, stage))
        tags = run_tags(stage, params) | _process_tags()
        system = params.tracking.system_metrics and STAGE[stage].kind in ("trl", "ppo")
        if system:
            mlflow.set_system_metrics_sampling_interval(params.tracking.system_metrics_interval_s)
        tracking_queue.install(mlflow.get_tracking_uri(), stage)  # a server: never waited on
        with mlflow.start_run(
            run_id=resumed, run_name=stage, tags=tags, log_system_metrics=system
        ) as run:
            sections = {name: getattr(params, name).model_dump() for name in STAGE[stage].sections}
            mlflow.log_params(flatten(sections))  # a resumed run: the same values, a no-op
            if not resumed:
                log_datasets(stage, params)
            prefect_markdown(f"mlflow-run-{stage}", _run_link(stage, run, experiment.experiment_id))
            log.info(
                "MLflow run %s (%s%s) in experiment '%s'",
                run.info.run_id,
                stage,
                ", resumed" if resumed else "",
                params.tracking.experiment,
            )
            try:
                yield run
            except (KeyboardInterrupt, TerminationSignal, Terminated) as exc:  # Ctrl-C, SIGTERM
                # Repeats are ignored while the run is closed, or one would cut the closing short
                # (a second Ctrl-C, or a group SIGTERM followed by one to each process).
                main = threading.current_thread() is threading.main_thread()
                stops = (signal.SIGTERM, signal.SIGINT) if main else ()
                repeats = {signum: signal.signal(signum, signal.SIG_IGN) for signum in stops}
                try:
                    with contextlib.suppress(Exception):  # KILLED matters more than the reason
                        mlflow.set_tag(
                            END_REASON, f"stopped by {_signal_name(exc)}; checkpoints kept"
                        )
                    mlflow.end_run("KILLED")  # MLflow would record FAILED
                finally:
                    for signum, handler in repeats.items():
                        signal.signal(signum, handler)
                raise


@contextlib.contextmanager
def _noting_sigterm() -> Iterator[None]:
    """Record a SIGTERM before the handler in place (Prefect's, inside a flow) raises, so that
    `stop_if_signalled` stops the stage even where library code swallowed the exception; repeats
    are only recorded."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return
    SIGNALLED.clear()

    def note(signum: int, frame: Any) -> None:
        SIGNALLED.append(signal.Signals(signum).name)
        if len(SIGNALLED) == 1:  # a repeat would only interrupt the stopping
            previous(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prefect_markdown(key: str, markdown: str) -> None:
    """A markdown artifact on the current Prefect flow run (its Artifacts tab, and the
    Artifacts page under `key`); nothing outside a flow run."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        create_markdown_artifact(markdown=markdown, key=key.replace("_", "-").lower())
    except Exception as exc:  # a display for people; the stage's outputs do not depend on it
        log.warning("Prefect artifact %s not created (%s: %s)", key, type(exc).__name__, exc)


def _run_link(stage: str, run: mlflow.ActiveRun, experiment_id: str) -> str:
    """Where the stage's MLflow run is, for its Prefect flow run: a link when MLflow is a
    server, else the command that serves the store."""
    uri, page = mlflow.get_tracking_uri(), f"#/experiments/{experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow run of `{stage}`: [{run.info.run_id}]({uri.rstrip('/')}/{page})"
    return (
        f"MLflow run of `{stage}`: `{run.info.run_id}` in `{uri}`. To open it: "
        f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"
    )


def close_dead_runs(client: mlflow.MlflowClient, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `stage` (and their RUNNING child runs) whose process on
    this machine is gone; their ids."""
    query = f"tags.`rlhf.stage` = '{stage}' and attributes.status = 'RUNNING'"
    closed = []
    for run in client.search_runs([experiment_id], query):
        tags = run.data.tags
        if tags.get("rlhf.host") != socket.gethostname() or "rlhf.pid" not in tags:
            continue  # another machine's, or a run of the parent of a child
        if _alive(int(tags["rlhf.pid"]), run.info.start_time):
            continue
        reason = f"its process {tags['rlhf.pid']} died; closed by the next start of {stage}"
        children = client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        for dead in [run, *(c for c in children if c.info.status == "RUNNING")]:
            client.set_tag(dead.info.run_id, END_REASON, reason)
            client.set_terminated(dead.info.run_id, "KILLED")
        log.warning("%s: MLflow run %s was left RUNNING: %s", stage, run.info.run_id, reason)
        closed.append(run.info.run_id)
    return closed


def _continuable(client: mlflow.MlflowClient, run_id: str | None) -> str | None:
    """The checkpoint's run, if this store has it and it is not running (another store's run,
    or a live one: the stage goes on from the checkpoint in a new run)."""
    if run_id is None:
        return None
    try:
        status = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None
    return None if status == "RUNNING" else run_id


def logged_until(run_id: str) -> int:
    """The last training step the run has a metric at (-1 for none): a resumed stage replays
    the steps between its checkpoint and the kill and must not log them twice. MLflow's system
    metrics count their own steps (one per sample), so they are not training steps."""
    client = mlflow.MlflowClient()
    steps = [
        point.step
        for key in client.get_run(run_id).data.metrics
        if not key.startswith(SYSTEM_METRICS_PREFIX)
        for point in client.get_metric_history(run_id, key)
    ]
    return max(steps, default=-1)


def _process_tags() -> dict[str, str]:
    """What the next start needs to tell a dead run from a live one, and its Prefect flow run."""
    from prefect.runtime import flow_run

    tags = {"rlhf.host": socket.gethostname(), "rlhf.pid": str(os.getpid())}
    tags["rlhf.workdir"] = os.getcwd()  # which checkout ran it (a worker's, or this one)
    return tags | ({FLOW_RUN_TAG: str(flow_run.id)} if flow_run.id else {})


def _alive(pid: int, started_ms: int) -> bool:
    """Process `pid` runs and is not a newer process that reuses the number."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and (
            process.create_time() * 1000 <= started_ms + 1000
        )
    except psutil.Error:
        return False


def process_tag() -> str:
    """The Prefect tag `rlhf stage` puts on its flow run: this machine, pid and start time, so
    the next start can tell a dead run from a live one."""
    created = int(psutil.Process().create_time() * 1000)
    return f"{PROCESS_TAG}{socket.gethostname()}/{os.getpid()}/{created}"


def crash_dead_flow_runs(stage: str) -> int:
    """Mark Crashed the flow runs (of any stage) a process of this machine left Running when
    it died (`kill -9`, a killed torchrun rank) or could not end for want of a server: they
    would show Running for ever. How many."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    mine, crashed = f"{PROCESS_TAG}{socket.gethostname()}/", 0
    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    try:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=running)):
                tag = next((t for t in run.tags if t.startswith(mine)), None)
                if tag is None:
                    continue
                _, pid, created = tag.removeprefix(PROCESS_TAG).split("/")
                if _alive(int(pid), int(created)):
                    continue
                reason = f"its process {pid} is gone; marked by the start of {stage}"
                client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
                crashed += 1
    except Exception as exc:  # no server reachable: MLflow's KILLED is the record that counts
        log.info("Prefect flow runs not checked (%s: %s)", type(exc).__name__, exc)
    return crashed


def _signal_name(exc: BaseException) -> str:
    if isinstance(exc, TerminationSignal):
        return signal.Signals(exc.signal).name
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"


def log_summary(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """Log the stage's summary metrics to the active run and write `metrics/<stage>.json`."""
    if not is_main_process():
        return metrics
    mlflow.log_metrics(metrics)
    write_json(METRICS_DIR / f"{stage}.json", metrics)
    return metrics


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sft': {'trainer': {'learning_rate': 1e-3}}} → {'sft.trainer.learning_rate': 1e-3};
    keys that look like secrets are dropped, so a token never becomes an MLflow param."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if _SECRET.search(key):
            continue
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_tags(stage: str, params: Params) -> dict[str, str]:
    """Lineage: stage, seed, git commit, pipeline id, library versions, upstream DVC hashes."""
    tags = {
        "rlhf.stage": stage,
        "rlhf.seed": str(params.common.seed),
        "rlhf.pipeline_id": pipeline_id(),
        "mlflow.source.git.commit": _git("rev-parse", "HEAD") or "unknown",
        "rlhf.git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
    }
    tags |= {tag: os.environ[name] for tag, name in DVC_EXP_TAGS.items() if os.environ.get(name)}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"version.{name}"] = importlib.metadata.version(name)
    return tags | upstream_hashes(stage)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
