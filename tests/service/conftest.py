"""Service tests: real servers and workers on 127.0.0.1. A failing test's report ends with the
last lines of the logs of the processes its module started (flows/infra/testing.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.infra.deployment import BIN
from flows.infra.testing import Services, clean_env, copy_repo, services

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


DPO = {  # slow enough to be killed between two checkpoints
    "dpo.trainer.max_steps": 120,
    "dpo.trainer.save_steps": 40,
    "dpo.trainer.logging_steps": 1,
}
PPO = {"ppo.num_iterations": 12, "ppo.checkpoint_every": 3, "ppo.sample_every": 3}


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Path]:
    """A copy where `dvc repro reward_model` ran (prepare, sft, reward_model), for the session:
    test_faults.py and test_outage.py train their stages from it."""
    root = tmp_path_factory.mktemp("faults")
    repo = copy_repo(root / "repo", DPO | PPO)
    env = clean_env(repo, root) | {"PREFECT_API_URL": prefect_server, "RLHF_WARM": "0"}
    # DVC runs a stage through $SHELL, /bin/sh when unset (as in CI): dash stays between dvc
    # and the stage, where bash would exec it. The harder of the two for a killed dvc.
    env["SHELL"] = "/bin/sh"
    repo.joinpath(".env-faults").write_text("\n".join(f"{k}={v}" for k, v in env.items()))
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", "reward_model"], cwd=repo, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    yield repo
