"""Experience making (the seed's "make experience" step): sample responses, score them, and
turn scores and log-probs into per-token rewards, advantages and returns.

Shapes: B episodes, P prompt tokens (left-padded), T response tokens (right-padded after EOS).
The prompt and the response are one sequence `[B, P + T]`; the logits at positions
`P - 1 … P + T - 2` predict the response tokens, so every per-token tensor is `[B, T]` and index
`t` is "the state before response token t, and the action t".
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


class TokenScorer(torch.nn.Module):
    """A 1-label sequence classifier read at every position: `[B, L] ids → [B, L]` scores.

    The critic (values V(s_t) for each token) and the reward model (its score at the last valid
    token) are both this: the classifier's backbone and score head, without the classifier's
    pooling, which picks "the last non-pad token" and is wrong when pad == EOS. A module rather
    than a function so that accelerate/DDP wraps the forward that computes the gradients.
    """

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        # peft wraps the classifier; its LoRA layers live inside the base model it returns.
        inner = getattr(self.classifier, "get_base_model", lambda: self.classifier)()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


def response_mask(
    responses: torch.Tensor, stop_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` generated ids → (mask `[B, T]` long, has_eos `[B]` bool).

    The mask covers every token up to and including the first stop token; a row without one
    (cut at max_new_tokens) is valid to its end. Works when pad == EOS: only the first counts.
    """
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_eos = is_stop.any(dim=1)
    last = torch.where(has_eos, is_stop.int().argmax(dim=1), responses.shape[1] - 1)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions <= last.unsqueeze(1)).long(), has_eos


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logits(
    model: Any,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    temperature: float,
) -> torch.Tensor:
    """Logits `[B, T, V]` predicting the response tokens, divided by the sampling temperature
    so that log-probs are those of the distribution the tokens were sampled from."""
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_length + 1,  # the lm head only where it is needed
        use_cache=False,
    ).logits
    return logits[:, :-1].float() / temperature


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
    responses = out[:, prompt_ids.shape[1] :]  # [B, T]
    mask, has_eos = response_mask(responses, stop_ids)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    position_ids = positions_from_mask(attention_mask)
    T = responses.shape[1]

    def logprobs(model: Any) -> torch.Tensor:
        logits = response_logits(model, out, attention_mask, position_ids, T, cfg.temperature)
        return logprobs_from_logits(logits, responses)

    actor_logprobs, ref_logprobs = logprobs(actor), logprobs(reference)
    P = prompt_ids.shape[1]
    values = critic(out, attention_mask, position_ids)[:, P - 1 : -1]
    last = P + mask.sum(dim=1) - 1  # index of each row's last valid token in the sequence
    raw_scores = reward(out, attention_mask, position_ids).gather(1, last.unsqueeze(1)).squeeze(1)
    scores = raw_scores
    if score_stats is not None:
        scores = (scores - score_stats[0]) / max(score_stats[1], 1e-6)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
    rewards = kl_penalized_rewards(
        actor_logprobs, ref_logprobs, scores, mask, kl_coef, cfg.reward_clip, cfg.kl_estimator
    )
    advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        sequences=out,
        attention_mask=attention_mask,
        position_ids=position_ids,
        mask=mask,
        logprobs=actor_logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        raw_scores=raw_scores,
        has_eos=has_eos,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
