"""Support for the test suite and the benchmarks; no stage imports it. It lives in the installed
package, as transformers.testing_utils does, so that tests/ and benchmarks/ share one copy.

Params files: the repository's params.yaml with overrides (`write_params`), sizes that keep a
stage in seconds (`SMALL`) and a few steps per stage (`FAST`). Real services on 127.0.0.1: free
ports, background processes that are always stopped, a git copy of the repository with FAST
params, a Prefect server with its own database, a process worker in the copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from flows.infra.deployment import BIN
from flows.infra.services import free_port, stop_process_tree
from flows.infra.transfer import stage_outputs
from tasks.stages import STAGE, STAGES

REPO = Path(__file__).resolve().parents[2]

SMALL: dict[str, Any] = {
    "data.synthetic.num_sft": 200,
    "data.synthetic.num_preference": 200,
    "data.synthetic.num_prompts": 100,
    "model.tiny.hidden_size": 32,
    "model.tiny.intermediate_size": 64,
    "model.tiny.num_layers": 1,
    "model.tiny.num_heads": 2,
}
"""Data and model sizes that keep a stage's run in seconds."""

_FEW_STEPS: dict[str, dict[str, Any]] = {  # stage kind → keys of the stage's own section
    "trl": {"trainer.num_train_epochs": 1, "trainer.max_steps": 3, "trainer.logging_steps": 1},
    "ppo": {
        "num_iterations": 2,
        "rollout_batch_size": 16,
        "mini_batch_size": 8,
        "ppo_epochs": 1,
        "max_new_tokens": 8,
        "checkpoint_every": 1,
        "sample_every": 1,
    },
    "evaluate": {
        "max_prompts": 16,
        "max_new_tokens": 8,
        "num_samples_logged": 4,
        "best_of_n": [2],
    },
}
FAST: dict[str, Any] = (
    SMALL
    | {
        f"{spec.own_section}.{key}": value
        for spec in STAGES
        for key, value in _FEW_STEPS.get(spec.kind, {}).items()
    }
    | {  # held-out evaluations of ppo, grpo, rloo: at the first, a middle and the last step
        f"{spec.name}.{key}": value
        for spec in STAGES
        if spec.online or spec.kind == "ppo"
        for key, value in {"eval_every": 2, "eval_prompts": 8}.items()
    }
)
"""SMALL, and every stage trains only a few steps (checkpoints and samples at each PPO
iteration): the whole pipeline in minutes. From the registry: a new stage is covered."""

DELETE = object()
"""An override's value that removes the key."""

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
"""Who commits in a copy of the repository (`copy_repo`, `dvc exp run`)."""


def write_params(
    path: Path,
    overrides: Mapping[str, Any],
    *,
    base: Path = REPO / "params.yaml",
    new_keys: bool = False,
) -> Path:
    """`base` (the repository's params.yaml) with dotted-key overrides ({'data.eval_fraction':
    0.2}), written to `path` with its comments (ruamel round trip) → `path`.

    A key must exist, except a new key directly under a `<stage>.trainer` mapping (a TRL config
    field) or, with `new_keys`, any new key in an existing mapping (for the tests of unknown
    keys). The value DELETE removes the key. KeyError names an override that is neither.
    """
    yaml = YAML()
    tree = yaml.load(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node: Any = tree
        for depth, key in enumerate(parents, start=1):
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{dotted}: {base} has no {'.'.join(parents[:depth])}")
            node = node[key]
        trainer_field = len(parents) == 2 and parents[1] == "trainer"
        may_add = value is not DELETE and (new_keys or trainer_field)
        if not isinstance(node, dict) or (leaf not in node and not may_add):
            raise KeyError(f"{dotted}: {base} has no such key (only a trainer field may be new)")
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    with path.open("w") as out:
        yaml.dump(tree, out)
    return path


def upstream(name: str) -> list[str]:
    """The stages whose outputs stage `name` reads, directly or not, in pipeline order: what
    must run before it in a fresh copy."""
    outputs = {spec.name: stage_outputs(spec.name, REPO / "dvc.yaml") for spec in STAGES}
    needed: set[str] = set()
    todo = [name]
    while todo:
        for path in STAGE[todo.pop()].inputs:
            for other, outs in outputs.items():
                if other not in needed and any(p == path or path.startswith(f"{p}/") for p in outs):
                    needed.add(other)
                    todo.append(other)
    return [spec.name for spec in STAGES if spec.name in needed]


# ---------------------------------------------------------------- services on 127.0.0.1


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
        """`stop_process_tree` (SIGKILL after `seconds`), then reap the process."""
        stop_process_tree(self.process.pid, seconds)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])


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
    """Services whose logs go to `log_dir`, all stopped when the block ends (even on error)."""
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


def copy_repo(
    dest: Path, overrides: Mapping[str, Any] | None = None, sizes: Mapping[str, Any] = FAST
) -> Path:
    """A git repository at `dest` with the repository's committed and untracked-but-not-ignored
    files, minus every stage output and dvc.lock, and `sizes` (FAST; {} keeps the repository's
    params) plus `overrides`."""
    generated = {"dvc.lock"} | {
        out for spec in STAGES for out in stage_outputs(spec.name, REPO / "dvc.yaml")
    }
    names = set(_git_files(REPO)) | set(_git_files(REPO, "--others", "--exclude-standard"))
    for name in sorted(names):
        source = REPO / name
        if not source.is_file() or any(name == g or name.startswith(g + "/") for g in generated):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    write_params(dest / "params.yaml", dict(sizes) | dict(overrides or {}))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        git = ["git", "-c", "commit.gpgsign=false", *args]
        subprocess.run(
            git, cwd=dest, env=os.environ | GIT_IDENTITY, check=True, capture_output=True
        )
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


def start_mlflow_server(
    started: Services, store: Path, env: dict[str, str], port: int | None = None
) -> str:
    """`mlflow server` on `port` (default: a free one) of 127.0.0.1, its runs in
    `store`/mlflow.db and its artifacts in `store`/artifacts (served through it), without its
    job runner (GenAI jobs: seven busy processes); its tracking URI once healthy."""
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    server = started.start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # one starts twice as fast, and is plenty for a test
            "1",
        ],
        cwd=store,
        env={k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
        | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", server)
    return uri


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
