"""`prepare`: raw sources → TRL datasets in data/prepared/, and the base model in models/base/."""

from __future__ import annotations

import mlflow

from flows.infra.handoff import stage
from tasks.io import atomic_dir
from tasks.params import Params
from tasks.prepare import build_base_model, prepare_data
from tasks.stages import MODELS_DIR, PREPARED_DIR
from tasks.tracking import log_summary, stage_run


@stage("prepare")
def prepare(params: Params) -> dict[str, float]:
    """Validate, convert, dedupe and split the data; build or resolve the base model."""
    with stage_run("prepare", params):
        with atomic_dir(PREPARED_DIR) as data_dir, atomic_dir(MODELS_DIR / "base") as base_dir:
            stats = prepare_data(params.data, params.common.seed, data_dir)
            base = build_base_model(params.model, params.common.seed, data_dir, base_dir)
        mlflow.log_artifact(str(PREPARED_DIR / "stats.json"))
        counts = {
            f"{kind}_{split}_examples": stats[kind][split]
            for kind in ("sft", "preference", "prompts")
            for split in ("train", "eval")
        }
        return log_summary("prepare", counts | base)
