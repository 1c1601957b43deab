"""Real services on 127.0.0.1 for the service tests and benchmarks/deployment_overhead.py: free
ports, background processes that are always stopped, a git copy of the repository with tiny
params, a Prefect server with its own database, a process worker in the copy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tests.sizes import SMALL

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Stages in seconds: SMALL data and model, two optimizer steps per trainer.
TINY: dict[str, Any] = {
    **SMALL,
    **{
        f"{stage}.trainer.{key}": value
        for stage in ("sft", "reward_model", "dpo", "simpo")
        for key, value in {"num_train_epochs": 1, "max_steps": 2, "logging_steps": 1}.items()
    },
    "ppo.num_iterations": 2,
    "ppo.rollout_batch_size": 16,
    "ppo.mini_batch_size": 8,
    "ppo.ppo_epochs": 1,
    "ppo.max_new_tokens": 8,
    "evaluate.max_prompts": 16,
    "evaluate.max_new_tokens": 8,
    "evaluate.num_samples_logged": 4,
}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """A background process in its own session (stopped with its children), output in `log`."""

    def __init__(
        self, name: str, command: list[str], *, cwd: Path, env: dict[str, str], log: Path
    ) -> None:
        self.name, self.command, self.log = name, command, log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, seconds: float = 20.0) -> None:
        """SIGTERM to the process group and to every descendant (a worker's flow runs have
        sessions of their own), SIGKILL to what is left after `seconds`."""
        import psutil

        try:
            leader = psutil.Process(self.process.pid)
            family = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            family = []
        family += [p for p in _group(self.process.pid) if p not in family]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)  # the leader's pid is the group's id
            for process in family:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(sig)
            deadline = time.monotonic() + (seconds if sig == signal.SIGTERM else 10.0)
            while family and time.monotonic() < deadline:
                self.process.poll()  # reap the leader
                family = [p for p in family if _running(p)]  # zombies count as gone
                time.sleep(0.1)
            if not family:
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)  # reap it

    def tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])


def _group(pgid: int) -> list[Any]:
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                found.append(process)
    return found


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Services:
    """The processes a test or benchmark started: `stop_all` stops every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Service] = []

    def start(self, name: str, command: list[str], *, cwd: Path, env: dict[str, str]) -> Service:
        service = Service(name, command, cwd=cwd, env=env, log=self.log_dir / f"{name}.log")
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()

    def logs(self, lines: int = 80) -> str:
        """The last lines of every log in the log directory (services and commands)."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace")
            tail = "".join(text.splitlines(keepends=True)[-lines:])
            parts.append(f"----- {log.name} (last {lines} lines) -----\n{tail}")
        return "\n".join(parts)


@contextlib.contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    started = Services(log_dir)
    try:
        yield started
    finally:
        started.stop_all()


def wait_http(url: str, service: Service | None = None, seconds: float = 180.0) -> None:
    """Until GET `url` answers 200; fails early, with the log, if `service` exits meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        if service is not None and not service.running():
            raise RuntimeError(
                f"{service.name} exited ({service.process.returncode}) before {url} answered:\n"
                f"{service.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = service.tail() if service else ""
            raise TimeoutError(f"{url} did not answer within {seconds:g} s\n{tail}")
        time.sleep(0.3)


def write_params(path: Path, overrides: dict[str, Any]) -> Path:
    """The repository's params.yaml with dotted-key overrides; a `<stage>.trainer.<key>` may be
    new (a TRL config field), other keys must exist (stages come and go: unknown sections of
    TINY are skipped)."""
    yaml = YAML()
    tree = yaml.load(REPO / "params.yaml")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and (leaf in node or parents[-1:] == ["trainer"]):
            node[leaf] = value
    with path.open("w") as out:
        yaml.dump(tree, out)
    return path


def copy_repo(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A git repository at `dest` with the repository's committed and untracked-but-not-ignored
    files, minus every stage output and dvc.lock, and TINY params (plus `overrides`)."""
    stages = YAML(typ="safe").load(REPO / "dvc.yaml")["stages"]
    generated = {"dvc.lock"} | {
        next(iter(out)) if isinstance(out, dict) else out
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for out in stage.get(key, [])
    }
    names = set(_git_files(REPO)) | set(_git_files(REPO, "--others", "--exclude-standard"))
    for name in sorted(names):
        source = REPO / name
        if not source.is_file() or any(name == g or name.startswith(g + "/") for g in generated):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    write_params(dest / "params.yaml", TINY | (overrides or {}))
    env = os.environ | {
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        git = ["git", "-c", "commit.gpgsign=false", *args]
        subprocess.run(git, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def _git_files(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=repo, check=True, capture_output=True
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def clean_env(workspace: Path, root: Path) -> dict[str, str]:
    """The environment of every process run in `workspace`: none of the caller's Prefect,
    MLflow, RLHF, DVC or git settings; the copy's code first; state under `root`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "MLFLOW_", "RLHF_", "DVC_", "GIT_"))
    }
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(workspace),  # the copy's flows/ and tasks/, not the editable install's
        "PYTHONUNBUFFERED": "1",
        "PREFECT_HOME": str(root / "prefect-home"),  # own profile and SQLite database
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
    }


def start_prefect_server(started: Services, cwd: Path, env: dict[str, str]) -> str:
    """`prefect server start` on a free port of 127.0.0.1; its API URL once healthy."""
    port = free_port()
    server = started.start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=env,
    )
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", server)
    return api


def start_worker(started: Services, pool: str, workspace: Path, env: dict[str, str]) -> Service:
    """A process worker on `pool`, polling every second, running flows in `workspace`."""
    return started.start(
        "worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        cwd=workspace,
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1"},
    )


def wait_for_pool(
    api: str,
    pool: str,
    seconds: float = 120.0,
    worker: bool = False,
    give_up: Callable[[], bool] | None = None,
) -> bool:
    """Until the work pool exists (and, with `worker`, has an online worker); False if
    `give_up()` turned true first."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + seconds
    with SyncPrefectClient(api) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(ObjectNotFound):
                client.read_work_pool(pool)
                workers = client.read_workers_for_work_pool(pool) if worker else []
                if not worker or any(w.status == "ONLINE" for w in workers):
                    return True
            if give_up is not None and give_up():
                return False
            time.sleep(0.3)
    missing = " an online worker" if worker else ""
    raise TimeoutError(f"work pool {pool!r} without{missing} after {seconds:g} s")
