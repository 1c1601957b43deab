"""Experience making (the seed's "make experience" step): sample responses, score them, and
turn scores and log-probs into per-token rewards, advantages and returns.

Shapes as in tasks/scoring.py: B episodes, P prompt tokens, T response tokens; index `t` of a
`[B, T]` tensor is "the state before response token t, and the action t".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tasks.ppo.losses import (
    compute_gae,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_whiten,
)
from tasks.scoring import TokenScorer, final_scores, read_responses, response_logits


@dataclass(frozen=True)
class Experience:
    """One rollout, everything the update needs. Tensors live on the training device."""

    sequences: torch.Tensor  # [B, P+T] prompt + response token ids
    attention_mask: torch.Tensor  # [B, P+T] real prompt tokens and valid response tokens
    position_ids: torch.Tensor  # [B, P+T] counted from each row's first real token
    mask: torch.Tensor  # [B, T] valid response tokens: up to and including EOS
    logprobs: torch.Tensor  # [B, T] actor log-probs of the sampled tokens (at temperature)
    ref_logprobs: torch.Tensor  # [B, T] the same tokens under the frozen reference
    values: torch.Tensor  # [B, T] critic V(s_t)
    scores: torch.Tensor  # [B] reward-model scores as they enter the reward
    raw_scores: torch.Tensor  # [B] reward-model scores before normalisation and penalty
    has_eos: torch.Tensor  # [B] bool: the response ended by itself
    rewards: torch.Tensor  # [B, T] KL-penalised rewards, score on the last valid token
    advantages: torch.Tensor  # [B, T] GAE advantages (whitened if configured)
    returns: torch.Tensor  # [B, T] value targets A + V

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.mask.shape[1]


@torch.no_grad()
def make_experience(
    *,
    actor: Any,
    reference: Any,
    critic: TokenScorer,
    reward: TokenScorer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation: dict[str, Any],
    stop_ids: list[int],
    cfg: Any,
    kl_coef: float,
    score_stats: tuple[float, float] | None,
) -> Experience:
    """Sample one response per prompt and build the experience.

    `actor` is the unwrapped policy (it generates with its KV cache); `generation` holds the
    sampling kwargs of `generate`; `cfg` is the `ppo` params section; `score_stats` is the
    reward model's eval (mean, std) when scores are normalised.
    """
    out = actor.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **generation)
    read = read_responses(out, prompt_mask, stop_ids)
    P, T = prompt_ids.shape[1], read.mask.shape[1]
    responses = out[:, P:]  # [B, T]

    def logprobs(model: Any) -> torch.Tensor:
        logits = response_logits(
            model, out, read.attention_mask, read.position_ids, T, cfg.temperature
        )
        return logprobs_from_logits(logits, responses)

    actor_logprobs, ref_logprobs = logprobs(actor), logprobs(reference)
    values = critic(out, read.attention_mask, read.position_ids)[:, P - 1 : -1]
    raw_scores = final_scores(reward, out, read)
    scores = raw_scores
    if score_stats is not None:
        scores = (scores - score_stats[0]) / max(score_stats[1], 1e-6)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~read.has_eos).float()
    mask = read.mask
    rewards = kl_penalized_rewards(
        actor_logprobs, ref_logprobs, scores, mask, kl_coef, cfg.reward_clip, cfg.kl_estimator
    )
    advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        sequences=out,
        attention_mask=read.attention_mask,
        position_ids=read.position_ids,
        mask=mask,
        logprobs=actor_logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        raw_scores=raw_scores,
        has_eos=read.has_eos,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
