"""`grpo`: Group Relative Policy Optimization of the SFT policy on the prompts: groups of
completions per prompt, advantages relative to the group, rewarded by `grpo.rewards`
(trl.GRPOTrainer)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.online import train_online
from tasks.params import Params
from tasks.tracking import log_summary, stage_run


@stage("grpo")
def grpo(params: Params) -> dict[str, float]:
    """Train, save models/grpo/, log samples and summary metrics."""
    with stage_run("grpo", params):
        metrics = train_online("grpo", params)
        log_samples("grpo", params)
        return log_summary("grpo", metrics)
