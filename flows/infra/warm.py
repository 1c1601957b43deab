"""Warm starts: `rlhf stage` runs in a fork of a process that has already imported the stages'
libraries, instead of importing them again (torch, transformers with peft, TRL's trainers,
datasets, MLflow, Prefect: ~10 s per stage on 2 cores, more than most tiny stages train).

The first `rlhf stage` that finds no warm process starts one (`rlhf warm-serve`, a session of
its own, output in `.rlhf/warm.log`) and runs cold; the next ones send it their command line,
working directory, environment and standard streams over `.rlhf/warm.sock`. It forks; the fork
runs `flows.infra.cli.main` exactly as `rlhf` would and reports its exit code, which `rlhf`
exits with.
`rlhf` forwards SIGINT, SIGTERM and SIGHUP to the fork; if `rlhf` itself dies (`kill -9`), the
fork notices the closed socket and kills itself: the stage never outlives its command.

A warm process serves only commands it matches (`fingerprint`: the Python, its path, the
environment libraries read when imported, and the stages' source files), so an edit of the code
or another HF_HOME gets a fresh one. It exits after `RLHF_WARM_IDLE_S` seconds without a command
(default 120) or when another replaces it; `rlhf down` stops it. RLHF_WARM=0 turns warm starts
off; distributed launches (torchrun, accelerate launch) always run cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SOCKET, FINGERPRINT, PID_FILE, LOG = "warm.sock", "warm.key", "warm.pid", "warm.log"
# Read by libraries when they are imported: a fork must run with the values it was imported with.
IMPORT_ENV = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TRL_",
    "DATASETS_",
    "OMP_",
    "MKL_",
    "CUDA_",
    "PYTORCH_",
    "TORCH",
    "NCCL_",
    "PYTHON",
    "LD_",
)
DISTRIBUTED = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


PACKAGE = Path(__file__).resolve().parents[2]  # where `flows` and `tasks` are imported from


def fingerprint() -> str:
    """What a warm process must share with a command to run it."""
    sources = sorted((PACKAGE / "flows").rglob("*.py")) + sorted((PACKAGE / "tasks").rglob("*.py"))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_ENV))
    mtimes = [(str(f), f.stat().st_mtime_ns) for f in sources]
    blob = json.dumps([sys.executable, str(PACKAGE), env, mtimes])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prestart(state_dir: Path) -> None:
    """Start a warm process for this command's fingerprint if none runs or starts, without
    waiting: it imports while this command waits for the Prefect server."""
    if _eligible() and not _current(state_dir, fingerprint()):
        _start(state_dir, fingerprint())


def _eligible() -> bool:
    return os.environ.get("RLHF_WARM", "1") != "0" and not any(
        key in os.environ for key in DISTRIBUTED
    )


def delegate(argv: list[str], state_dir: Path) -> int | None:
    """Run `argv` in a fork of the warm process: its exit code. None when there is no warm
    process fit to run it (it is started for the next command) or warm starts are off."""
    if not _eligible():
        return None
    key = fingerprint()
    conn = socket.socket(socket.AF_UNIX)
    try:
        if (state_dir / FINGERPRINT).read_text() != key:
            raise ConnectionRefusedError  # another version's, or none
        conn.connect(str(state_dir / SOCKET))
    except OSError:
        conn.close()
        _start(state_dir, key)
        return None
    return _run_in_fork(argv, conn)


def _run_in_fork(argv: list[str], conn: socket.socket) -> int:
    from tasks.lineage import pipeline_id

    env = os.environ | {"RLHF_PIPELINE_ID": pipeline_id(), "RLHF_WARM": "0"}  # the fork: no again
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(env)}).encode()
    socket.send_fds(conn, [request], [0, 1, 2])
    reply = conn.makefile("r")
    child = int(reply.readline())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: os.kill(child, number))
    code = reply.readline().strip()
    return int(code) if code else 128 + signal.SIGKILL  # the fork died without a word


def _start(state_dir: Path, key: str) -> None:
    """A warm process for `key`, in the background, unless one is already starting (a marker
    younger than a minute: an older one was left by a warm process killed while importing)."""
    state_dir.mkdir(exist_ok=True)
    marker = state_dir / f"warm-{key}.starting"
    with contextlib.suppress(OSError):
        if time.time() - marker.stat().st_mtime < 60:
            return
    marker.touch()
    with (state_dir / LOG).open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "flows.infra.cli", "warm-serve", str(state_dir.resolve()), key],
            cwd=state_dir,  # not the project: `flows` comes from where this one came from
            env=os.environ | {"PYTHONPATH": str(PACKAGE)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def serve(state_dir: Path, key: str, run: Callable[[list[str]], int]) -> int:
    """The warm process: import everything, then fork per command until idle or replaced;
    a fork runs `run(argv)` (flows.infra.cli.main)."""
    from flows.infra.services import exit_on_sigterm

    idle_s = float(os.environ.get("RLHF_WARM_IDLE_S", "120"))
    try:
        _preload()
        listener = socket.socket(socket.AF_UNIX)
        staging = state_dir / f"{SOCKET}.{os.getpid()}"
        listener.bind(str(staging))
        listener.listen(8)
        os.replace(staging, state_dir / SOCKET)
        (state_dir / PID_FILE).write_text(str(os.getpid()))
        (state_dir / FINGERPRINT).write_text(key)
        print(f"warm: pid {os.getpid()} ready for {key}", flush=True)
    finally:
        (state_dir / f"warm-{key}.starting").unlink(missing_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks are reaped by the kernel
    exit_on_sigterm()  # `rlhf down`: clean up first
    listener.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s and _current(state_dir, key):
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                last = time.monotonic()
                _fork(conn, listener, run)
    finally:
        if _current(state_dir, key):
            for name in (SOCKET, FINGERPRINT, PID_FILE):
                (state_dir / name).unlink(missing_ok=True)
    return 0


def _current(state_dir: Path, key: str) -> bool:
    with contextlib.suppress(OSError):
        return (state_dir / FINGERPRINT).read_text() == key
    return False


def _preload() -> None:
    """Import what the stages import, and the TRL trainers and configs they look up by name."""
    import importlib

    from tasks.params import trl_config_class
    from tasks.stages import STAGES

    for spec in STAGES:
        importlib.import_module(f"flows.{spec.name}")
        if spec.kind == "trl":
            trl_config_class(spec.name)
            module, name = str(spec.trainer).split(":")
            getattr(importlib.import_module(module), name)
    import matplotlib

    matplotlib.use("Agg")  # evaluate's chart, files only
    import matplotlib.pyplot
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (MLflow's SQLite store: ~1 s)
    import peft  # noqa: F401  (LoRA; transformers' trainer imports it when installed)


def _fork(conn: socket.socket, listener: socket.socket, run: Callable[[list[str]], int]) -> None:
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(message)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{child}\n".encode())
        conn.close()
        print(f"warm: pid {child}: {' '.join(request['argv'])} in {request['cwd']}", flush=True)
        return
    listener.close()
    code = 1
    try:
        code = _child(conn, request, fds, run)
    finally:  # whatever escapes the command, the fork never returns into the server's loop
        os._exit(code)


def _child(
    conn: socket.socket, request: dict, fds: list[int], run: Callable[[list[str]], int]
) -> int:
    """In the fork: become the command (streams, directory, environment), run it, report."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    import prefect.context

    prefect.context.refresh_global_settings_context()  # this command's PREFECT_* settings
    done = threading.Event()
    threading.Thread(target=_die_with_caller, args=(conn, done), daemon=True).start()
    try:
        code = run(request["argv"][1:])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    done.set()
    with contextlib.suppress(OSError):
        conn.sendall(f"{code}\n".encode())
    return code


def _die_with_caller(conn: socket.socket, done: threading.Event) -> None:
    """`rlhf` closed the socket before the stage ended: it was killed; so is the stage."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGKILL)
