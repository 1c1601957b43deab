"""`reward_model`: a 1-label sequence classifier from the SFT model, Bradley–Terry loss on the
preference pairs (trl.RewardTrainer). Stores its score mean/std for PPO."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.params import Params
from tasks.tracking import log_summary, stage_run
from tasks.trainers import train


@stage("reward_model")
def reward_model(params: Params) -> dict[str, float]:
    """Train, save models/reward_model/, log samples and summary metrics."""
    with stage_run("reward_model", params):
        metrics = train("reward_model", params)
        return log_summary("reward_model", metrics)
