"""Unit tests for tasks/ppo/losses.py: hand-computed values, brute-force loops, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tasks.ppo.losses import (
    adaptive_kl_coef,
    compute_gae,
    explained_variance,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

GARBAGE = 1e6
F64 = torch.float64


def t(data: list, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype)


def _assert_scalar(actual: torch.Tensor | float, expected: float) -> None:
    assert_close(torch.as_tensor(actual, dtype=F64), torch.tensor(expected, dtype=F64))


# ----------------------------------------------------------------------------- hand-computed


def test_masked_mean_hand() -> None:
    x = t([[1.0, 2.0, GARBAGE], [4.0, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    _assert_scalar(masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 4.0]))  # (1+2)/2, 4/1
    assert_close(masked_mean(x, mask, dim=0), t([2.5, 2.0, 0.0]))  # empty column -> 0


def test_masked_var_hand() -> None:
    x = t([[1.0, 3.0], [5.0, GARBAGE]])
    mask = t([[1, 1], [1, 0]])
    # values 1, 3, 5: mean 3, squared deviations 4, 0, 4
    _assert_scalar(masked_var(x, mask, unbiased=True), 8.0 / 2.0)
    _assert_scalar(masked_var(x, mask, unbiased=False), 8.0 / 3.0)


def test_masked_whiten_hand() -> None:
    x = t([[1.0, 3.0], [5.0, GARBAGE]])
    mask = t([[1, 1], [1, 0]])
    # mean 3, unbiased std 2 -> (x - 3) / 2
    assert_close(masked_whiten(x, mask), t([[-1.0, 0.0], [1.0, 0.0]]))
    # shift_mean=False: (x - 3) / 2 + 3
    assert_close(masked_whiten(x, mask, shift_mean=False), t([[2.0, 3.0], [4.0, 0.0]]))


def test_kl_penalty_hand_and_bad_estimator() -> None:
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    assert_close(kl_penalty(logp, ref, "k1"), t([[0.5, -1.0]]))
    # k3 with u = ref - logp: u=-0.5 -> e^-0.5 - 1 + 0.5 = 0.1065306597; u=1 -> e - 2
    assert_close(kl_penalty(logp, ref, "k3"), t([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    with pytest.raises(ValueError, match="k7"):
        kl_penalty(logp, ref, "k7")


def test_kl_penalized_rewards_hand() -> None:
    logp = t([[-1.0, -2.0, -0.5, GARBAGE], [-1.0, GARBAGE, GARBAGE, GARBAGE]])
    ref = t([[-1.5, -1.0, -0.5, -GARBAGE], [-2.0, -GARBAGE, -GARBAGE, -GARBAGE]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = t([2.0, -10.0])
    rewards = kl_penalized_rewards(logp, ref, scores, mask, kl_coef=0.1, reward_clip=5.0)
    # row 0: k1 = [0.5, -1, 0] -> -0.1*k1 = [-0.05, 0.1, 0]; +2.0 on index 2 (last valid)
    # row 1: k1 = [1.0] -> -0.1; score -10 clipped to -5 -> -5.1 on index 0
    expected = t([[-0.05, 0.1, 2.0, 0.0], [-5.1, 0.0, 0.0, 0.0]])
    assert_close(rewards, expected)


def test_kl_penalized_rewards_k3_hand() -> None:
    logp, ref, mask = t([[-1.0, -2.0]]), t([[-1.5, -1.0]]), t([[1, 1]])
    rewards = kl_penalized_rewards(logp, ref, t([1.0]), mask, 0.1, 5.0, kl_estimator="k3")
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
    assert_close(rewards, t([[-0.1 * k3[0], -0.1 * k3[1] + 1.0]]))


def _gae_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 1x3 response plus one masked slot full of garbage (would add 0.9e6 to delta_2 if leaked)
    rewards = t([[1.0, 0.0, 2.0, GARBAGE]])
    values = t([[0.5, 1.0, 1.5, GARBAGE]])
    return rewards, values, t([[1, 1, 1, 0]])


def test_compute_gae_hand_gamma1_lam1() -> None:
    # delta = [1 + 1.0 - 0.5, 0 + 1.5 - 1.0, 2 + 0 - 1.5] = [1.5, 0.5, 0.5]
    # A = [1.5 + 1.0, 0.5 + 0.5, 0.5] = [2.5, 1.0, 0.5]; returns = reward-to-go [3, 2, 2]
    adv, ret = compute_gae(*_gae_inputs(), gamma=1.0, lam=1.0)
    assert_close(adv, t([[2.5, 1.0, 0.5, 0.0]]))
    assert_close(ret, t([[3.0, 2.0, 2.0, 0.0]]))


def test_compute_gae_hand_gamma09_lam095() -> None:
    # gamma*lam = 0.855
    # delta_2 = 2 - 1.5 = 0.5; delta_1 = 0 + 0.9*1.5 - 1 = 0.35; delta_0 = 1 + 0.9*1 - 0.5 = 1.4
    # A_2 = 0.5; A_1 = 0.35 + 0.855*0.5 = 0.7775; A_0 = 1.4 + 0.855*0.7775 = 2.0647625
    # returns = A + V = [2.5647625, 1.7775, 2.0]
    adv, ret = compute_gae(*_gae_inputs(), gamma=0.9, lam=0.95)
    assert_close(adv, t([[2.0647625, 0.7775, 0.5, 0.0]]))
    assert_close(ret, t([[2.5647625, 1.7775, 2.0, 0.0]]))


# ratio, advantage -> (token loss, clipped?) with eps = 0.2
POLICY_CASES = {
    "inside_clip": (1.1, 2.0, -2.2, 0.0),  # -2*1.1 = -2.2 both terms
    "clipped_pos_adv": (1.5, 2.0, -2.4, 1.0),  # max(-3.0, -2*1.2 = -2.4)
    "clipped_neg_adv": (0.5, -1.0, 0.8, 1.0),  # max(0.5, 1*0.8 = 0.8)
    "neg_adv_high_ratio": (1.5, -1.0, 1.5, 0.0),  # max(1.5, 1.2): pessimistic, unclipped
}


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_loss_hand_single_token(case: str) -> None:
    ratio, adv, expected_loss, expected_clip = POLICY_CASES[case]
    old = t([[-1.0, -3.0]])
    logp = old + t([[math.log(ratio), GARBAGE]])
    loss, stats = policy_loss(logp, old, t([[adv, GARBAGE]]), t([[1, 0]]), clip_range=0.2)
    _assert_scalar(loss, expected_loss)
    _assert_scalar(stats["clipfrac"], expected_clip)
    _assert_scalar(stats["ratio_mean"], ratio)
    _assert_scalar(stats["approx_kl"], 0.5 * math.log(ratio) ** 2)


def test_policy_loss_hand_batch() -> None:
    cases = list(POLICY_CASES.values())
    old = t([[-1.0, -2.0], [-0.5, -0.7]])
    logp = old + t([[math.log(c[0]) for c in cases[:2]], [math.log(c[0]) for c in cases[2:]]])
    adv = t([[c[1] for c in cases[:2]], [c[1] for c in cases[2:]]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(2, 2), clip_range=0.2)
    # (-2.2 - 2.4 + 0.8 + 1.5) / 4 = -0.575; 2 of 4 tokens clipped
    _assert_scalar(loss, -0.575)
    _assert_scalar(stats["clipfrac"], 0.5)
    _assert_scalar(stats["ratio_mean"], (1.1 + 1.5 + 0.5 + 1.5) / 4)


def test_value_loss_hand() -> None:
    values = t([[1.0, 1.0, 3.0, GARBAGE]])
    old_values = t([[0.5, 0.9, 1.0, -GARBAGE]])
    returns = t([[2.0, 0.0, 2.0, GARBAGE]])
    # tok0: V_clip = 0.7; (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69 (clipped larger)
    # tok1: V_clip = 1.0 (inside);  1 vs 1 -> 1 (not strictly larger: unclipped)
    # tok2: V_clip = 1.2; (3-2)^2 = 1 vs (1.2-2)^2 = 0.64 -> 1
    # loss = 0.5 * (1.69 + 1 + 1) / 3 = 0.615
    loss, stats = value_loss(values, old_values, returns, t([[1, 1, 1, 0]]), clip_range_value=0.2)
    _assert_scalar(loss, 0.615)
    _assert_scalar(stats["clipfrac"], 1.0 / 3.0)


def test_explained_variance_hand() -> None:
    mask = t([[1, 1, 1, 0]])
    returns = t([[1.0, 2.0, 3.0, GARBAGE]])
    # R - V = [0, 0, 1]: unbiased var = (2*(1/3)^2 + (2/3)^2) / 2 = 1/3; Var[R] = 1 -> 2/3
    _assert_scalar(explained_variance(t([[1.0, 2.0, 2.0, -GARBAGE]]), returns, mask), 2.0 / 3.0)
    _assert_scalar(explained_variance(returns, returns, mask), 1.0)
    _assert_scalar(explained_variance(torch.zeros(1, 4, dtype=F64), returns, mask), 0.0)
    # documented choice: Var[R] == 0 -> 0 instead of nan
    _assert_scalar(explained_variance(t([[0.0, 5.0]]), t([[1.0, 1.0]]), t([[1, 1]])), 0.0)
    _assert_scalar(explained_variance(t([[0.0]]), t([[1.0]]), t([[1]])), 0.0)


def test_logprobs_and_entropy_from_logits_hand() -> None:
    """Log-probs (ours) and the entropy statistic PPO logs (TRL's entropy_from_logits)."""
    from trl.trainer.utils import entropy_from_logits

    # logits [0, log 3] -> probs [1/4, 3/4]; uniform over 4 -> entropy log 4
    logits = t([[[0.0, math.log(3.0), -50.0, -50.0], [1.0, 1.0, 1.0, 1.0]]])
    labels = torch.tensor([[1, 2]])
    lp = logprobs_from_logits(logits, labels)
    assert_close(lp, t([[math.log(0.75), -math.log(4.0)]]), atol=1e-12, rtol=1e-6)
    ent = entropy_from_logits(logits)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(ent, t([[h0, math.log(4.0)]]), atol=1e-12, rtol=1e-6)


def test_logits_helpers_match_torch_distributions() -> None:
    from trl.trainer.utils import entropy_from_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    dist = torch.distributions.Categorical(logits=logits)
    assert_close(logprobs_from_logits(logits, labels), dist.log_prob(labels))
    assert_close(entropy_from_logits(logits), dist.entropy())
    # bf16 logits are upcast to float32 before log-softmax
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


# ----------------------------------------------------------------------------- brute force

LENGTHS = [1, 6, 3, 4, 2, 5]
T = 6


def _random_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).to(F64)

    def rand(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(b, T, generator=g, dtype=F64) * scale

    return {
        "mask": mask,
        "logp": -rand().abs() - 0.1,
        "ref": -rand().abs() - 0.1,
        "adv": rand(),
        "values": rand(),
        "old_values": rand(0.3),
        "returns": rand(),
        "rewards": rand(),
        "scores": torch.randn(b, generator=g, dtype=F64) * 4,
        "delta": rand(0.3),  # old_logp = logp + delta: ratios straddle the clip range
    }


def _rows(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(1).tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards_brute_force(seed: int, estimator: str) -> None:
    d = _random_batch(seed)
    kl_coef, clip = 0.05, 3.0
    out = kl_penalized_rewards(
        d["logp"], d["ref"], d["scores"], d["mask"], kl_coef, clip, estimator
    )
    lp, rf, sc = d["logp"].tolist(), d["ref"].tolist(), d["scores"].tolist()
    expected = [[0.0] * T for _ in LENGTHS]
    for b, n in enumerate(_rows(d["mask"])):
        for i in range(n):
            if estimator == "k1":
                kl = lp[b][i] - rf[b][i]
            else:
                u = rf[b][i] - lp[b][i]
                kl = math.exp(u) - 1.0 - u
            expected[b][i] = -kl_coef * kl
        expected[b][n - 1] += min(max(sc[b], -clip), clip)
    assert_close(out, t(expected))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_compute_gae_brute_force(seed: int, gamma: float, lam: float) -> None:
    d = _random_batch(seed)
    adv, ret = compute_gae(d["rewards"], d["values"], d["mask"], gamma, lam)
    r, v = d["rewards"].tolist(), d["values"].tolist()
    exp_adv = [[0.0] * T for _ in LENGTHS]
    exp_ret = [[0.0] * T for _ in LENGTHS]
    for b, n in enumerate(_rows(d["mask"])):
        last = 0.0
        for i in reversed(range(n)):
            next_v = v[b][i + 1] if i + 1 < n else 0.0
            last = r[b][i] + gamma * next_v - v[b][i] + gamma * lam * last
            exp_adv[b][i] = last
            exp_ret[b][i] = last + v[b][i]
    assert_close(adv, t(exp_adv))
    assert_close(ret, t(exp_ret))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_brute_force(seed: int) -> None:
    d = _random_batch(seed)
    eps = 0.2
    old = d["logp"] + d["delta"]  # |log ratio| ~ 0.3: a mix of clipped and unclipped tokens
    loss, stats = policy_loss(d["logp"], old, d["adv"], d["mask"], eps)
    lp, ol, a = d["logp"].tolist(), old.tolist(), d["adv"].tolist()
    tot = n_clip = kl = rsum = 0.0
    count = 0
    for b, n in enumerate(_rows(d["mask"])):
        for i in range(n):
            rho = math.exp(lp[b][i] - ol[b][i])
            l1, l2 = -a[b][i] * rho, -a[b][i] * min(max(rho, 1 - eps), 1 + eps)
            tot += max(l1, l2)
            n_clip += float(l2 > l1)
            kl += 0.5 * (lp[b][i] - ol[b][i]) ** 2
            rsum += rho
            count += 1
    _assert_scalar(loss, tot / count)
    _assert_scalar(stats["clipfrac"], n_clip / count)
    _assert_scalar(stats["approx_kl"], kl / count)
    _assert_scalar(stats["ratio_mean"], rsum / count)
    assert 0.0 < stats["clipfrac"].item() < 1.0  # the random case exercises both branches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_loss_brute_force(seed: int) -> None:
    d = _random_batch(seed)
    eps = 0.2
    old_v = d["values"] + d["old_values"]
    loss, stats = value_loss(d["values"], old_v, d["returns"], d["mask"], eps)
    v, ov, rt = d["values"].tolist(), old_v.tolist(), d["returns"].tolist()
    tot = n_clip = 0.0
    count = 0
    for b, n in enumerate(_rows(d["mask"])):
        for i in range(n):
            vc = min(max(v[b][i], ov[b][i] - eps), ov[b][i] + eps)
            e1, e2 = (v[b][i] - rt[b][i]) ** 2, (vc - rt[b][i]) ** 2
            tot += max(e1, e2)
            n_clip += float(e2 > e1)
            count += 1
    _assert_scalar(loss, 0.5 * tot / count)
    _assert_scalar(stats["clipfrac"], n_clip / count)
    assert 0.0 < stats["clipfrac"].item() < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_brute_force(seed: int, shift_mean: bool) -> None:
    d = _random_batch(seed)
    x = d["rewards"] * 3 + 1
    out = masked_whiten(x, d["mask"], shift_mean=shift_mean)
    xs, rows = x.tolist(), _rows(d["mask"])
    vals = [xs[b][i] for b, n in enumerate(rows) for i in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((u - mean) ** 2 for u in vals) / (len(vals) - 1)
    expected = [[0.0] * T for _ in LENGTHS]
    for b, n in enumerate(rows):
        for i in range(n):
            expected[b][i] = (xs[b][i] - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    assert_close(out, t(expected))


# ----------------------------------------------------------------------------- edge cases


def test_one_token_response() -> None:
    mask = t([[1, 0, 0], [1, 1, 1]])
    logp, ref = t([[-0.5, GARBAGE, GARBAGE], [-1.0, -1.0, -1.0]]), t([[-0.7, 0, 0], [-1.0] * 3])
    rewards = kl_penalized_rewards(logp, ref, t([1.0, 0.0]), mask, kl_coef=0.1, reward_clip=10)
    assert_close(rewards, t([[-0.02 + 1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # -0.1 * 0.2 + 1
    values = t([[0.25, GARBAGE, GARBAGE], [0.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # single step: A = r - V (no bootstrap), returns = r
    assert_close(adv[0], t([0.98 - 0.25, 0.0, 0.0]))
    assert_close(ret[0], t([0.98, 0.0, 0.0]))


def test_no_eos_full_mask_reward_on_last_index() -> None:
    logp = ref = torch.zeros(2, 4, dtype=F64)  # zero KL isolates the score
    rewards = kl_penalized_rewards(logp, ref, t([3.0, -1.0]), torch.ones(2, 4), 0.1, 5.0)
    assert_close(rewards, t([[0, 0, 0, 3.0], [0, 0, 0, -1.0]]))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32, F64])
def test_reward_only_on_last_valid_token(mask_dtype: torch.dtype) -> None:
    d = _random_batch(0)
    mask = d["mask"].to(mask_dtype)
    kl_coef = 0.1
    rewards = kl_penalized_rewards(d["logp"], d["ref"], d["scores"], mask, kl_coef, 100.0)
    kl_only = torch.where(d["mask"].bool(), -kl_coef * (d["logp"] - d["ref"]), 0.0)
    bonus = rewards - kl_only
    expected = torch.zeros_like(bonus)
    for b, n in enumerate(LENGTHS):
        expected[b, n - 1] = d["scores"][b]
    assert_close(bonus, expected)


def test_last_valid_token_found_robustly_and_empty_row() -> None:
    # an interior hole and an empty row: score goes on the last 1, empty row gets nothing
    mask = t([[1, 0, 1, 0], [0, 0, 0, 0]])
    zeros = torch.zeros(2, 4, dtype=F64)
    rewards = kl_penalized_rewards(zeros, zeros, t([2.0, 7.0]), mask, 0.1, 5.0)
    assert_close(rewards, t([[0, 0, 2.0, 0], [0, 0, 0, 0]]))


def test_reward_clipping() -> None:
    zeros = torch.zeros(4, 2, dtype=F64)
    scores = t([10.0, -10.0, 0.5, -2.0])
    rewards = kl_penalized_rewards(zeros, zeros, scores, torch.ones(4, 2), 0.1, reward_clip=2.0)
    assert_close(rewards[:, -1], t([2.0, -2.0, 0.5, -2.0]))
    assert_close(rewards[:, 0], torch.zeros(4, dtype=F64))


def test_masked_positions_are_zero_in_outputs() -> None:
    d = _random_batch(1)
    pad = ~d["mask"].bool()
    rewards = kl_penalized_rewards(d["logp"], d["ref"], d["scores"], d["mask"], 0.1, 5.0)
    adv, ret = compute_gae(rewards, d["values"], d["mask"], 0.99, 0.95)
    whitened = masked_whiten(adv, d["mask"])
    for out in (rewards, adv, ret, whitened):
        assert torch.all(out[pad] == 0)
    assert torch.all(adv[~pad] != 0)


def _poison(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.full_like(x, value))


@pytest.mark.parametrize("value", [GARBAGE, -GARBAGE, float("inf")])
def test_garbage_in_masked_positions_changes_nothing(value: float) -> None:
    d = _random_batch(2)
    m = d["mask"]
    old = d["logp"] + d["delta"]

    def run(p: float | None) -> list[torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            return x if p is None else _poison(x, m, p)

        logp = f(d["logp"]).clone().requires_grad_(True)
        values = f(d["values"]).clone().requires_grad_(True)
        rewards = kl_penalized_rewards(logp, f(d["ref"]), d["scores"], m, 0.1, 5.0)
        adv, ret = compute_gae(rewards, f(d["values"]), m, 0.99, 0.95)
        adv = masked_whiten(f(adv), m)
        pl, pstats = policy_loss(logp, f(old), f(adv), m, 0.2)
        vl, vstats = value_loss(values, f(d["old_values"]), f(ret), m, 0.2)
        (pl + vl).backward()
        assert logp.grad is not None and values.grad is not None
        ev = explained_variance(f(d["values"]), f(ret), m)
        stats = [*pstats.values(), *vstats.values()]
        return [rewards.detach(), adv, ret, pl, vl, logp.grad, values.grad, ev, *stats]

    for clean, dirty in zip(run(None), run(value), strict=True):
        assert torch.isfinite(dirty).all()
        assert_close(dirty, clean)


def test_k3_nonnegative_and_estimators_unbiased() -> None:
    torch.manual_seed(0)
    logp, ref = torch.randn(64, 32) * 2, torch.randn(64, 32) * 2
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    # Sample x ~ p: E[k1] = E[k3] = KL(p || q) exactly; Monte Carlo with 400k samples.
    p = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.0, 2.0], dtype=F64), 0)
    q = torch.softmax(torch.tensor([0.3, 0.9, -0.1, 0.4, 1.0], dtype=F64), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    x = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[x].unsqueeze(0), q.log()[x].unsqueeze(0)
    k1, k3 = kl_penalty(lp, lq, "k1"), kl_penalty(lp, lq, "k3")
    assert abs(k1.mean().item() - true_kl) < 5e-3
    assert abs(k3.mean().item() - true_kl) < 5e-3
    assert k3.var().item() < k1.var().item()  # the point of k3


def test_policy_loss_gradient_values_and_masking() -> None:
    # tokens: inside clip (rho 1.1, A 2), clipped (rho 1.5, A 2), masked garbage
    old = t([[-1.0, -2.0, -3.0]])
    logp = (old + t([[math.log(1.1), math.log(1.5), GARBAGE]])).requires_grad_(True)
    adv = t([[2.0, 2.0, GARBAGE]])
    loss, _ = policy_loss(logp, old, adv, t([[1, 1, 0]]), clip_range=0.2)
    loss.backward()
    # d/dlogp of mean(-A rho) = -A rho / N = -2 * 1.1 / 2; clipped token has zero gradient
    assert_close(logp.grad, t([[-1.1, 0.0, 0.0]]))


def test_value_loss_gradient_masked() -> None:
    values = t([[1.0, 3.0, GARBAGE]]).requires_grad_(True)
    loss, _ = value_loss(values, t([[0.9, 1.0, 0.0]]), t([[0.0, 2.0, 0.0]]), t([[1, 1, 0]]), 0.2)
    loss.backward()
    # tok0 inside clip: d 0.5*(V-R)^2/2 = (1-0)/2 = 0.5; tok1 unclipped max: (3-2)/2 = 0.5
    assert_close(values.grad, t([[0.5, 0.5, 0.0]]))


def test_compute_gae_outputs_detached() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = compute_gae(torch.randn(2, 3), values, torch.ones(2, 3), 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_inputs_not_modified() -> None:
    d = _random_batch(0)
    snapshot = {k: v.clone() for k, v in d.items()}
    rewards = kl_penalized_rewards(d["logp"], d["ref"], d["scores"], d["mask"], 0.1, 5.0)
    compute_gae(d["rewards"], d["values"], d["mask"], 0.99, 0.95)
    policy_loss(d["logp"], d["ref"], d["adv"], d["mask"], 0.2)
    value_loss(d["values"], d["old_values"], d["returns"], d["mask"], 0.2)
    masked_whiten(rewards, d["mask"])
    for k, v in snapshot.items():
        assert torch.equal(d[k], v), k


def test_masked_whiten_gradient_finite_with_inf_in_masked_slots() -> None:
    x = t([[1.0, 3.0], [5.0, float("inf")]]).requires_grad_(True)
    out = masked_whiten(x, t([[1, 1], [1, 0]]))
    assert_close(out.detach(), t([[-1.0, 0.0], [1.0, 0.0]]))
    (out * t([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad[1, 1].item() == 0.0


# ----------------------------------------------------------------------------- adaptive KL


@pytest.mark.parametrize(
    ("kl", "error"),
    [
        (6.0, 0.0),  # on target: unchanged
        (6.6, 0.1),  # kl / target - 1 = 0.1, inside the band
        (5.4, -0.1),
        (9.0, 0.2),  # 0.5 clipped to 0.2
        (100.0, 0.2),
        (3.0, -0.2),  # -0.5 clipped to -0.2
        (0.0, -0.2),
    ],
)
def test_adaptive_kl_coef_hand(kl: float, error: float) -> None:
    # Ziegler et al.: kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)
    got = adaptive_kl_coef(0.1, kl, target=6.0, horizon=10_000, num_episodes=64)
    assert got == pytest.approx(0.1 * (1.0 + error * 64 / 10_000), rel=1e-12)


def test_adaptive_kl_coef_direction_and_fixed_points() -> None:
    kwargs = {"target": 6.0, "horizon": 100, "num_episodes": 10}
    assert adaptive_kl_coef(0.1, 8.0, **kwargs) > 0.1  # too far from the reference: grow
    assert adaptive_kl_coef(0.1, 4.0, **kwargs) < 0.1  # closer than the target: shrink
    assert adaptive_kl_coef(0.0, 50.0, **kwargs) == 0.0  # a zero coefficient stays zero
    # repeated updates compound multiplicatively and never change sign
    coef = 0.1
    for _ in range(50):
        coef = adaptive_kl_coef(coef, 0.0, **kwargs)
    assert coef == pytest.approx(0.1 * (1 - 0.2 * 10 / 100) ** 50)
    assert coef > 0
