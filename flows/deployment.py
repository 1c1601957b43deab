"""The worker path: `rlhf stage X` with RLHF_ORCHESTRATION=deployment runs the stage's Prefect
deployment on a work pool and waits for it; `rlhf deploy` registers the deployments of
prefect.yaml. Kept free of torch imports: the laptop side only talks to the Prefect API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from ruamel.yaml import YAML

from tasks.config import Params

BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    """A deployment run that failed, crashed, was cancelled or timed out (message for the user)."""


def backend(params: Params) -> str:
    """$RLHF_ORCHESTRATION, else `orchestration.backend` (untracked: switching rebuilds nothing)."""
    choice = os.environ.get("RLHF_ORCHESTRATION") or params.orchestration.backend
    if choice not in ("local", "deployment"):
        raise ValueError(f"RLHF_ORCHESTRATION={choice!r}: expected 'local' or 'deployment'")
    return choice


def run_on_worker(stage: str, params: Params) -> None:
    """Trigger `<stage>/<stage>` with the resolved params, stream its logs, fail unless it
    completes in time, then check its outputs arrived in this (shared) workspace."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    if not PREFECT_API_URL.value():
        raise ValueError(
            "RLHF_ORCHESTRATION=deployment needs a Prefect server: set PREFECT_API_URL "
            "(`rlhf up` starts one and prints it)"
        )
    cfg = params.orchestration
    flow_run = run_deployment(
        f"{stage}/{stage}",
        parameters={"params": params.model_dump(mode="json")},
        timeout=0,  # return at once; we follow the run ourselves
        as_subflow=False,
    )
    deadline = time.monotonic() + cfg.timeout_s
    with get_client(sync_client=True) as client:
        seen: set[UUID] = set()
        while True:
            run = client.read_flow_run(flow_run.id)
            _print_logs(client, flow_run.id, seen)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                raise StageFailed(
                    f"{stage}: deployment run '{run.name}' exceeded orchestration.timeout_s "
                    f"({cfg.timeout_s:g} s) and was cancelled"
                )
            time.sleep(cfg.poll_interval_s)
        if not run.state.is_completed():  # the worker ships logs in batches: wait for the error
            for _ in range(int(3.0 / cfg.poll_interval_s) + 1):
                time.sleep(cfg.poll_interval_s)
                _print_logs(client, flow_run.id, seen)
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


def _print_logs(client: Any, flow_run_id: UUID, seen: set[UUID]) -> int:
    """Print the run's log lines not printed yet (they can arrive out of order); how many."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
        sort=LogSort.TIMESTAMP_ASC,
    )
    new = [record for record in logs if record.id not in seen]
    for record in new:
        seen.add(record.id)
        print(f"[worker] {record.message}", file=sys.stderr)
    return len(new)


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
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"rlhf: created process work pool '{pool}'")
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
