"""MLflow: one run per stage, named after it, with lineage tags; summary metrics also to DVC.

The run is opened by the stage's flow and is the active run of its thread, so transformers'
MLflow callback (TRL trainers) logs its per-step metrics into it. An exception inside the run
marks it FAILED (KILLED on Ctrl-C): no run is left RUNNING.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import mlflow

from tasks.config import METRICS_DIR, STAGE_SECTIONS, Params, TrackingConfig
from tasks.io import write_json
from tasks.lineage import pipeline_id, upstream_hashes

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "peft",
    "prefect",
    "mlflow",
    "dvc",
)
# Whole key words only: `hf_token` is a secret, `max_new_tokens` is not.
_SECRET = re.compile(
    r"(^|_)(token|secret|password|passwd|api_?key|apikey|credentials?)$", re.IGNORECASE
)


def tracking_uri(cfg: TrackingConfig) -> str:
    """params → $MLFLOW_TRACKING_URI → a SQLite file in the working directory."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_main_process() -> bool:
    """False in the extra processes of `accelerate launch` (RANK > 0): only rank 0 tracks and
    writes outputs, the others train."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[mlflow.ActiveRun | None]:
    """Open the stage's MLflow run (tags, flattened params) for the duration of the block."""
    if not is_main_process():
        yield None
        return
    mlflow.set_tracking_uri(tracking_uri(params.tracking))
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name=stage, tags=run_tags(stage, params)) as run:
        sections = {name: getattr(params, name).model_dump() for name in STAGE_SECTIONS[stage]}
        mlflow.log_params(flatten(sections))
        log.info(
            "MLflow run %s (%s) in experiment '%s'",
            run.info.run_id,
            stage,
            params.tracking.experiment,
        )
        try:
            yield run
        except KeyboardInterrupt:  # MLflow would record FAILED; a user's Ctrl-C is KILLED
            mlflow.end_run("KILLED")
            raise


def log_summary(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """Log the stage's summary metrics to the active run and write `metrics/<stage>.json`."""
    if not is_main_process():
        return metrics
    mlflow.log_metrics(metrics)
    write_json(METRICS_DIR / f"{stage}.json", metrics)
    return metrics


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sft': {'trainer': {'learning_rate': 1e-3}}} → {'sft.trainer.learning_rate': 1e-3};
    keys that look like secrets are dropped, so a token never becomes an MLflow param."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if _SECRET.search(key):
            continue
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_tags(stage: str, params: Params) -> dict[str, str]:
    """Lineage: stage, seed, git commit, pipeline id, library versions, upstream DVC hashes."""
    tags = {
        "rlhf.stage": stage,
        "rlhf.seed": str(params.common.seed),
        "rlhf.pipeline_id": pipeline_id(),
        "mlflow.source.git.commit": _git("rev-parse", "HEAD") or "unknown",
        "rlhf.git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
    }
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"version.{name}"] = importlib.metadata.version(name)
    return tags | upstream_hashes(stage)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
