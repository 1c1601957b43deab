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

from flows.infra.deployment import BIN
from tasks.errors import UserError
from tasks.stages import project_root, state_dir

# Prefect's setting for its server's database, under both its names (3.x and the older alias).
DATABASE_ENV = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def up(prefect_port: int, mlflow_port: int, worker_pool: str | None) -> None:
    """Start the services (those already running are left alone) and wait until they answer."""
    state = state_dir()
    state.mkdir(exist_ok=True)
    for name, port in (("prefect", prefect_port), ("mlflow", mlflow_port)):
        ours = _running_pid(state / f"{name}.pid")
        if not ours and listening(port):  # another program's: it would answer
            raise UserError(
                f"port {port} of 127.0.0.1 is in use: choose another with --{name}-port"
            )
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
        quiet | server_env(prefect_api, state / "prefect.db"),
    )
    mlflow = _start(
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{project_root().resolve() / 'mlflow.db'}",
            "--artifacts-destination",
            str(project_root().resolve() / "mlartifacts"),
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
    # stages use it (flows/infra/prefect_server.py)
    (state / "prefect.url").write_text(prefect_api)
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
        f"Logs in {state_dir()}/*.log; stop with `rlhf down`."
    )


def down(seconds: float = 15.0) -> None:
    """`rlhf down`: stop what `rlhf up` and the stages started (`stop_recorded`)."""
    stopped = stop_recorded(state_dir(), seconds)
    print(f"rlhf: stopped {', '.join(stopped)}" if stopped else "rlhf: nothing was running")


def stop_recorded(state_dir: Path, seconds: float = 15.0) -> list[str]:
    """Stop every process recorded in `state_dir` — `rlhf up`'s services, the stages' shared
    Prefect server and warm process — and wait until they are gone (their ports free): the
    worker first (it would wait for the server), each with `stop_process_tree` (the service,
    its uvicorn workers, the worker's flow runs), SIGKILL to what is left after `seconds`.
    The names of those stopped."""
    (state_dir / "prefect.url").unlink(missing_ok=True)
    order = {"worker": 0, "mlflow": 1, "prefect": 2}
    stopped = []
    for pid_file in sorted(state_dir.glob("*.pid"), key=lambda p: order.get(p.stem, -1)):
        if pid := _running_pid(pid_file):
            stop_process_tree(pid, seconds)
            stopped.append(pid_file.stem)
        pid_file.unlink(missing_ok=True)
    return stopped


def stop_process_tree(pid: int, seconds: float) -> None:
    """Stop process `pid` (started in a session of its own: its pid is its process group's id),
    the rest of its group and its other descendants (a worker's flow runs have sessions of their
    own), and wait until they are gone: SIGTERM to all of them, SIGKILL to what is left after
    `seconds`. `rlhf down` and the services of the tests and benchmarks stop this way."""
    family = process_family(pid)
    for sig, wait in ((signal.SIGTERM, seconds), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # also reaches members that started after `family` was read
        for process in family:
            with contextlib.suppress(psutil.Error):
                if alive(process):
                    process.send_signal(sig)
        deadline = time.monotonic() + wait
        while (family := [p for p in family if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not family:
            return


def process_family(pid: int) -> list[psutil.Process]:
    """Process `pid`, its descendants, and the other processes of process group `pid`."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        found = {process.pid: process for process in [leader, *leader.children(recursive=True)]}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pid:
                found.setdefault(process.pid, process)
    return list(found.values())


def exit_on_sigterm() -> None:
    """A service's SIGTERM exits through its `finally` (its socket, URL and pid files go); a
    repeat is ignored, or it would cut that cleaning short: `stop_process_tree` signals the
    group and then each member, so a service gets two."""
    import sys

    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)


def alive(process: psutil.Process) -> bool:
    """It runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """Something accepts connections on `port` of 127.0.0.1."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen | None:
    """Start `command` in a new session (its pid is the process group's id), its output in
    .rlhf/<name>.log; None if `rlhf up` started it before and it still runs."""
    if pid := _running_pid(state_dir() / f"{name}.pid"):
        print(f"rlhf: {name} already running (pid {pid})")
        return None
    log = (state_dir() / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    (state_dir() / f"{name}.pid").write_text(str(process.pid))
    return process


def _running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process runs and is the one that wrote it (not a later
    process that reuses the pid: it would have started after the pid file was written)."""
    try:
        pid = int(pid_file.read_text())
        process = psutil.Process(pid)
        if process.create_time() > pid_file.stat().st_mtime + 1.0 or not alive(process):
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return pid


def _wait(url: str, name: str, process: subprocess.Popen | None, seconds: float = 60.0) -> None:
    """Until `url` answers; fail early if `process` (None: started earlier) exits meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise UserError(
                f"{name} exited (code {process.returncode}) before answering on {url}: "
                f"see {state_dir()}/{name}.log"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise UserError(
        f"{name} did not answer on {url} within {seconds:g} s (see {state_dir()}/{name}.log)"
    )


def server_env(url: str, database: Path) -> dict[str, str]:
    """The environment of a Prefect server of the project's: its UI calls its own API at `url`
    (by default the UI calls $PREFECT_API_URL or port 4200, whatever `--port` the server was
    given), and its runs go to `database` in `.rlhf/` (by default every server on the machine
    opens `$PREFECT_HOME/prefect.db`, several servers on one SQLite file). A database URL of
    the user's environment wins."""
    env = {"PREFECT_API_URL": url, "PREFECT_UI_API_URL": url}
    if not any(key in os.environ for key in DATABASE_ENV):
        env[DATABASE_ENV[0]] = f"sqlite+aiosqlite:///{database.resolve()}"
    return env


def end_with_launcher() -> None:
    """Under `dvc repro`, `torchrun` or `accelerate launch`, a killed launcher takes the stage
    with it: a thread waits on the launcher's pidfd and sends us SIGTERM when it exits, and the
    stage stops as on any SIGTERM. Linux's PR_SET_PDEATHSIG would watch only the direct parent,
    and DVC runs a stage through `$SHELL -c`: dash (`/bin/sh`, used when SHELL is unset) stays
    between the two. torchrun starts its ranks in sessions of their own, so a `kill -9` of it
    would otherwise leave them training. Not for other parents: `nohup rlhf stage ppo &` from a
    shell outlives the shell on purpose."""
    import select
    import sys
    import threading

    from tasks.lineage import dvc_process

    if sys.platform != "linux":
        return
    try:
        elastic = "TORCHELASTIC_RUN_ID" in os.environ  # a rank of torchrun / accelerate launch
        if (launcher := psutil.Process(os.getppid()) if elastic else dvc_process()) is None:
            return
        pidfd: int | None = os.pidfd_open(launcher.pid)
    except ProcessLookupError:
        pidfd = None
    except (psutil.Error, OSError):  # no such parent, or a kernel before 5.3
        return
    if pidfd is None or not launcher.is_running():  # it died (its pid reused) before we watched
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="rlhf-launcher", daemon=True).start()
