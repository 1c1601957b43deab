"""The tracking queue (tasks/tracking_queue.py) against real MLflow stores: records arrive in
order and the spool file goes; with no server answering, every record stays in the file, in
order, and `replay` delivers it once a store answers. The stage-level outage tests, with a real
MLflow server stopped and started again, are in tests/service/test_outage.py."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking._tracking_service.utils import _get_store

from flows.infra.services import free_port
from tasks.tracking_queue import SHORT_HTTP, TrackingQueue, replay


def new_run(uri: str) -> str:
    client = mlflow.MlflowClient(uri)
    return client.create_run(client.create_experiment("queue")).info.run_id


def feed(queue: TrackingQueue, run_id: str, steps: int) -> None:
    for step in range(steps):
        queue.log_batch_async(run_id, [], [], [Metric("loss", float(step), 1000 + step, step)])
    queue.log_batch_async(run_id, [Param("lr", "0.1")], [RunTag("note", "done")], [])
    queue.update_run_info(run_id, RunStatus.FINISHED, 5000, None)  # closes the queue


def test_records_arrive_in_order_and_the_spool_file_goes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri)
    spool = tmp_path / "spool.jsonl"
    feed(TrackingQueue(_get_store(uri), uri, spool), run_id, 30)
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert [point.step for point in history] == list(range(30))
    assert [point.value for point in history] == [float(step) for step in range(30)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["note"] == "done"
    assert not spool.exists()


def test_with_no_server_every_record_stays_in_order_and_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SHORT_HTTP.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RLHF_TRACKING_WAIT_S", "1")
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spool = tmp_path / "spool.jsonl"
    queue = TrackingQueue(_get_store(away), away, spool)
    feed(queue, "0123abcd", 5)
    assert queue.written - queue.sent == 7  # 5 metrics batches, params and tag, the run's end
    header, *records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert header == {"op": "store", "uri": away}
    assert [r["metrics"][0][3] for r in records[:5]] == [0, 1, 2, 3, 4]
    assert records[-1] == {
        "op": "run",
        "run_id": "0123abcd",
        "status": "FINISHED",
        "end_time": 5000,
    }

    assert replay(spool) == (0, 7)  # still no server: all of it stays
    assert len(spool.read_text().splitlines()) == 8
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a store that answers, and has the run
    run_id = new_run(uri)
    text = spool.read_text().replace(away, uri).replace("0123abcd", run_id)
    spool.write_text(text)
    assert replay(spool) == (7, 0)
    client = mlflow.MlflowClient(uri)
    assert [p.step for p in client.get_metric_history(run_id, "loss")] == list(range(5))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()
