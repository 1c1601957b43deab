"""The deployment backend against real services on 127.0.0.1: a Prefect server (its own SQLite
database), a process worker in a git copy of the repository with FAST params, the deployments
of prefect.yaml registered by `rlhf deploy`; then `dvc repro` with RLHF_ORCHESTRATION=deployment
runs the stages on the worker, a failing run fails `dvc repro`, a run past its timeout is
cancelled. And `rlhf up` / `rlhf down`. The helpers are flows/infra/testing.py's."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

import tasks.stages
from flows.infra.deployment import BIN
from flows.infra.services import alive, free_port, listening, process_family, stop_process_tree
from flows.infra.testing import (
    REPO,
    Services,
    clean_env,
    copy_repo,
    start_prefect_server,
    start_worker,
    wait_for_pool,
    write_params,
)
from flows.infra.transfer import stage_outputs
from tasks.params import load_params

pytestmark = [pytest.mark.service, pytest.mark.slow]

POOL = "rlhf-test"
STAGES = tuple(spec.name for spec in tasks.stages.STAGES[:2])  # prepare, sft: seconds each


@dataclass
class Stack:
    root: Path
    workspace: Path
    env: dict[str, str]  # PREFECT_API_URL of the server, MLflow in root/mlflow.db
    api: str
    processes: Services

    def run(self, *args: str, name: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the copy (output also in the logs as <name>.log)."""
        done = subprocess.run(
            list(args),
            cwd=self.workspace,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        (self.processes.log_dir / f"{name}.log").write_text(done.stdout + done.stderr)
        return done

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, module_processes: Services) -> Stack:
    """Server, work pool (created by `rlhf deploy`), worker, deployments: all on 127.0.0.1."""
    root = tmp_path_factory.mktemp("deployment")
    workspace = copy_repo(root / "repo", {"orchestration.work_pool": POOL})
    env = clean_env(workspace, root)
    env["PREFECT_API_URL"] = api = start_prefect_server(module_processes, root, env)
    stack = Stack(root, workspace, env, api, module_processes)
    deploy = subprocess.Popen(
        [str(BIN / "rlhf"), "deploy", "--pool", POOL],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # `rlhf deploy` creates the pool; the worker starts while it registers the deployments
        if wait_for_pool(api, POOL, give_up=lambda: deploy.poll() is not None):
            start_worker(module_processes, POOL, workspace, env)
        output, _ = deploy.communicate(timeout=300)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    (module_processes.log_dir / "deploy.log").write_text(output)
    assert deploy.returncode == 0, output
    assert f"created process work pool '{POOL}'" in output, output
    wait_for_pool(api, POOL, worker=True)
    return stack


@pytest.fixture(scope="module")
def repro(stack: Stack) -> subprocess.CompletedProcess[str]:
    """`dvc repro prepare sft` with the deployment backend (once for the module)."""
    return stack.run(
        str(BIN / "dvc"), "repro", *STAGES, name="dvc-repro", RLHF_ORCHESTRATION="deployment"
    )


def _lock(stack: Stack) -> dict[str, Any]:
    path = stack.workspace / "dvc.lock"
    return YAML(typ="safe").load(path.read_text())["stages"] if path.exists() else {}


def _runs_of(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
    )


def test_rlhf_deploy_registers_every_stage_on_the_pool(stack: Stack) -> None:
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    dvc_stages = YAML(typ="safe").load(stack.workspace / "dvc.yaml")["stages"]
    with stack.client() as client:
        assert client.read_work_pool(POOL).type == "process"
        deployments = client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL]))
        )
    with stack.client() as client:
        by_flow = {client.read_flow(d.flow_id).name: d for d in deployments}
    assert set(by_flow) == set(dvc_stages) | {"pipeline"}
    for name, deployment in by_flow.items():
        assert deployment.name == POOL and deployment.work_pool_name == POOL
        assert deployment.entrypoint == f"flows.{name}:{name}"
        (step,) = deployment.pull_steps
        workspace = {"directory": str(stack.workspace.resolve()), "workspace": "shared"}
        assert step["flows.infra.handoff.enter"] == workspace | {"repository": ""}


def test_dvc_repro_runs_the_stages_on_the_worker(
    stack: Stack, repro: subprocess.CompletedProcess[str]
) -> None:
    output = repro.stdout + repro.stderr
    assert repro.returncode == 0, output
    params = json.loads(
        json.dumps(load_params(stack.workspace / "params.yaml").model_dump(mode="json"))
    )
    for stage in STAGES:
        assert f"Running stage '{stage}'" in output
        assert f"rlhf: {stage} done on the worker" in output
    # the worker's logs, our modules' records and the runs' last records included
    assert "[worker] Beginning flow run" in output
    assert "(prepare) in experiment 'rlhf'" in output  # tasks.tracking, on the worker
    assert output.count("[worker] Finished in state Completed()") >= 2 * len(STAGES)

    with stack.client() as client:
        for stage in STAGES:
            deployment = client.read_deployment_by_name(f"{stage}/{POOL}")
            assert deployment.work_pool_name == POOL
            (run,) = _runs_of(client, deployment.id)
            assert run.state.is_completed(), (stage, run.state)
            assert run.work_pool_name == POOL
            assert run.parameters["params"] == params  # the params the laptop resolved
            flow = client.read_flow(run.flow_id)
            assert flow.name == stage
        # nothing ran in the `rlhf stage` processes themselves
        assert all(run.deployment_id for run in client.read_flow_runs())

    for stage in STAGES:
        for path in stage_outputs(stage, stack.workspace / "dvc.yaml"):
            assert (stack.workspace / path).exists(), path
    lock = _lock(stack)
    assert set(STAGES) <= set(lock)
    for stage in STAGES:
        locked = {out["path"] for out in lock[stage]["outs"]}
        assert locked == set(stage_outputs(stage, stack.workspace / "dvc.yaml")), stage
    status = stack.run(str(BIN / "dvc"), "status", *STAGES, "--json", name="dvc-status")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout

    # MLflow (the worker's store, SQLite in the temp dir): the stages of one `dvc repro` share
    # one pipeline id, as in a local run
    import mlflow

    tracking = mlflow.MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    experiment = tracking.get_experiment_by_name("rlhf")
    runs = tracking.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(STAGES)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["rlhf.pipeline_id"] for r in runs}) == 1


