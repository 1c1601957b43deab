"""Best-of-n: the analytic KL against a brute-force sum over a fine discrete policy, and the pick
against a per-prompt max under a hand-made scorer."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.evaluate import best_of_n_kl, best_policy, pick_best_of_n


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_is_the_limit_of_the_exact_discrete_kl(n: int) -> None:
    """SFT uniform over N outcomes with distinct rewards: the best of n takes the outcome of rank
    i (0 = worst) with p(i) = ((i+1)/N)^n − (i/N)^n, and KL = Σ p log(p N) → log n − (n−1)/n."""
    outcomes = 200_000
    ranks = torch.arange(outcomes, dtype=torch.float64)
    p = ((ranks + 1) / outcomes) ** n - (ranks / outcomes) ** n
    exact = (p * torch.log(p * outcomes)).sum().item()
    assert best_of_n_kl(n) == pytest.approx(exact, abs=1e-3)
    assert best_of_n_kl(n) == pytest.approx(math.log(n) - (n - 1) / n, rel=1e-12)


def test_pick_is_the_scorer_argmax_per_prompt() -> None:
    """Two prompts × 3 samples; the hand-made scorer counts the letter 'a'."""
    responses = ["b", "aa", "a", "aaa", "", "aaa"]  # prompt 2 ties: the first one is kept
    rows = {
        "response": responses,
        "score": [float(r.count("a")) for r in responses],
        "kl": [9.0] * 6,
        "length": [len(r) for r in responses],
        "eos": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
    }
    picked = pick_best_of_n(rows, 3)
    for prompt in range(2):
        group = responses[3 * prompt : 3 * prompt + 3]
        assert picked["response"][prompt] == max(group, key=lambda r: r.count("a"))
    assert picked["eos"] == [0.0, 1.0]  # the rows travel together: the first 'aaa' ended
    assert picked["length"] == [2, 3]
    assert picked["kl"] == [best_of_n_kl(3)] * 2


def test_best_policy_is_never_best_of_n() -> None:
    """Best-of-n needs the reward model at inference: no single model to register."""
    values = {"ground_truth_score": 0.5, "reward_mean": 0.0}
    metrics = {"sft": values, "bon@4": values | {"ground_truth_score": 0.9}}
    assert best_policy(metrics) == "sft"
