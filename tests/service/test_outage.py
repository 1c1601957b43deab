"""A stage outlives its services (issue 21), with real servers on 127.0.0.1: its shared Prefect
server killed mid-stage (PPO, DPO), its MLflow server stopped mid-stage and started again on the
same port and store, and stopped until the stage has ended (then `rlhf replay`). Each stage
trains to its end, writes its outputs and exits 0; no step's metrics are lost."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from flows.infra.deployment import BIN
from flows.infra.services import stop_recorded
from flows.infra.testing import Services, start_mlflow_server, write_params

pytestmark = [pytest.mark.service, pytest.mark.slow]

LONGER = {  # a few seconds of training after the kill
    "ppo.num_iterations": 12,
    "ppo.checkpoint_every": 100,
    "ppo.sample_every": 4,
    "dpo.trainer.max_steps": 40,
    "dpo.trainer.save_steps": 1000,
}
KEY = {"ppo": "objective/kl", "dpo": "loss"}
FIRST = {"ppo": 0, "dpo": 1}  # the first step each logs


def setting(
    repo: Path, tmp_path: Path, own_prefect: bool = False, **env: str
) -> tuple[Path, dict[str, str]]:
    """A params file (LONGER) and the environment of a stage: the session's Prefect server or
    (`own_prefect`) the shared one it starts itself, an MLflow store in `tmp_path`."""
    lines = repo.joinpath(".env-faults").read_text().splitlines()
    base = dict(line.split("=", 1) for line in lines)
    if own_prefect:
        base.pop("PREFECT_API_URL")
    base |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    params = write_params(tmp_path / "outage.yaml", LONGER, base=repo / "params.yaml")
    return params, base | env


def start_stage(repo: Path, stage: str, params: Path, env: dict[str, str]) -> subprocess.Popen:
    log = params.with_name(f"{stage}.log")
    process = subprocess.Popen(
        [str(BIN / "rlhf"), "stage", stage, "--params", str(params)],
        cwd=repo,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen) -> str:
    assert process.wait(timeout=600) == 0, process.log.read_text()[-4000:]  # type: ignore[attr-defined]
    return process.log.read_text()  # type: ignore[attr-defined]


def logged(uri: str, stage: str) -> tuple[mlflow.entities.Run, list[int]]:
    """The stage's newest run and the steps of its training metric."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(experiments, f"tags.`rlhf.stage` = '{stage}'")[0]
    history = client.get_metric_history(run.info.run_id, KEY[stage])
    return run, sorted(point.step for point in history)


