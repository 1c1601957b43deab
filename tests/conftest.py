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
