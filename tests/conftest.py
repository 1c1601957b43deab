"""Shared fixtures: a params file to tweak, an isolated MLflow store, Prefect's test server."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

import flows  # noqa: F401  (sets the offline defaults before Prefect and MLflow load)

REPO = Path(__file__).resolve().parents[1]


def write_params(path: Path, overrides: dict[str, Any]) -> Path:
    """The repo's params.yaml with dotted-key overrides ({'data.eval_fraction': 0.2}) applied."""
    yaml = YAML()
    tree = yaml.load(REPO / "params.yaml")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    with path.open("w") as out:
        yaml.dump(tree, out)
    return path


_DELETE = object()


@pytest.fixture
def delete() -> object:
    """Sentinel for `make_params`: remove this key."""
    return _DELETE


@pytest.fixture
def make_params(tmp_path: Path) -> Callable[..., Path]:
    """make_params({'data.eval_fraction': 0.2}) → path of a params file in tmp_path."""
    return lambda overrides=None, name="params.yaml": write_params(tmp_path / name, overrides or {})


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp dir with its own MLflow SQLite store (stages resolve paths from the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_user_tracking_env() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m flows.cli ARGS` in `cwd` (what dvc runs) against the session's Prefect server."""
    import prefect.settings

    env = os.environ | {
        "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@contextlib.contextmanager
def tasks_log() -> Iterator[list[str]]:
    """Messages our `tasks.*` modules log while the block runs."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("tasks")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def mlflow_client(root: Path) -> Any:
    """A client of the MLflow SQLite store a stage run in `root` wrote."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def stage_runs(root: Path, name: str | None = None) -> list[Any]:
    """MLflow runs (called `name`) in experiment `rlhf` of `root`'s store, oldest first."""
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("rlhf")
    if experiment is None:
        return []
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name = '{name}'" if name else "",
        order_by=["attributes.start_time ASC"],
    )
    return list(found)


def prepare_small(root: Path) -> None:
    """Run `prepare` in `root` with the small sizes, logging to `root`'s own MLflow store."""
    from flows.prepare import prepare
    from tasks.config import load_params
    from tests.sizes import SMALL

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        prepare(load_params(write_params(root / "params.yaml", SMALL)))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
