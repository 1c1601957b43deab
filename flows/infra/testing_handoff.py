"""For the tests and benchmark of the hand-off (flows/infra/handoff.py) only: a laptop and a
worker that share no disk, on one machine. They share a bare git repository (the git remote), a
local-directory DVC remote and the services — a Prefect server, an MLflow server, and a process
worker started in the worker's own clone of the git remote. Each side has its own environment:
state, caches and home directory under its own directory.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.infra.deployment import BIN
from flows.infra.testing import (
    GIT_IDENTITY,
    Services,
    clean_env,
    copy_repo,
    start_mlflow_server,
    start_prefect_server,
    wait_for_pool,
)


@dataclass
class Hosts:
    root: Path  # the laptop's side: its workspace, logs, the servers' state
    laptop: Path
    worker: Path  # the worker's clone, where it was started and keeps its checkout
    shared: Path  # what both sides reach: the git remote (origin.git), the DVC remote (dvc)
    env: dict[str, str]  # the laptop's environment
    api: str
    mlflow: str

    @property
    def checkout(self) -> Path:
        return self.worker / ".rlhf" / "checkout"

    @property
    def remote(self) -> Path:
        return self.shared / "dvc"

    @property
    def origin(self) -> Path:
        return self.shared / "origin.git"

    def run(self, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        """A laptop command (its output also appended to logs/<command>-<verb>.log)."""
        done = subprocess.run(
            list(args),
            cwd=cwd or self.laptop,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        with (self.root / "logs" / f"{Path(args[0]).name}-{args[1]}.log").open("a") as log:
            log.write(f"$ {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        return done

    def git(self, *args: str, cwd: Path | None = None) -> str:
        done = self.run("git", "-c", "commit.gpgsign=false", *args, cwd=cwd)
        if done.returncode:
            raise RuntimeError(f"git {' '.join(args)}: {done.stderr}")
        return done.stdout.strip()

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)


@contextlib.contextmanager
def laptop_and_worker(
    started: Services, root: Path, pool: str, overrides: dict[str, Any] | None = None
) -> Iterator[Hosts]:
    """The two sides, ready: the laptop's copy of the repository (FAST params, `overrides`,
    the pool) pushed to the git remote with the DVC remote as its default, the clone
    deployments registered, the worker online. The worker's and the shared directories live
    beside `root`, not in it, and are removed after the block."""
    (root / "logs").mkdir(parents=True)
    with _scratch("rlhf-shared-") as shared, _scratch("rlhf-worker-") as home:
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(shared / "origin.git")])
        laptop = copy_repo(root / "laptop", {"orchestration.work_pool": pool} | (overrides or {}))
        (root / "state").mkdir()
        env = clean_env(laptop, root / "state") | GIT_IDENTITY
        env["PREFECT_API_URL"] = api = start_prefect_server(started, root, env)
        env["MLFLOW_TRACKING_URI"] = uri = start_mlflow_server(started, root / "mlflow", env)
        hosts = Hosts(root, laptop, home / "clone", shared, env, api, uri)
        hosts.git("remote", "add", "origin", str(hosts.origin))
        added = hosts.run(str(BIN / "dvc"), "remote", "add", "-d", "storage", str(hosts.remote))
        if added.returncode:
            raise RuntimeError(f"dvc remote add failed: {added.stderr}")
        hosts.git("commit", "-qam", "DVC remote")
        hosts.git("push", "-q", "origin", "HEAD:main")
        deploy = hosts.run(str(BIN / "rlhf"), "deploy", "--pool", pool, "--workspace", "clone")
        if deploy.returncode:
            raise RuntimeError(f"rlhf deploy failed:\n{deploy.stdout}{deploy.stderr}")
        worker_env = _worker_env(hosts, home)
        clone = ["git", "clone", "-q", str(hosts.origin), str(hosts.worker)]
        subprocess.run(clone, env=worker_env, check=True, capture_output=True)
        command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        started.start("worker", command, cwd=hosts.worker, env=worker_env)
        wait_for_pool(api, pool, worker=True)
        yield hosts


def _worker_env(hosts: Hosts, home: Path) -> dict[str, str]:
    """The worker's own environment: its clone's code, its own state and caches under `home`,
    the servers' URLs — nothing of the laptop's directory."""
    state = home / "state"
    env = clean_env(hosts.worker, state) | {
        "PREFECT_API_URL": hosts.api,
        "MLFLOW_TRACKING_URI": hosts.mlflow,
        "HOME": str(home),
        "HF_HOME": str(state / "hf"),
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "XDG_CACHE_HOME": str(state / "cache"),
    }
    for folder in (state / "prefect-home", state / "hf"):
        folder.mkdir(parents=True)
    return env


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    """A directory in the system's temp dir, removed after the block."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
