"""The worker path: `rlhf stage X` placed on the deployment backend runs the stage's Prefect
deployment `X/<pool>` on a work pool and waits for it; `rlhf deploy` registers the deployments
of prefect.yaml. A deployment of `--workspace shared` runs in this very workspace (same box, or
a network file system); one of `--workspace clone` in the worker's own checkout, the data moving
through the DVC remote (flows/infra/handoff.py). Kept free of torch imports: the laptop side
only talks to the Prefect API, git and DVC.
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

from flows.infra import handoff, transfer
from tasks.errors import StageFailed, Terminated, UserError
from tasks.lineage import pipeline_id
from tasks.params import Params
from tasks.stages import STAGE

BIN = Path(sys.executable).parent
BACKENDS = ("local", "deployment")


def placement(stage: str, params: Params) -> tuple[str, str]:
    """Where `stage` runs: (backend, work pool). $RLHF_ORCHESTRATION is `local`, `deployment`
    or a list such as `deployment,prepare=local,ppo=deployment@big-gpu` (a default, then
    `stage=backend[@pool]`). The most specific choice wins: the variable's for this stage, then
    `orchestration.stages.<stage>`, then the variable's default, then `orchestration.backend` /
    `work_pool`. Neither is tracked by DVC: moving a stage rebuilds nothing."""
    cfg = params.orchestration
    given = os.environ.get("RLHF_ORCHESTRATION", "")
    default, mine = None, None
    for item in filter(None, (part.strip() for part in given.split(","))):
        name, _, choice = item.rpartition("=")
        backend, _, pool = choice.partition("@")
        if backend not in BACKENDS or (name and name not in STAGE) or (pool and not name):
            raise UserError(
                f"RLHF_ORCHESTRATION={given!r}: {item!r} is not 'local', 'deployment' or "
                "stage=backend[@pool] (e.g. 'deployment,prepare=local,ppo=deployment@big-gpu')"
            )
        if not name:
            default = backend
        elif name == stage:
            mine = (backend, pool or None)
    own = cfg.stages.get(stage)
    backend = (mine and mine[0]) or (own and own.backend) or default or cfg.backend
    return backend, (mine and mine[1]) or (own and own.work_pool) or cfg.work_pool


def run_on_worker(stage: str, params: Params, pool: str) -> None:
    """Trigger `<stage>/<pool>` with the resolved params, stream its logs, fail unless it
    completes in time; then the outputs are here: in a shared workspace the worker wrote them,
    from a clone deployment they come through the DVC remote (handoff.receive)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError(
            "RLHF_ORCHESTRATION=deployment needs a Prefect server: set PREFECT_API_URL "
            "(`rlhf up` starts one and prints it)"
        )
    cfg = params.orchestration
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{stage}/{pool}")
        except ObjectNotFound:
            raise UserError(
                f"{stage}: no deployment {stage}/{pool} on the Prefect server: "
                f"`rlhf deploy --pool {pool}` registers it"
            ) from None
    clone = workspace_of(deployment) == "clone"
    # The stages of one `dvc repro` share its pipeline id (an MLflow tag), wherever they run.
    env = {"RLHF_PIPELINE_ID": pipeline_id()} | (handoff.send(stage) if clone else {})
    flow_run = run_deployment(
        deployment.id,
        parameters={"params": params.model_dump(mode="json")},
        job_variables={"env": env},
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
        except (KeyboardInterrupt, Terminated):  # Ctrl-C, a killed `dvc repro`: the run stops too
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
        if clone:
            handoff.receive(stage, handoff.published(client, flow_run.id))
    missing = [path for path in transfer.stage_outputs(stage) if not Path(path).exists()]
    if missing:
        raise StageFailed(
            f"{stage}: the worker finished but {', '.join(missing)} is missing here: does the "
            f"worker share this workspace? If not, `rlhf deploy --pool {pool} --workspace clone` "
            "(docs/gpu-worker.md)"
        )


def workspace_of(deployment: Any) -> str:
    """`shared` or `clone`: the workspace its pull step (handoff.enter) gives its runs."""
    for step in deployment.pull_steps or []:
        if ENTER_STEP in step:
            return step[ENTER_STEP]["workspace"]
    return "shared"


ENTER_STEP = "flows.infra.handoff.enter"


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


def deploy(pool: str, workspace: str = "shared", repository: str | None = None) -> None:
    """Create the process work pool if missing, then `prefect deploy --all` from prefect.yaml:
    deployments `<stage>/<pool>` whose runs work in this workspace (`shared`; RLHF_WORKSPACE
    names it as the worker sees it) or in the worker's checkout of `repository` (`clone`;
    default: this repository's `origin`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # else a temporary server would get them, and forget them
        raise UserError(
            "rlhf deploy needs a Prefect server: set PREFECT_API_URL "
            "(`rlhf up` starts one and prints it)"
        )
    if workspace == "clone" and not repository:
        git = ["git", "remote", "get-url", "origin"]
        done = subprocess.run(git, capture_output=True, text=True)
        if done.returncode:
            raise UserError(
                "rlhf deploy --workspace clone: this repository has no `origin`, which the "
                "workers would clone: `git remote add origin URL`, or give --repository URL"
            )
        repository = done.stdout.strip()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                print(f"rlhf: created process work pool '{pool}'")
            except ObjectAlreadyExists:  # a worker started meanwhile created it
                pass
    where = os.environ.get("RLHF_WORKSPACE", str(Path.cwd().resolve()))
    env = os.environ | {
        "RLHF_WORK_POOL": pool,
        "RLHF_WORKSPACE_MODE": workspace,
        "RLHF_WORKSPACE": where if workspace == "shared" else "",
        "RLHF_REPOSITORY": repository or "",
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
    runs = f"workspace {where}" if workspace == "shared" else f"the workers' clones of {repository}"
    print(f"rlhf: deployments <stage>/{pool} registered on pool '{pool}' ({runs})")
