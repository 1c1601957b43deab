"""Warm starts (flows/infra/warm.py) with real processes, in a copy of the repository: a stage run
in a fork of the warm process writes what a cold run writes; a `kill -9` of `rlhf` kills its fork,
a SIGTERM reaches it; an edit of the code gets a new warm process; `rlhf down` stops it, and a
service stopped with two SIGTERMs (as `stop_process_tree` sends them) cleans up all the same."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.infra.deployment import BIN
from flows.infra.services import alive, stop_recorded
from flows.infra.testing import clean_env, copy_repo, write_params

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Path]:
    """A copy with FAST params where `prepare` ran (cold), and the env to run `rlhf` in it."""
    root = tmp_path_factory.mktemp("warm")
    repo = copy_repo(root / "repo", {"sft.trainer.max_steps": 2})
    env = clean_env(repo, root) | {"PREFECT_API_URL": prefect_server, "RLHF_WARM": "1"}
    (repo / "env.json").write_text(json.dumps(env))
    run(repo, "prepare")
    yield repo
    stop_recorded(repo / ".rlhf")


def environment(repo: Path) -> dict[str, str]:
    return json.loads((repo / "env.json").read_text())


def run(repo: Path, stage: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "rlhf"), "stage", stage],
        cwd=repo,
        env=environment(repo) | env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def warm_ready(repo: Path, seconds: float = 180.0, other_than: int | None = None) -> int:
    """The pid of the warm process once it serves (one that is not `other_than`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pid_file = repo / ".rlhf" / "warm.pid"
        if pid_file.is_file() and (repo / ".rlhf" / "warm.sock").exists():
            with contextlib.suppress(ValueError):  # a pid file being written
                if (pid := int(pid_file.read_text())) != other_than:
                    return pid
        time.sleep(0.5)
    raise TimeoutError((repo / ".rlhf" / "warm.log").read_text())


def forks(repo: Path, stage: str) -> list[int]:
    """Pids the warm process forked for `rlhf stage <stage>`, from its log."""
    log_file = repo / ".rlhf" / "warm.log"
    log = log_file.read_text() if log_file.is_file() else ""
    return [
        int(line.split()[2].rstrip(":"))
        for line in log.splitlines()
        if f" stage {stage} " in line + " "
    ]


def test_a_warm_stage_writes_what_a_cold_one_writes(repo: Path):
    before = forks(repo, "sft")
    done = run(repo, "sft", RLHF_WARM="0")  # cold for sure: prepare's warm process may be ready
    assert forks(repo, "sft") == before, done.stdout  # no fork ran it
    cold = (repo / "models" / "sft" / "model.safetensors").read_bytes()
    cold_metrics = json.loads((repo / "metrics" / "sft.json").read_text())
    warm_ready(repo)
    before = forks(repo, "sft")
    run(repo, "sft")
    assert len(forks(repo, "sft")) == len(before) + 1  # this one ran in a fork
    assert (repo / "models" / "sft" / "model.safetensors").read_bytes() == cold
    warm_metrics = json.loads((repo / "metrics" / "sft.json").read_text())
    timing = {"train_runtime_s", "train_tokens_per_second"}
    assert {k: v for k, v in warm_metrics.items() if k not in timing} == {
        k: v for k, v in cold_metrics.items() if k not in timing
    }


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_fork_ends_with_its_rlhf(repo: Path, sig: signal.Signals):
    warm_ready(repo)
    before = set(forks(repo, "sft"))
    env = environment(repo)
    slow = write_params(
        repo / "slow.yaml", {"sft.trainer.max_steps": 4000}, base=repo / "params.yaml"
    )
    output = repo / f"slow-{sig.name}.log"  # the fork writes to the caller's streams
    client = subprocess.Popen(
        [str(BIN / "rlhf"), "stage", "sft", "--params", str(slow)],
        cwd=repo,
        env=env,
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not set(forks(repo, "sft")) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    (fork,) = set(forks(repo, "sft")) - before
    time.sleep(3)  # into the stage
    client.send_signal(sig)
    try:
        client.wait(timeout=120)
    except subprocess.TimeoutExpired:
        client.kill()
        state = psutil.Process(fork).status() if psutil.pid_exists(fork) else "gone"
        log = (repo / ".rlhf" / "warm.log").read_text()[-1000:] + output.read_text()[-3000:]
        pytest.fail(f"rlhf did not end on {sig.name}; its fork {fork}: {state}\n{log}")
    process = psutil.Process(fork) if psutil.pid_exists(fork) else None
    deadline = time.monotonic() + 60
    while process is not None and alive(process) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process is None or not alive(process), f"the fork outlived its rlhf ({sig.name})"


def test_an_edit_of_the_code_gets_a_new_warm_process_and_down_stops_it(repo: Path):
    old = warm_ready(repo)
    source = repo / "tasks" / "report.py"
    source.write_text(source.read_text() + "\n# an edit\n")
    run(repo, "prepare")  # cold: the warm process no longer matches the code
    new = warm_ready(repo, other_than=old)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(old) and alive(psutil.Process(old)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(old) or not alive(psutil.Process(old))  # replaced, it left
    down = subprocess.run(
        [str(BIN / "rlhf"), "down"],
        cwd=repo,
        env=environment(repo),
        capture_output=True,
        text=True,
    )
    assert "warm" in down.stdout, down.stdout + down.stderr
    assert not psutil.pid_exists(new) or not alive(psutil.Process(new))
    assert not (repo / ".rlhf" / "warm.sock").exists()


def test_a_repeated_sigterm_does_not_cut_a_services_cleanup_short(tmp_path: Path):
    done = tmp_path / "cleaned"
    script = f"""
import pathlib, sys, time
from flows.infra.services import exit_on_sigterm
exit_on_sigterm()
print("ready", flush=True)
try:
    time.sleep(60)
finally:
    time.sleep(1.0)  # a slow cleanup (unlinking the socket, the URL and pid files)
    pathlib.Path({str(done)!r}).write_text("yes")
"""
    service = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None and service.stdout.readline() == "ready\n"
    service.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # inside the cleanup
    service.send_signal(signal.SIGTERM)
    assert service.wait(timeout=30) == 0
    assert done.read_text() == "yes"
