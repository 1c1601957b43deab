"""`rlhf up` / `rlhf down`: a local Prefect server and MLflow server on 127.0.0.1 for the UIs (and,
with --worker, a process worker), as background processes recorded in `.rlhf/`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from flows.deployment import BIN

STATE_DIR = Path(".rlhf")


def up(prefect_port: int, mlflow_port: int, worker_pool: str | None) -> None:
    """Start the services (those already running are left alone) and wait until they answer."""
    STATE_DIR.mkdir(exist_ok=True)
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    quiet = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    _start(
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
    _start(
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
        ],
        quiet,
    )
    _wait(f"{prefect_api}/health", "prefect")
    _wait(f"http://127.0.0.1:{mlflow_port}/health", "mlflow")
    if worker_pool:
        # Poll for work every second (default 10 s): a stage should start promptly.
        env = quiet | {"PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
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


def down() -> None:
    """Stop every service `rlhf up` started."""
    stopped = []
    for pid_file in sorted(STATE_DIR.glob("*.pid")):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)  # the service and its children (uvicorn, gunicorn)
            stopped.append(pid_file.stem)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    print(f"rlhf: stopped {', '.join(stopped)}" if stopped else "rlhf: nothing was running")


def _start(name: str, command: list[str], env: dict[str, str]) -> None:
    pid_file = STATE_DIR / f"{name}.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"rlhf: {name} already running (pid {pid_file.read_text()})")
        return
    log = (STATE_DIR / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    pid_file.write_text(str(process.pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(url: str, name: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(
        f"{name} did not answer on {url} within {seconds:g} s (see {STATE_DIR}/{name}.log)"
    )
