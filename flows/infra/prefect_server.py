"""One Prefect server for every stage of a `dvc repro`, instead of a temporary one per stage.

Without `PREFECT_API_URL`, Prefect starts a temporary server inside each process (seconds per
stage, and it survives a `kill -9` of its parent). `shared_api()` gives a stage, in order:

1. the user's `PREFECT_API_URL`, untouched;
2. the server `rlhf up` started (`.rlhf/prefect.url`), if it answers;
3. the shared server (`.rlhf/prefect-server.url`) another stage started, if it answers;
4. else it starts that server: `python -m flows.infra.prefect_server`, a keeper process in a session
   of its own that runs `prefect server start` on a free port of 127.0.0.1 and stops it (and
   itself) once no stage has used it for `RLHF_PREFECT_IDLE_S` seconds (default 120).

A lock (`.rlhf/prefect-server.lock`) makes concurrent stages start one server, not two. Each
stage holds a shared lock on `.rlhf/prefect-server.users` while it runs: the keeper never stops a
server a stage is using, and a killed stage releases its lock with its process. Ephemeral mode
is turned off in the stage, so nothing silently starts a second, temporary server.
`rlhf down` stops the shared server too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tasks.stages import state_dir as project_state_dir

URL_FILE = "prefect-server.url"  # the shared server's API URL, written once it answers
PID_FILE = "prefect-server.pid"  # the keeper's pid (its session's id)
LOCK_FILE = "prefect-server.lock"  # held while a stage looks for the server or starts it
USERS_FILE = "prefect-server.users"  # shared-locked by every stage that uses the server
LOG_FILE = "prefect-server.log"
START_S = 90.0  # a cold start (new database, migrations) takes ~20 s on a busy 2-core machine


@contextlib.contextmanager
def shared_prefect(state_dir: Path | None = None) -> Iterator[str]:
    """For the block: the Prefect API URL this stage uses (see the module docstring), set with
    ephemeral mode off in `os.environ` (read by Prefect when it loads). The block counts as a
    use of the shared server, which stays up until it ends. `state_dir`: the project's `.rlhf/`
    unless given."""
    if url := os.environ.get("PREFECT_API_URL"):
        yield url
        return
    state_dir = state_dir or project_state_dir()
    state_dir.mkdir(exist_ok=True)
    with _locked(state_dir / USERS_FILE, fcntl.LOCK_SH):  # before the URL: see keep()
        url = _answering(state_dir / "prefect.url")  # `rlhf up`'s
        if not url:
            with _locked(state_dir / LOCK_FILE, fcntl.LOCK_EX):
                url = _answering(state_dir / URL_FILE) or _start(state_dir)
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
        yield url


def _answering(url_file: Path) -> str | None:
    """The URL in `url_file` if a server answers there."""
    try:
        url = url_file.read_text().strip()
    except OSError:
        return None
    return url if _healthy(url) else None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _start(state_dir: Path) -> str:
    """Start the keeper (and through it the server); its URL once the server answers."""
    (state_dir / URL_FILE).unlink(missing_ok=True)
    with (state_dir / LOG_FILE).open("ab") as log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "flows.infra.prefect_server", str(state_dir.resolve())],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in the stage's process group: it outlives the stage
            env=os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
    began = time.monotonic()
    while time.monotonic() < began + START_S:
        if url := _answering(state_dir / URL_FILE):
            print(
                f"rlhf: started a shared Prefect server at {url.removesuffix('/api')} in "
                f"{time.monotonic() - began:.1f} s (it stops after {_idle_s():g} s unused; "
                "`rlhf down` stops it now)",
                file=sys.stderr,
            )
            return url
        if keeper.poll() is not None:
            break
        time.sleep(0.2)
    from tasks.errors import UserError

    raise UserError(
        f"the shared Prefect server did not start (see {state_dir / LOG_FILE}); "
        "or set PREFECT_API_URL to a server of yours"
    )


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[IO[str]]:
    with path.open("a") as handle:
        fcntl.flock(handle, mode)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _in_use(users: Path) -> bool:
    """A stage holds its shared lock on `users` (an exclusive lock cannot be taken)."""
    with users.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def keep(state_dir: Path, idle_s: float) -> int:
    """The keeper: run `prefect server start` on a free port, publish its URL once it answers,
    stop it after `idle_s` seconds without a user (or when the server exits)."""
    from flows.infra.services import exit_on_sigterm, free_port, server_env, stop_process_tree

    exit_on_sigterm()  # `rlhf down`: clean up, then stop
    port = free_port()
    prefect = str(Path(sys.executable).parent / "prefect")
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        start_new_session=True,
        env=os.environ | server_env(url, state_dir / "prefect-server.db"),
    )
    (state_dir / PID_FILE).write_text(str(os.getpid()))
    try:
        while server.poll() is None and not _healthy(url):
            time.sleep(0.2)
        (state_dir / URL_FILE).write_text(url)
        last_used = time.monotonic()
        while server.poll() is None:
            time.sleep(1.0)
            if _in_use(state_dir / USERS_FILE):
                last_used = time.monotonic()
            elif time.monotonic() - last_used > idle_s and _retire(state_dir):
                break
    finally:
        (state_dir / URL_FILE).unlink(missing_ok=True)
        (state_dir / PID_FILE).unlink(missing_ok=True)
        stop_process_tree(server.pid, 15.0)
    return 0


def _retire(state_dir: Path) -> bool:
    """Withdraw the URL unless a stage took the server meanwhile. A stage takes its shared lock
    on USERS_FILE before it reads the URL, so once the URL is gone, under LOCK_FILE, with no
    user, no stage can be about to use this server."""
    with _locked(state_dir / LOCK_FILE, fcntl.LOCK_EX):
        if _in_use(state_dir / USERS_FILE):
            return False
        (state_dir / URL_FILE).unlink(missing_ok=True)
        return True


def _idle_s() -> float:
    return float(os.environ.get("RLHF_PREFECT_IDLE_S", "120"))


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), _idle_s()))
