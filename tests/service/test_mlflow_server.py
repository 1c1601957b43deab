"""A stage logs to a real MLflow server (`mlflow server` on 127.0.0.1, SQLite store, proxied
artifacts) when MLFLOW_TRACKING_URI points at it; read back through the REST client."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.config import STAGE_SECTIONS, load_params
from tasks.tracking import flatten
from tests.service.stack import BIN, Services, free_port, wait_http
from tests.sizes import SMALL

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
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "prepare"
    assert run.info.status == "FINISHED"
    sections = {name: getattr(params, name).model_dump() for name in STAGE_SECTIONS["prepare"]}
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
