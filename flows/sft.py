"""`sft`: supervised fine-tuning of the base model on prepared SFT data (trl.SFTTrainer)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.params import Params
from tasks.tracking import log_summary, stage_run
from tasks.trainers import train


@stage("sft")
def sft(params: Params) -> dict[str, float]:
    """Train, save models/sft/, log samples and summary metrics."""
    with stage_run("sft", params):
        metrics = train("sft", params)
        log_samples("sft", params)
        return log_summary("sft", metrics)