def test_a_failing_run_fails_dvc_repro(
    stack: Stack, repro: subprocess.CompletedProcess[str]
) -> None:
    assert repro.returncode == 0
    config = stack.workspace / "models" / "base" / "config.json"
    original = config.read_bytes()
    locked_sft = _lock(stack)["sft"]
    config.write_text("not JSON")  # the sft flow fails on the worker, loading models/base
    try:
        # sft only: `prepare` would restore its output
        done = stack.run(
            str(BIN / "dvc"),
            "repro",
            "--single-item",
            "sft",
            name="dvc-repro-failing",
            RLHF_ORCHESTRATION="deployment",
        )
    finally:
        config.write_bytes(original)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("rlhf: error:")]
    assert len(errors) == 1, output
    assert errors[0].startswith("rlhf: error: sft: deployment run '"), errors
    assert "ended FAILED" in errors[0] and "models/base/config.json" in errors[0], errors
    assert "Traceback" not in output  # tracebacks stay in the Prefect UI
    assert "failed to reproduce 'sft'" in output
    assert _lock(stack)["sft"] == locked_sft
    with stack.client() as client:
        newest = _runs_of(client, client.read_deployment_by_name(f"sft/{POOL}").id)[0]
    assert newest.state.is_failed(), newest.state


def test_a_run_past_its_timeout_is_cancelled(stack: Stack) -> None:
    overrides = {"orchestration.timeout_s": 1, "orchestration.work_pool": POOL}
    params = write_params(stack.root / "timeout.yaml", overrides)
    # not the copy's FAST params: the timeout is the only difference that matters here
    started = time.monotonic()
    done = stack.run(
        str(BIN / "rlhf"),
        "stage",
        "prepare",
        "--params",
        str(params),
        name="stage-timeout",
        RLHF_ORCHESTRATION="deployment",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exceeded orchestration.timeout_s (1 s) and was cancelled" in done.stderr
    assert time.monotonic() - started < 60
    with stack.client() as client:
        deployment = client.read_deployment_by_name(f"prepare/{POOL}")
        deadline = time.monotonic() + 30
        while True:
            run = _runs_of(client, deployment.id)[0]  # the newest
            if run.state.is_cancelled() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert run.state.type.value in ("CANCELLED", "CANCELLING"), run.state


def test_rlhf_up_starts_both_servers_and_rlhf_down_stops_them(
    tmp_path: Path, processes: Services
) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    env = clean_env(REPO, tmp_path)  # the repository's code; Prefect's home in tmp_path
    env.pop("MLFLOW_TRACKING_URI")
    rlhf = str(BIN / "rlhf")
    state = tmp_path / ".rlhf"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [rlhf, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        (processes.log_dir / f"rlhf-{args[0]}.log").write_text(done.stdout + done.stderr)
        return done

    try:
        up = run(
            "up",
            "--prefect-port",
            str(prefect_port),
            "--mlflow-port",
            str(mlflow_port),
            "--worker",
            "up-down",
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in up.stdout
        for url in (
            f"http://127.0.0.1:{prefect_port}/api/health",
            f"http://127.0.0.1:{mlflow_port}/health",
        ):
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, url
        # the UI calls the API of its own port (it said 4200 whatever --prefect-port was)
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings") as response:
            settings = json.loads(response.read())
        assert settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        pid_files = sorted(p.name for p in state.glob("*.pid"))
        assert pid_files == ["mlflow.pid", "prefect.pid", "worker.pid"]
        pids = [int(p.read_text()) for p in state.glob("*.pid")]
        assert all(_group_alive(pid) for pid in pids)
        # `rlhf up` again leaves the running services alone
        again = run("up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "rlhf: prefect already running" in again.stdout
        assert sorted(int(p.read_text()) for p in state.glob("*.pid")) == sorted(pids)

        down = run("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert down.stdout.strip() == "rlhf: stopped worker, mlflow, prefect"
        assert not listening(prefect_port) and not listening(mlflow_port)
        assert not list(state.glob("*.pid"))
        for pid in pids:
            assert not _group_alive(pid), pid
        assert run("down").stdout.strip() == "rlhf: nothing was running"
    finally:
        for log in state.glob("*.log"):  # shown with the other logs on failure
            (processes.log_dir / f"rlhf-up-{log.name}").write_text(log.read_text(errors="replace"))
        _stop_leftovers(state)


def _group_alive(pgid: int) -> bool:
    return any(alive(process) for process in process_family(pgid))


def _stop_leftovers(state: Path) -> None:
    """What `rlhf up` started here and `rlhf down` did not stop (the test failed)."""
    for pid_file in state.glob("*.pid"):
        stop_process_tree(int(pid_file.read_text()), 15.0)
