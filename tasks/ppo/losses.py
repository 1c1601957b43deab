"""Pure-math PPO pieces for RLHF: KL-shaped rewards, GAE, clipped policy / value losses.

Conventions, shared by every function:
  * Tensors are ``[B, T]`` over *response* tokens (prompt already sliced off).
  * ``mask[b, t] = 1`` for real response tokens up to and including EOS (or the last
    generated token when there is no EOS), 0 after. Any dtype (bool / int / float) works.
  * Masked positions never influence a result: inputs are zeroed with ``torch.where``
    *before* any arithmetic, so garbage there (1e6, inf) can neither leak into a mean nor
    turn a zero gradient into ``0 * inf = nan``. Per-token outputs are 0 at masked positions.
  * No function modifies its inputs in place.
"""

from __future__ import annotations

import torch

_WHITEN_EPS = 1e-8


def _zero_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with masked entries replaced by 0 (out of place, grad-safe)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid entries: ``sum(x * m) / sum(m)``.

    Shapes: ``x, mask: [B, T]`` -> scalar when ``dim is None`` (every valid token of the batch
    weighs the same), else the reduced shape (e.g. ``[B]`` for ``dim=1``).
    A reduction with no valid entry returns 0 rather than nan (denominator clamped to 1),
    so an empty row cannot poison a batch statistic.
    """
    valid = mask.bool()
    total = _zero_masked(x, valid)
    if dim is None:
        return total.sum() / valid.sum().clamp(min=1)
    return total.sum(dim) / valid.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid entries of the batch -> scalar.

    ``var = mean_m((x - mean_m(x))^2)``, times Bessel's ``n / (n - 1)`` when ``unbiased``.
    With ``n <= 1`` the correction is skipped (variance 0) instead of dividing by zero.
    """
    valid = mask.bool()
    centered = _zero_masked(x - masked_mean(x, mask), valid)
    var = masked_mean(centered.square(), mask)
    if unbiased:
        n = valid.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit (unbiased) variance over valid entries.

    ``[B, T] -> [B, T]``: ``y = (x - mu) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the
    mean is added back (``y + mu``: rescale only, as TRL does for rewards). Masked -> 0.
    """
    valid = mask.bool()
    x = _zero_masked(x, valid)  # an inf at a masked slot would make d(rsqrt) = 0 * inf = nan
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, valid)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from sampled-token log-probs, ``[B, T]``.

    ``k1 = logp - ref``  (unbiased, high variance, can be negative);
    ``k3 = (exp(ref - logp) - 1) - (ref - logp)``  (Schulman, "Approximating KL divergence":
    unbiased, lower variance, always >= 0 since ``e^u - 1 >= u``). No masking here.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Dense per-token rewards, ``[B, T]``: KL penalty on every token, score on the last one.

    ``r_t = -kl_coef * kl_t`` for valid ``t`` (0 elsewhere), and
    ``r_last += clip(score, -reward_clip, reward_clip)`` where ``last`` is the last index with
    ``mask == 1`` in the row (the EOS token, or ``T - 1`` without EOS). ``scores: [B]``.
    Rows with no valid token get no score. Follows DeepSpeed-Chat's ``compute_rewards``
    (``kl_ctl = 0.1``, ``clip_reward_value = 5``); unlike TRL's old PPO trainer, which put the
    score one slot *after* EOS, the score lands on a token the policy actually produced.
    """
    valid = mask.bool()
    kl = kl_penalty(_zero_masked(logprobs, valid), _zero_masked(ref_logprobs, valid), kl_estimator)
    rewards = _zero_masked(-kl_coef * kl, valid)

    # Last valid index per row, found from the mask itself (no left-alignment assumption):
    # max over positions where valid, -1 for empty rows so the one-hot below never fires.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1)
    is_last = positions == last.unsqueeze(1)

    clipped = scores.to(rewards.dtype).clamp(-reward_clip, reward_clip)
    return rewards + is_last.to(rewards.dtype) * clipped.unsqueeze(1)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation. ``[B, T] x3 -> (advantages [B, T], returns [B, T])``.

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``; bootstrap values past the
    last valid token are 0 (the response ended, so the episode is terminal).
    Interior mask holes act as episode boundaries. Outputs are detached and 0 where masked;
    no whitening here (see ``masked_whiten``).
    """
    valid = mask.bool()
    # Detach: advantages/returns are regression targets, never differentiated through.
    # Zeroing masked values also implements "multiply next values by the next mask".
    r = _zero_masked(rewards.detach(), valid)
    v = _zero_masked(values.detach(), valid)

    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    advantages_reversed: list[torch.Tensor] = []
    for t in reversed(range(r.shape[1])):  # T is small; a backward loop is clearest.
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = _zero_masked(delta + gamma * lam * next_adv, valid[:, t])
        advantages_reversed.append(adv_t)
        next_value, next_adv = v[:, t], adv_t
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = _zero_masked(advantages + v, valid)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate. ``[B, T] x4 -> (scalar loss, stats)``.

    ``rho = exp(logp - logp_old)``,
    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``,
    ``loss = masked_mean(l)`` over all valid tokens of the batch (token-level average).
    Gradients flow only into ``logprobs`` (old log-probs and advantages are detached).
    Stats (detached scalars): ``clipfrac`` = fraction of valid tokens where the clipped term
    was strictly larger (and so taken), ``approx_kl`` = masked mean of the k2 estimator
    ``0.5 * (logp - logp_old)^2`` of ``KL(pi_old || pi)``, ``ratio_mean`` = masked mean of rho.
    """
    valid = mask.bool()
    log_ratio = _zero_masked(logprobs - old_logprobs.detach(), valid)
    ratio = torch.exp(log_ratio)
    adv = _zero_masked(advantages.detach(), valid)

    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss. ``[B, T] x4 -> (scalar loss, stats)``.

    ``V_clip = clip(V, V_old - eps_v, V_old + eps_v)``,
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.
    Gradients flow only into ``values``. Stats: ``clipfrac`` = fraction of valid tokens
    where the clipped error is strictly larger.
    """
    valid = mask.bool()
    v = _zero_masked(values, valid)
    v_old = _zero_masked(old_values.detach(), valid)
    ret = _zero_masked(returns.detach(), valid)

    v_clipped = torch.clamp(v, v_old - clip_range_value, v_old + clip_range_value)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)

    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(v.dtype), mask)}
    return loss, stats


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 (log-softmax in bf16 loses ~2 digits); keep float32/float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Diagnostic ``1 - Var[R - V] / Var[R]`` over valid tokens -> detached scalar.

    1 = perfect critic, 0 = no better than predicting the mean, < 0 = worse. When
    ``Var[R] == 0`` (e.g. a single valid token, or constant returns) the ratio is undefined;
    we return 0 ("explains nothing") rather than nan so metric averages stay finite.
    """
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        var_residual = masked_var(returns - values, mask)
        safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
        return torch.where(var_returns > 0, 1.0 - var_residual / safe, torch.zeros_like(safe))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label: ``[B, T, V], [B, T] (int64) -> [B, T]``.

    ``log_softmax(z)[b, t, labels[b, t]]`` via gather (never materialises a one-hot).
    ``labels`` must be valid vocab ids everywhere (use the pad id, not -100, after EOS).
    """
    log_probs = torch.log_softmax(_as_float(logits), dim=-1)
    return log_probs.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)


def adaptive_kl_coef(
    kl_coef: float, kl: float, target: float, horizon: int, num_episodes: int
) -> float:
    """Ziegler et al.'s (2019) proportional controller of the KL coefficient: scalars -> float.

    ``e = clip(kl / target - 1, -0.2, 0.2)``, ``kl_coef' = kl_coef * (1 + e * n / horizon)``
    where ``kl`` is the rollout's mean per-sequence KL and ``n`` its number of episodes:
    the coefficient grows while the policy drifts further than ``target`` and shrinks below it.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_episodes / horizon)
