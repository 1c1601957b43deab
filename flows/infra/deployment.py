"""The worker path: `rlhf stage X` with RLHF_ORCHESTRATION=deployment runs the stage's Prefect
deployment on a work pool and waits for it; `rlhf deploy` registers the deployments of
prefect.yaml. Kept free of torch imports: the laptop side only talks to the Prefect API.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from ruamel.yaml import YAML

from tasks.errors import StageFailed, UserError
from tasks.lineage import pipeline_id
from tasks.params import Params

BIN = Path(sys.executable).parent


def backend(params: Params) -> str:
    """$RLHF_ORCHESTRATION, else `orchestration.backend` (untracked: switching rebuilds nothing)."""
    choice = os.environ.get("RLHF_ORCHESTRATION") or params.orchestration.backend
    if choice not in ("local", "deployment"):
        raise UserError(f"RLHF_ORCHESTRATION={choice!r}: expected 'local' or 'deployment'")
    return choice


def run_on_worker(stage: str, params: Params) -> None:
    """Trigger `<stage>/<stage>` with the resolved params, stream its logs, fail unless it
    completes in time, then check its outputs arrived in this (shared) workspace."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError(
            "RLHF_ORCHESTRATION=deployment needs a Prefect server: set PREFECT_API_URL "
            "(`rlhf up` starts one and prints it)"
        )
    cfg = params.orchestration
    flow_run = run_deployment(
        f"{stage}/{stage}",
        parameters={"params": params.model_dump(mode="json")},
        # The stages of one `dvc repro` share its pipeline id (an MLflow tag), wherever they run.
        job_variables={"env": {"RLHF_PIPELINE_ID": pipeline_id()}},
        timeout=0,  # return at once; we follow the run ourselves
        as_subflow=False,
    )
    deadline = time.monotonic() + cfg.timeout_s
    with get_client(sync_client=True) as client:
        logs = _LogTail(client, flow_run.id)
        try:
            while True:
                run = client.read_flow_run(flow_run.id)
                logs.poll()
                if run.state is not None and run.state.is_final():
                    break
                if time.monotonic() > deadline:
                    _cancel(client, run)
                    raise StageFailed(
                        f"{stage}: deployment run '{run.name}' exceeded orchestration.timeout_s "
                        f"({cfg.timeout_s:g} s) and was cancelled"
                    )
                time.sleep(cfg.poll_interval_s)
        except KeyboardInterrupt:  # Ctrl-C stops the run too, not only the following of it
            _cancel(client, client.read_flow_run(flow_run.id))
            print(f"rlhf: cancelled deployment run '{flow_run.name}'", file=sys.stderr)
            raise
        # The engine ships its last records (the error, "Finished in state ...") after the
        # final state is set: wait for them, briefly.
        grace = time.monotonic() + LOG_GRACE_S
        while logs.seen and not logs.finished and time.monotonic() < grace:
            time.sleep(min(cfg.poll_interval_s, 0.25))
            logs.poll()
    if not run.state.is_completed():
        raise StageFailed(
            f"{stage}: deployment run '{run.name}' ended {run.state.type.value}: "
            f"{(run.state.message or '').strip().splitlines()[0] if run.state.message else ''}"
            f" (logs: Prefect UI, flow run {flow_run.id})"
        )
    missing = [path for path in stage_outputs(stage) if not Path(path).exists()]
    if missing:
        raise StageFailed(
            f"{stage}: the worker finished but {', '.join(missing)} is missing here: does the "
            "worker share this workspace? (docs/gpu-worker.md)"
        )


LOG_GRACE_S = 3.0
"""How long to wait, after a run's final state, for its last log records."""


def _cancel(client: Any, run: Any) -> None:
    """Cancel a flow run: at once if no worker took it yet (nothing to stop), else through its
    worker (Cancelling: the worker stops the flow-run process, then marks it Cancelled)."""
    from prefect.states import Cancelled, Cancelling

    if run.state is not None and run.state.is_final():
        return
    waiting = run.state is None or run.state.is_scheduled()
    client.set_flow_run_state(run.id, Cancelled() if waiting else Cancelling(), force=True)


class _LogTail:
    """Prints a flow run's log records to stderr, each once. The engine and the worker ship
    theirs in separate batches, so a record can arrive after a later one: every poll re-reads
    from a little before the newest record seen, page by page (the API returns at most 200)."""

    PAGE = 200
    SLACK = timedelta(seconds=10)

    def __init__(self, client: Any, flow_run_id: UUID) -> None:
        self.client = client
        self.flow_run_id = flow_run_id
        self.seen: set[UUID] = set()
        self.newest: datetime | None = None
        self.finished = False  # the flow run's "Finished in state ..." record arrived

    def poll(self) -> int:
        """Print the records not printed yet; how many."""
        from prefect.client.schemas.filters import (
            LogFilter,
            LogFilterFlowRunId,
            LogFilterTimestamp,
        )
        from prefect.client.schemas.sorting import LogSort

        log_filter = LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
            timestamp=LogFilterTimestamp(after_=self.newest - self.SLACK if self.newest else None),
        )
        printed = 0
        offset = 0
        while True:
            page = self.client.read_logs(
                log_filter=log_filter, limit=self.PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC
            )
            for record in page:
                if record.id in self.seen:
                    continue
                self.seen.add(record.id)
                self.newest = max(self.newest or record.timestamp, record.timestamp)
                message = record.message.rstrip()
                if record.level >= logging.WARNING:  # tracebacks stay in the Prefect UI
                    message = message.splitlines()[0] if message else message
                if record.name == "prefect.flow_runs" and message.startswith("Finished in state"):
                    self.finished = True
                print(f"[worker] {message}", file=sys.stderr)
                printed += 1
            if len(page) < self.PAGE:
                return printed
            offset += self.PAGE


def stage_outputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The outs, metrics and plots dvc.yaml declares for `stage`."""
    spec = YAML(typ="safe").load(dvc_yaml)["stages"][stage]
    entries = [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def deploy(pool: str) -> None:
    """Create the process work pool if missing, then `prefect deploy --all` from prefect.yaml
    with this workspace as the runs' working directory."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # else a temporary server would get them, and forget them
        raise UserError(
            "rlhf deploy needs a Prefect server: set PREFECT_API_URL "
            "(`rlhf up` starts one and prints it)"
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                print(f"rlhf: created process work pool '{pool}'")
            except ObjectAlreadyExists:  # a worker started meanwhile created it
                pass
    env = os.environ | {
        "RLHF_WORK_POOL": pool,
        "RLHF_WORKSPACE": os.environ.get("RLHF_WORKSPACE", str(Path.cwd().resolve())),
    }
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise StageFailed(f"prefect deploy failed: {' '.join(tail)}")
    print(f"rlhf: deployments registered on pool '{pool}' (workspace {env['RLHF_WORKSPACE']})")
