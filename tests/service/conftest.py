"""Service tests: real servers and workers on 127.0.0.1. A failing test's report ends with the
last lines of the logs of the processes its module started (flows/infra/testing.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.infra.testing import Services, services

_STARTED: dict[str, list[Services]] = {}  # module node id → what its fixtures and tests started


@pytest.fixture(scope="module")
def module_processes(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Services]:
    """Processes that live as long as the test module (stopped at its end, even on failure)."""
    with services(tmp_path_factory.mktemp("module-logs")) as started:
        _STARTED.setdefault(_module_id(request.node.nodeid), []).append(started)
        yield started


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """Processes that live as long as the test."""
    with services(tmp_path / "logs") as started:
        _STARTED.setdefault(_module_id(request.node.nodeid), []).append(started)
        yield started


def _module_id(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for started in _STARTED.get(_module_id(item.nodeid), []):
            report.sections.append((f"logs in {started.log_dir}", started.logs()))
