"""Lineage that needs no MLflow: the id shared by the stages of one `dvc repro`, and the DVC
hashes of a stage's upstream outputs. Light to import (the laptop side of the worker path)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from ruamel.yaml import YAML


def pipeline_id() -> str:
    """Shared by the stages of one `dvc repro`: $RLHF_PIPELINE_ID, else derived from the DVC
    process that runs this stage (each stage is its child), else unique to this process."""
    if from_env := os.environ.get("RLHF_PIPELINE_ID"):
        return from_env
    import psutil

    process = psutil.Process()
    for ancestor in process.parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(part).name == "dvc" for part in ancestor.cmdline()[:2]):
                process = ancestor
                break
    seed = f"{process.pid}-{process.create_time()}"
    return hashlib.sha1(seed.encode()).hexdigest()[:12]


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
