"""`rloo`: REINFORCE Leave-One-Out of the SFT policy on the prompts: each completion's baseline
is the mean reward of the others for its prompt, rewarded by `rloo.rewards` (trl.RLOOTrainer)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.online import train_online
from tasks.params import Params
from tasks.tracking import log_summary, stage_run


@stage("rloo")
def rloo(params: Params) -> dict[str, float]:
    """Train, save models/rloo/, log samples and summary metrics."""
    with stage_run("rloo", params):
        metrics = train_online("rloo", params)
        log_samples("rloo", params)
        return log_summary("rloo", metrics)
