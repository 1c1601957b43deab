"""The `ppo` section of `params.yaml` (our PPO, tasks/ppo/): frozen, a docstring per field."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config import LoraConfig, Section


class AdaptiveKLConfig(Section):
    target: float = Field(gt=0)
    """KL (nats per sequence) the controller steers towards."""
    horizon: int = Field(ge=1)
    """Episodes over which the coefficient adapts (Ziegler et al. 2019)."""


class PPOConfig(Section):
    num_iterations: int = Field(ge=1)
    """Rollout + update iterations."""
    rollout_batch_size: int = Field(ge=1)
    """Prompts per rollout (episodes per iteration)."""
    mini_batch_size: int = Field(ge=1)
    """Episodes per gradient step; must divide rollout_batch_size."""
    ppo_epochs: int = Field(ge=1)
    """Passes over each rollout's experience."""
    max_new_tokens: int = Field(ge=1)
    """Longest generated response."""
    temperature: float = Field(gt=0)
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_k: int = Field(ge=0)
    """Top-k sampling, 0 to disable."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus sampling, 1.0 to disable."""
    actor_lr: float = Field(gt=0)
    """AdamW learning rate of the actor (policy)."""
    critic_lr: float = Field(gt=0)
    """AdamW learning rate of the critic (value model)."""
    lr_scheduler: Literal["constant", "linear", "cosine"]
    """Schedule of both learning rates over all update steps."""
    warmup_steps: int = Field(ge=0)
    """Linear warm-up steps of both schedules."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(gt=0)
    """Gradient clipping (global L2 norm), per model."""
    gamma: float = Field(ge=0, le=1)
    """Discount γ of GAE."""
    lam: float = Field(ge=0, le=1)
    """λ of GAE."""
    clip_range: float = Field(gt=0)
    """ε of the clipped policy ratio."""
    clip_range_value: float = Field(gt=0)
    """ε_v of the clipped value loss."""
    whiten_advantages: bool
    """Normalise advantages over each rollout."""
    kl_coef: float = Field(ge=0)
    """β of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"]
    """Per-token KL estimator in the reward: k1 = log π − log π_ref, k3 = Schulman's."""
    adaptive_kl: AdaptiveKLConfig | None
    """Adaptive KL controller; null keeps kl_coef fixed."""
    reward_clip: float = Field(gt=0)
    """Scores are clipped to ±reward_clip before entering the reward."""
    normalize_scores: bool
    """Standardise reward-model scores with the mean/std stored by the reward_model stage."""
    missing_eos_penalty: float | None
    """Subtracted from the score of responses that hit max_new_tokens without EOS; null: off."""
    ptx_coef: float = Field(ge=0)
    """PPO-ptx: weight of the LM loss on SFT batches added to the actor loss; 0 disables."""
    ptx_batch_size: int = Field(ge=1)
    """SFT examples per PPO-ptx step."""
    gradient_checkpointing: bool
    """Trade compute for memory in actor and critic."""
    checkpoint_every: int = Field(ge=1)
    """Iterations between resumable checkpoints."""
    sample_every: int = Field(ge=1)
    """Iterations between sample-generation tables logged to MLflow."""
    eval_every: int | None = Field(default=None, ge=1)
    """Iterations between held-out evaluations of the policy (gold, proxy and KL to SFT: before
    the first iteration, every eval_every iterations and after the last; tasks/heldout.py);
    null: none."""
    eval_prompts: int = Field(default=64, ge=1)
    """Held-out prompts each of those evaluations answers (the first ones, greedy)."""
    lora: LoraConfig | None = None
    """LoRA for actor and critic; the reference and the reward model are then their bases with
    the adapters disabled (two base models in memory instead of four); null for full
    fine-tuning."""

    @model_validator(mode="after")
    def _batches_fit(self) -> PPOConfig:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size: {self.mini_batch_size} does not divide "
                f"rollout_batch_size {self.rollout_batch_size}"
            )
        return self
