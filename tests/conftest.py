"""Shared fixtures and helpers: a params file to tweak, an isolated MLflow store, Prefect's test
server, the stage runs of a store, leftovers of an interrupted write."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flows  # noqa: F401  (sets the offline defaults before Prefect and MLflow load)
from flows.infra.testing import SMALL, write_params

REPO = Path(__file__).resolve().parents[1]

if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each xdist worker's torch, and the stages it starts, get their share of the cores: two
    # workers of two threads each on two cores mostly wait for each other's threads.
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


SHARED = {  # test files that share a fixture wider than a module → the group they run in
    "tests/e2e/": "e2e",  # tests/e2e/conftest.py: project, one dvc repro for the package
    "tests/service/test_faults.py": "repo",  # tests/service/conftest.py: repo
    "tests/service/test_outage.py": "repo",
}
HEAVY_FIRST = ("tests/e2e/", "tests/service/", "tests/integration/")
"""The order groups start in: the longest first, the unit tests fill the gaps at the end."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heaviest directories first (a stable sort: each file keeps its own order)."""
    rank = {prefix: i for i, prefix in enumerate(HEAVY_FIRST)}
    items.sort(
        key=lambda item: next(
            (i for prefix, i in rank.items() if item.nodeid.startswith(prefix)), len(rank)
        )
    )


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, when it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two pytest-xdist workers: each test file, or the files of one group of
    SHARED, runs whole on one worker, so a fixture wider than a test is built once. (xdist's
    own `--dist loadgroup` marks tests by rewriting their node ids, which pytest 9.2 ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # groups start in collection order: HEAVY_FIRST

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return next((group for pre, group in SHARED.items() if path.startswith(pre)), path)

    return ByFile(config, log)


@pytest.fixture
def make_params(tmp_path: Path) -> Callable[..., Path]:
    """make_params({'data.eval_fraction': 0.2}) → path of a params file in tmp_path
    (flows.infra.testing.write_params; `new_keys=True` for the unknown-key tests)."""

    def make(overrides: dict[str, Any] | None = None, name: str = "params.yaml", **kw: Any) -> Path:
        return write_params(tmp_path / name, overrides or {}, **kw)

    return make


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp dir with its own MLflow SQLite store (stages resolve paths from the cwd)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # The environment is not enough: an earlier in-process stage left MLflow's global URI
    # (mlflow.set_tracking_uri wins over the variable) pointing at its own, maybe stopped, store.
    mlflow.set_tracking_uri(uri)
    # ... and its active experiment (set_experiment's), an id this new store does not have.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it too
    return tmp_path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stages' shared Prefect server, started as `rlhf stage` starts it
    (flows/infra/prefect_server.py), with its own database, for the whole session; its API URL.
    In-process flows use it, and so do the `rlhf` subprocesses (run_cli passes the URL)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.infra.prefect_server import shared_prefect
    from flows.infra.services import stop_recorded

    state = tmp_path_factory.mktemp("rlhf-state")
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PREFECT_API_URL", raising=False)
        patch.setenv("PREFECT_HOME", str(home))  # the server's own database
        with shared_prefect(state) as url, temporary_settings({PREFECT_API_URL: url}):
            yield url
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # the session's last records, then the server
        stop_recorded(state)


@pytest.fixture(scope="session", autouse=True)
def _no_user_tracking_env() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # A warm process (flows/infra/warm.py) per test directory would import for seconds and never
    # serve twice: only the tests of warm starts, and the dvc repro ones, turn them on.
    os.environ["RLHF_WARM"] = "0"


@contextlib.contextmanager
def adopting() -> Iterator[Any]:
    """This process (a psutil.Process) as the reaper of the orphans of what the block starts
    (Linux's PR_SET_CHILD_SUBREAPER): a daemon whose parent exits, like the shared Prefect
    server's keeper once the stage that started it ends, stays among this process's
    descendants. So `children(recursive=True)` holds all that the block started and nothing of
    anyone else's. The adopted orphans that ended by then are reaped when the block ends."""
    import ctypes

    import psutil

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    me = psutil.Process()
    own = {child.pid for child in me.children()}  # started before the block: not adopted
    try:
        yield me
    finally:
        prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for child in me.children():
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.pid not in own and child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m flows.infra.cli ARGS` in `cwd` (what dvc runs) against the session's Prefect
    server."""
    import prefect.settings

    env = os.environ | {
        "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "flows.infra.cli", *args],
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


@contextlib.contextmanager
def stage_dir(root: Path, overrides: dict[str, Any]) -> Iterator[Any]:
    """Run the block in `root` (stages resolve paths from the cwd) with `root`'s own MLflow store
    → the params of root/params.yaml, written with `overrides`. For module-scoped fixtures,
    which cannot use `workdir`."""
    from tasks.params import load_params

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield load_params(write_params(root / "params.yaml", overrides))


def prepare_small(root: Path) -> None:
    """Run `prepare` in `root` with the small sizes, logging to `root`'s own MLflow store."""
    from flows.prepare import prepare

    with stage_dir(root, SMALL) as params:
        prepare(params)


def leftovers(root: Path, *folders: str) -> list[str]:
    """The temporary or old entries an interrupted `atomic_dir`, `write_json` or checkpoint
    write may leave in the `folders` of `root` (`.name.tmp-…`, `.name.old-…`, `.name.tmp`)."""
    pattern = re.compile(r"^\..*\.(tmp|old)(-|$)")
    return [
        str(entry.relative_to(root))
        for folder in folders
        if (root / folder).exists()
        for entry in (root / folder).iterdir()
        if pattern.match(entry.name)
    ]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
