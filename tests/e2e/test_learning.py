"""Every stage learns: what the package's `dvc repro` (tests/e2e/conftest.py, LEARNING sizes)
learnt, judged on held-out data or on the task's ground truth, never on what the stage itself
reports about its own training data.

Margins hold over three seeds of the whole run (RLHF_TEST_SEED=42, 7, 1; what each observed is
in each test's docstring, seeds in that order) with room to spare; a flipped PPO advantage or
DPO trained on swapped pairs fails them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.models import load_causal_lm, load_scorer, load_tokenizer
from tasks.params import load_params
from tasks.scoring import reward_texts, score_texts
from tasks.stages import POLICIES

pytestmark = [pytest.mark.slow, pytest.mark.learning]


def metrics(project: dict[str, Any], stage: str) -> dict[str, Any]:
    return json.loads((project["first"] / "metrics" / f"{stage}.json").read_text())


def held_out_pairs(project: dict[str, Any]) -> list[dict[str, str]]:
    """The preference pairs no stage trained on (data/prepared/preference/eval.jsonl)."""
    path = project["first"] / "data" / "prepared" / "preference" / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def model_config(project: dict[str, Any]) -> Any:
    return load_params(project["first"] / "params.yaml").model


@torch.no_grad()
def response_logprobs(model: Any, tokenizer: Any, prompt: str, response: str) -> torch.Tensor:
    """log π(response EOS | prompt), tokenised as DPOTrainer tokenises a pair: prompt and
    response apart, EOS after the response."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # predicting the response
    return logits.log_softmax(-1).gather(1, torch.tensor(response_ids)[:, None]).sum()


def test_the_reward_model_prefers_the_better_answer_of_held_out_pairs(project: dict[str, Any]):
    """models/reward_model scores the chosen answer of a held-out pair above the rejected one
    far more often than chance (0.5), read as PPO and the online stages read it (the one
    scorer, tasks/scoring.py). Observed accuracy 0.84, 0.80, 0.78."""
    path, cfg = project["first"] / "models" / "reward_model", model_config(project)
    tokenizer = load_tokenizer(path, cfg)
    scorer = load_scorer(path, cfg, torch.float32, tokenizer.pad_token_id).eval()
    pairs = held_out_pairs(project)
    prompts = [pair["prompt"] for pair in pairs]
    chosen, rejected = (
        score_texts(scorer, tokenizer, reward_texts(prompts, [p[a] for p in pairs], tokenizer))
        for a in ("chosen", "rejected")
    )
    accuracy = (chosen > rejected).float().mean().item()
    assert len(pairs) >= 100 and accuracy >= 0.7, accuracy


def dpo_margin(project: dict[str, Any], models: Path) -> tuple[float, float]:
    """DPO's implicit reward margin on held-out pairs, β·[(log π(c) − log π_sft(c)) −
    (log π(r) − log π_sft(r))] with π = models/dpo, π_sft = models/sft. → (mean, share > 0)"""
    cfg = model_config(project)
    tokenizer = load_tokenizer(models / "sft", cfg)
    policy = load_causal_lm(models / "dpo", cfg, torch.float32).eval()
    reference = load_causal_lm(models / "sft", cfg, torch.float32).eval()
    beta = load_params(project["first"] / "params.yaml").dpo.trainer["beta"]
    margins = []
    for pair in held_out_pairs(project):
        ratio = {
            answer: response_logprobs(policy, tokenizer, pair["prompt"], pair[answer])
            - response_logprobs(reference, tokenizer, pair["prompt"], pair[answer])
            for answer in ("chosen", "rejected")
        }
        margins.append(beta * (ratio["chosen"] - ratio["rejected"]).item())
    return sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)


def dpo_learnt(mean: float, accuracy: float) -> bool:
    return mean >= 0.4 and accuracy >= 0.65


def test_dpo_widens_the_margin_of_held_out_pairs_over_its_reference(project: dict[str, Any]):
    """The margin is 0 when DPO starts (π = π_sft); on held-out pairs it ends clearly
    positive, for most pairs. Observed mean margin 1.8, 0.9, 1.3 and accuracy 0.78, 0.75,
    0.72."""
    mean, accuracy = dpo_margin(project, project["first"] / "models")
    assert dpo_learnt(mean, accuracy), (mean, accuracy)


def ppo_learnt(ppo: dict[str, Any]) -> bool:
    return ppo["score_last_quarter"] - ppo["score_first_quarter"] >= 0.4


def test_ppo_raises_its_score_over_the_iterations(project: dict[str, Any]):
    """The reward model's (normalised) score of PPO's own rollouts, first quarter of the
    iterations against the last (metrics/ppo.json, from the per-iteration curve). Observed
    −0.45 → 0.33, −0.40 → 0.59, −0.37 → 0.74."""
    ppo = metrics(project, "ppo")
    curve = json.loads((project["first"] / "plots" / "ppo.json").read_text())
    assert len([row for row in curve if "objective/scores" in row]) == 8  # and held-out rows
    assert ppo_learnt(ppo), ppo


def test_grpo_on_the_ground_truth_raises_the_ground_truth(project: dict[str, Any]):
    """GRPO rewarded by the task's scorer alone (`grpo.rewards: {ground_truth: 1.0}`): the
    mean reward of its sampled groups rises from the first logged steps to the last, its
    held-out evaluations during training (greedy, `heldout/gold`) rise from before the first
    step to after the last, and evaluate scores its answers above SFT's. Observed per-step reward
    0.24 → 0.49, 0.21 → 0.54, 0.24 → 0.47; held-out gold 0.17 → 0.60, 0.16 → 0.58, 0.12 → 0.53."""
    curve = json.loads((project["first"] / "plots" / "grpo.json").read_text())
    rewards = [
        row["rewards/ground_truth/mean"] for row in curve if "rewards/ground_truth/mean" in row
    ]
    assert len(rewards) == 6, curve
    assert rewards[-1] - rewards[0] >= 0.15, rewards
    gold = [row["heldout/gold"] for row in curve if "heldout/gold" in row]
    assert len(gold) == 4 and gold[-1] - gold[0] >= 0.2, gold
    judged = metrics(project, "evaluate")
    assert judged["grpo"]["ground_truth_score"] - judged["sft"]["ground_truth_score"] >= 0.25


def test_every_aligned_policy_beats_sft_on_the_ground_truth(project: dict[str, Any]):
    """evaluate's verdict: each aligned policy's greedy answers to the held-out prompts score
    higher on the task's ground truth than SFT's, by at least 0.1 (a few prompts in 60).
    Observed gains over SFT — ppo 0.42, 0.24, 0.41; dpo 0.33, 0.41, 0.47; simpo 0.29, 0.14,
    0.33; grpo 0.42, 0.42, 0.41; rloo 0.41, 0.41, 0.42 (SimPO at seed 7 is the closest call)."""
    judged = metrics(project, "evaluate")
    sft = judged["sft"]["ground_truth_score"]
    gains = {p: judged[p]["ground_truth_score"] - sft for p in POLICIES if p != "sft"}
    assert set(gains) == {"ppo", "dpo", "simpo", "grpo", "rloo"}
    assert all(gain >= 0.1 for gain in gains.values()), gains
