"""`dpo`: Direct Preference Optimization from the SFT model, frozen SFT as reference
(trl.DPOTrainer)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.params import Params
from tasks.tracking import log_summary, stage_run
from tasks.trainers import train


@stage("dpo")
def dpo(params: Params) -> dict[str, float]:
    """Train, save models/dpo/, log samples and summary metrics."""
    with stage_run("dpo", params):
        metrics = train("dpo", params)
        log_samples("dpo", params)
        return log_summary("dpo", metrics)
