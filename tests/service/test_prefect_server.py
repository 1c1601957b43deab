"""The stages' shared Prefect server (flows/infra/prefect_server.py), with real servers on
127.0.0.1: one server for many stages, started once even by stages that start together, the user's
PREFECT_API_URL first, an idle stop that leaves no process and no stale URL, `rlhf down`. Servers
are counted among this test process's own descendants (tests/conftest.py: adopting)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.infra.prefect_server import PID_FILE, URL_FILE, shared_prefect
from flows.infra.services import alive, stop_process_tree
from flows.infra.testing import REPO
from tests.conftest import adopting

pytestmark = [pytest.mark.service, pytest.mark.slow]

# A process that takes the shared server as a stage does, prints its URL, and holds it a while.
STAGE = """
import sys, time
from pathlib import Path
from flows.infra.prefect_server import shared_prefect
with shared_prefect(Path(sys.argv[1])) as url:
    print(url, flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A state dir of its own, no user URL, the servers' own Prefect home; the keeper stopped."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("RLHF_PREFECT_IDLE_S", "3")
    state = tmp_path / "rlhf"
    yield state
    if (state / PID_FILE).is_file():
        stop_process_tree(int((state / PID_FILE).read_text()), 15.0)


def stage(state: Path, hold: float) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", STAGE, str(state), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def servers(me: psutil.Process) -> list[psutil.Process]:
    """The Prefect servers among the descendants of this test process (`adopting`): the
    session's, and those this test's stages started; never anyone else's."""
    found = []
    for process in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "prefect" in " ".join(process.cmdline()[:2]) and "server" in process.cmdline():
                found.append(process)
    return found


def test_stages_started_together_share_one_server_that_stops_when_idle(state: Path):
    with adopting() as me:
        one_server_then_none(state, me)


def one_server_then_none(state: Path, me: psutil.Process) -> None:
    before = {p.pid for p in servers(me)}
    first, second = stage(state, 4.0), stage(state, 4.0)
    urls = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert len(urls) == 1, urls  # the lock: one started it, the other waited and took it
    (url,) = urls
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert (state / URL_FILE).read_text() == url
    keeper = psutil.Process(int((state / PID_FILE).read_text()))
    assert keeper in me.children(recursive=True)  # adopted: its stage may have ended
    ours = [p for p in servers(me) if p.pid not in before]
    assert len(ours) == 1, [p.cmdline() for p in ours]  # one prefect server runs
    started = [err for err in (first.communicate()[1], second.communicate()[1]) if err.strip()]
    assert len(started) == 1 and "started a shared Prefect server" in started[0], started

    third = stage(state, 0.0)  # while it idles: reused, not restarted
    assert third.stdout.readline().strip() == url
    assert "started" not in third.communicate()[1]

    deadline = time.monotonic() + 60
    while alive(keeper) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(keeper), "the keeper did not stop after RLHF_PREFECT_IDLE_S unused"
    assert not (state / URL_FILE).exists() and not (state / PID_FILE).exists()
    assert not [p for p in ours if alive(p)]  # no server left
    assert {p.pid for p in servers(me) if alive(p)} <= before


def test_a_user_url_wins_and_rlhf_down_stops_the_shared_server(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with shared_prefect(state) as url:
        assert url == "http://127.0.0.1:9/api"
    assert not state.exists()  # nothing started, nothing written

    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("RLHF_PREFECT_IDLE_S", "600")
    shared = stage(state, 0.0)
    assert shared.stdout.readline().strip().endswith("/api")
    shared.communicate()
    keeper = psutil.Process(int((state / PID_FILE).read_text()))
    project = tmp_path / "project"
    project.mkdir()
    (project / ".rlhf").symlink_to(state)  # where `rlhf down` looks; the keeper keeps its path
    monkeypatch.chdir(project)
    done = subprocess.run(
        [sys.executable, "-m", "flows.infra.cli", "down"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert "prefect-server" in done.stdout
    assert not alive(keeper)
