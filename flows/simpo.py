"""`simpo`: SimPO from the SFT model — reference-free, length-normalised, margin γ
(trl.experimental.cpo.CPOTrainer with loss_type="simpo", cpo_alpha=0)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.params import Params
from tasks.tracking import log_summary, stage_run
from tasks.trainers import train


@stage("simpo")
def simpo(params: Params) -> dict[str, float]:
    """Train, save models/simpo/, log samples and summary metrics."""
    with stage_run("simpo", params):
        metrics = train("simpo", params)
        log_samples("simpo", params)
        return log_summary("simpo", metrics)
