"""`rlhf up` / `rlhf down`: a local Prefect server and MLflow server on 127.0.0.1 for the UIs (and,
with --worker, a process worker), as background processes recorded in `.rlhf/`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

from flows.deployment import BIN

STATE_DIR = Path(".rlhf")


def up(prefect_port: int, mlflow_port: int, worker_pool: str | None) -> None:
    """Start the services (those already running are left alone) and wait until they answer."""
    STATE_DIR.mkdir(exist_ok=True)
    for name, port in (("prefect", prefect_port), ("mlflow", mlflow_port)):
        if not _running_pid(name) and _listening(port):  # another program's: it would answer
            raise OSError(f"port {port} of 127.0.0.1 is in use: choose another with --{name}-port")
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    quiet = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = _start(
        "prefect",
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        quiet,
    )
    mlflow = _start(
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            "sqlite:///mlflow.db",
            "--artifacts-destination",
            str(Path("mlartifacts").resolve()),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",  # one is plenty for one user's UI and runs, and starts twice as fast
            "1",
        ],
        quiet,
    )
    _wait(f"{prefect_api}/health", "prefect", prefect)
    _wait(f"http://127.0.0.1:{mlflow_port}/health", "mlflow", mlflow)
    if worker_pool:
        # Poll for work every second (default 10 s): a stage should start promptly. The stages
        # it runs log to the MLflow server above unless your environment names another one.
        env = (
            {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
            | quiet
            | {"PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        )
        command = [str(BIN / "prefect"), "worker", "start", "--pool", worker_pool]
        _start("worker", [*command, "--type", "process"], env)
    print(
        f"Prefect UI  http://127.0.0.1:{prefect_port}\n"
        f"MLflow UI   http://127.0.0.1:{mlflow_port}\n\n"
        "Use them from this shell:\n"
        f"  export PREFECT_API_URL={prefect_api}\n"
        f"  export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}\n"
        f"Logs in {STATE_DIR}/*.log; stop with `rlhf down`."
    )


def down(seconds: float = 15.0) -> None:
    """Stop every service `rlhf up` started and wait until they are gone (their ports free): the
    worker first (it would wait for the server), SIGTERM to each one's process group (the
    service, its uvicorn workers) and to its other descendants (the worker's flow runs have
    sessions of their own), SIGKILL to what is left after `seconds`."""
    order = {"worker": 0, "mlflow": 1, "prefect": 2}
    stopped = []
    for pid_file in sorted(STATE_DIR.glob("*.pid"), key=lambda p: order.get(p.stem, -1)):
        pid = _running_pid(pid_file.stem)
        group = _group(pid) if pid else []
        if pid and group:
            _signal(pid, group, signal.SIGTERM)
            deadline = time.monotonic() + seconds
            while any(map(_alive, group)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if any(map(_alive, group)):
                _signal(pid, group, signal.SIGKILL)
            stopped.append(pid_file.stem)
        pid_file.unlink()
    print(f"rlhf: stopped {', '.join(stopped)}" if stopped else "rlhf: nothing was running")


def _start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen | None:
    """Start `command` in a new session (its pid is the process group's id), its output in
    .rlhf/<name>.log; None if `rlhf up` started it before and it still runs."""
    if pid := _running_pid(name):
        print(f"rlhf: {name} already running (pid {pid})")
        return None
    log = (STATE_DIR / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    (STATE_DIR / f"{name}.pid").write_text(str(process.pid))
    return process


def _running_pid(name: str) -> int | None:
    """The pid in .rlhf/<name>.pid if that process runs and is the one `rlhf up` started (not
    a later process that reuses the pid: it would have started after the pid file was written)."""
    pid_file = STATE_DIR / f"{name}.pid"
    try:
        pid = int(pid_file.read_text())
        process = psutil.Process(pid)
        if process.create_time() > pid_file.stat().st_mtime + 1.0 or not _alive(process):
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return pid


def _group(pgid: int) -> list[psutil.Process]:
    """The processes of process group `pgid` and the descendants of its leader."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pgid)
        found = {process.pid: process for process in [leader, *leader.children(recursive=True)]}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                found.setdefault(process.pid, process)
    return list(found.values())


def _signal(pgid: int, group: list[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    for process in group:
        with contextlib.suppress(psutil.Error):
            if _alive(process):
                process.send_signal(sig)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(url: str, name: str, process: subprocess.Popen | None, seconds: float = 60.0) -> None:
    """Until `url` answers; fail early if `process` (None: started earlier) exits meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise OSError(
                f"{name} exited (code {process.returncode}) before answering on {url}: "
                f"see {STATE_DIR}/{name}.log"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(
        f"{name} did not answer on {url} within {seconds:g} s (see {STATE_DIR}/{name}.log)"
    )
