"""A stage logs to a real MLflow server (`mlflow server` on 127.0.0.1, SQLite store, proxied
artifacts) when MLFLOW_TRACKING_URI points at it; read back through the REST client."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect.artifacts import Artifact

from flows.infra.deployment import BIN
from flows.infra.services import free_port
from flows.infra.testing import SMALL, Services, wait_http
from tasks.params import load_params
from tasks.stages import STAGE
from tasks.tracking import flatten

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_a_stage_logs_its_run_to_an_mlflow_server(
    workdir: Path,
    make_params: Callable[..., Path],
    prefect_server: None,
    processes: Services,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    from flows.prepare import prepare

    server_dir = workdir / "server"
    server_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = processes.start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{server_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(server_dir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=server_dir,
        env=env | {"MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    params = load_params(make_params(SMALL))
    metrics = prepare(params)

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # runs table
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "prepare"
    assert run.info.status == "FINISHED"
    sections = {name: getattr(params, name).model_dump() for name in STAGE["prepare"].sections}
    assert run.data.params == {key: str(value) for key, value in flatten(sections).items()}
    assert run.data.tags["rlhf.stage"] == "prepare"
    assert run.data.tags["rlhf.seed"] == str(params.common.seed)
    assert run.data.tags["version.mlflow"] == mlflow.__version__
    assert run.data.metrics == pytest.approx(metrics)

    # the stats artifact went through the server into its --artifacts-destination
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["stats.json"]
    local = workdir / "data" / "prepared" / "stats.json"
    fetched = Path(client.download_artifacts(run.info.run_id, "stats.json", str(workdir)))
    assert json.loads(fetched.read_text()) == json.loads(local.read_text())
    assert list((server_dir / "artifacts").rglob("stats.json"))
    assert (server_dir / "mlflow.db").is_file()
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()

    # Its Prefect flow run links to it (the prefect_server fixture's server).
    link = Artifact.get("mlflow-run-prepare")
    assert link is not None and f"{uri}/#/experiments/{experiment.experiment_id}" in link.data
    assert run.info.run_id in link.data


def test_a_training_stage_logs_system_metrics(
    workdir: Path,
    make_params: Callable[..., Path],
    prefect_server: None,
) -> None:
    import mlflow

    from flows.prepare import prepare
    from flows.sft import sft

    fast = {"sft.trainer.max_steps": 6, "tracking.system_metrics_interval_s": 0.2}
    params = load_params(make_params(SMALL | fast))
    prepare(params)
    sft(params)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name(params.tracking.experiment).experiment_id],
        "attributes.run_name = 'sft'",
    )
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    (prepared,) = client.search_runs([run.info.experiment_id], "attributes.run_name = 'prepare'")
    assert not [k for k in prepared.data.metrics if k.startswith("system/")]  # no training
