"""`pipeline`: the whole pipeline as one Prefect deployment — `dvc repro` on the worker, so DVC
still decides what to rebuild. Its stages run in-process there (RLHF_ORCHESTRATION=local)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger


@flow(name="pipeline")
def pipeline(targets: list[str] | None = None, force: bool = False) -> None:
    """Run `dvc repro [--force] [targets...]` in the workspace; fail if it fails."""
    logger = get_run_logger()
    command = [str(Path(sys.executable).parent / "dvc"), "repro", *(["--force"] if force else [])]
    command += targets or []
    env = os.environ | {"RLHF_ORCHESTRATION": "local"}  # not back to the worker pool
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            logger.info(line.rstrip())
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