def wait_until(done, process: subprocess.Popen, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert process.poll() is None, f"exited before {what}: " + process.log.read_text()[-3000:]  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


def sqlite_step(db: Path, stage: str) -> int:
    """The last step of the stage's training metric in the SQLite store `db` (-1: none yet)."""
    if not db.is_file():
        return -1
    # MLflow creates its tables after the stage starts
    with sqlite3.connect(db) as con, contextlib.suppress(sqlite3.OperationalError):
        (step,) = con.execute(
            "select max(m.step) from metrics m join tags t on t.run_uuid = m.run_uuid "
            "where t.key = 'rlhf.stage' and t.value = ? and m.key = ?",
            (stage, KEY[stage]),
        ).fetchone()
        return -1 if step is None else step
    return -1


@pytest.mark.parametrize("stage", ["ppo", "dpo"])
def test_a_stage_outlives_its_prefect_server(repo: Path, tmp_path: Path, stage: str) -> None:
    params, env = setting(repo, tmp_path, own_prefect=True)
    state = repo / ".rlhf"
    try:
        process = start_stage(repo, stage, params, env)
        wait_until(lambda: sqlite_step(tmp_path / "mlflow.db", stage) >= 2, process, "step 2")
        keeper = psutil.Process(int((state / "prefect-server.pid").read_text()))
        for server in keeper.children(recursive=True):  # `prefect server start`: a crash
            server.kill()
        output = finish(process)
    finally:
        stop_recorded(state)
    assert output.count("prefect server unreachable since") == 1, output[-3000:]
    assert "Traceback" not in output and "internal error" not in output
    assert (repo / "models" / stage / "model.safetensors").is_file()
    run, steps = logged(env["MLFLOW_TRACKING_URI"], stage)
    assert run.info.status == "FINISHED"
    last = LONGER["ppo.num_iterations"] - 1 if stage == "ppo" else LONGER["dpo.trainer.max_steps"]
    assert steps == list(range(FIRST[stage], last + 1))
    if stage == "ppo":  # the next stage starts a server and marks the lost flow run Crashed
        try:
            again = subprocess.run(
                [str(BIN / "rlhf"), "stage", "prepare", "--params", str(params)],
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
            )
            assert again.returncode == 0, again.stderr[-3000:]
            assert "started a shared Prefect server" in again.stderr
            url = (state / "prefect-server.url").read_text()
            flow_run = run.data.tags["rlhf.prefect_flow_run_id"]
            from prefect.client.orchestration import SyncPrefectClient

            with SyncPrefectClient(url) as client:
                assert client.read_flow_run(flow_run).state.type.value == "CRASHED"
        finally:
            stop_recorded(state)


def spooled_steps(repo: Path, key: str) -> list[int]:
    """The steps of `key` waiting in the stage's spool files."""
    text = "".join(p.read_text() for p in (repo / ".rlhf" / "tracking").glob("*.jsonl"))
    return [int(step) for step in re.findall(rf'\["{re.escape(key)}", [^,]+, \d+, (\d+)\]', text)]


def test_training_goes_on_while_mlflow_is_away_and_every_step_arrives(
    repo: Path, tmp_path: Path, processes: Services
) -> None:
    uri = start_mlflow_server(processes, tmp_path / "store", {})
    server, port = processes.started[-1], int(uri.rsplit(":", 1)[1])
    params, env = setting(repo, tmp_path, MLFLOW_TRACKING_URI=uri, RLHF_TRACKING_WAIT_S="300")
    process = start_stage(repo, "dpo", params, env)
    wait_until(lambda: sqlite_step(tmp_path / "store" / "mlflow.db", "dpo") >= 3, process, "3")
    server.stop()
    stopped_at = sqlite_step(tmp_path / "store" / "mlflow.db", "dpo")
    log = process.log  # type: ignore[attr-defined]
    wait_until(lambda: "unreachable since" in log.read_text(), process, "the outage seen")
    # Past MLflow's retries the stage trains on: steps pile up in the spool file.
    wait_until(lambda: max(spooled_steps(repo, "loss"), default=0) >= stopped_at + 5, process, "+5")
    start_mlflow_server(processes, tmp_path / "store", {}, port=port)  # the same port, store
    output = finish(process)
    run, steps = logged(uri, "dpo")
    assert run.info.status == "FINISHED"
    assert steps == list(range(1, LONGER["dpo.trainer.max_steps"] + 1)), output[-3000:]
    assert "unsent" not in output
    assert not list((repo / ".rlhf" / "tracking").glob("dpo-*.jsonl"))  # all delivered


def test_a_stage_that_ends_during_the_outage_leaves_a_file_to_replay(
    repo: Path, tmp_path: Path, processes: Services
) -> None:
    uri = start_mlflow_server(processes, tmp_path / "store", {})
    server, port = processes.started[-1], int(uri.rsplit(":", 1)[1])
    params, env = setting(repo, tmp_path, MLFLOW_TRACKING_URI=uri, RLHF_TRACKING_WAIT_S="2")
    process = start_stage(repo, "ppo", params, env)
    wait_until(lambda: sqlite_step(tmp_path / "store" / "mlflow.db", "ppo") >= 1, process, "1")
    server.stop()
    output = finish(process)
    assert (repo / "models" / "ppo" / "model.safetensors").is_file()
    found = re.search(r"(\d+) MLflow records unsent .*to deliver them: rlhf replay (\S+)", output)
    assert found, output[-3000:]
    spool = repo / found[2]
    assert spool.is_file()
    start_mlflow_server(processes, tmp_path / "store", {}, port=port)
    replayed = subprocess.run(
        [str(BIN / "rlhf"), "replay", str(spool)], cwd=repo, env=env, capture_output=True, text=True
    )
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert f"{found[1]} MLflow records delivered" in replayed.stdout
    run, steps = logged(uri, "ppo")
    assert run.info.status == "FINISHED"
    assert steps == list(range(LONGER["ppo.num_iterations"]))
    assert not spool.exists()
