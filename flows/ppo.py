"""`ppo`: RLHF of the SFT policy against the reward model with our PPO (tasks/ppo/)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.generation import log_samples
from tasks.params import Params
from tasks.ppo.train import train_ppo
from tasks.tracking import log_summary, stage_run


@stage("ppo")
def ppo(params: Params) -> dict[str, float]:
    """Rollout and update tasks per iteration, save models/ppo/, log samples and the summary."""
    with stage_run("ppo", params):
        metrics = train_ppo(params)
        log_samples("ppo", params)
        return log_summary("ppo", metrics)
