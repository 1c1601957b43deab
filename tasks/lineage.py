"""Lineage that needs no MLflow: the id shared by the stages of one `dvc repro`, and the DVC
hashes of a stage's upstream outputs. Light to import (the laptop side of the worker path)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ruamel.yaml import YAML

if TYPE_CHECKING:
    import psutil


def pipeline_id() -> str:
    """Shared by the stages of one `dvc repro`: $RLHF_PIPELINE_ID, else derived from the DVC
    process that runs this stage (each stage is its descendant), else unique to this process."""
    if from_env := os.environ.get("RLHF_PIPELINE_ID"):
        return from_env
    import psutil

    process = dvc_process() or psutil.Process()
    seed = f"{process.pid}-{process.create_time()}"
    return hashlib.sha1(seed.encode()).hexdigest()[:12]


def dvc_process() -> psutil.Process | None:
    """The `dvc` that runs this process: its nearest ancestor of that name in its session (DVC
    starts a stage through `$SHELL -c`, and dash stays between them; a warm fork's session is
    the warm process's own); None outside `dvc repro`."""
    import psutil

    for ancestor in psutil.Process().parents():
        with contextlib.suppress(psutil.Error, OSError, IndexError):
            if os.getsid(ancestor.pid) != os.getsid(0):
                return None
            if any(Path(part).name == "dvc" for part in ancestor.cmdline()[:2]):
                return ancestor
    return None


def upstream_hashes(
    stage: str, dvc_yaml: Path = Path("dvc.yaml"), dvc_lock: Path = Path("dvc.lock")
) -> dict[str, str]:
    """`dvc.dep.<path>` = DVC's md5 of each dependency another stage produced (from dvc.lock)."""
    if not (dvc_yaml.exists() and dvc_lock.exists()):
        return {}
    yaml = YAML(typ="safe")
    deps = (yaml.load(dvc_yaml).get("stages", {}).get(stage) or {}).get("deps", [])
    outs = {
        out["path"]: out.get("md5", "")
        for locked in (yaml.load(dvc_lock).get("stages") or {}).values()
        for out in locked.get("outs", [])
    }
    return {f"dvc.dep.{dep}": outs[dep] for dep in deps if outs.get(dep)}
