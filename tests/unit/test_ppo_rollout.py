"""Unit tests for tasks/ppo/rollout.py on tiny random Llama models (tests/unit/conftest.py):
`make_experience` checked against brute-force per-row recomputations (no padding at all). The
scoring it builds on (masks, positions, logits, TokenScorer) is tests/unit/test_scoring.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tasks.params import load_params
from tasks.ppo.losses import (
    compute_gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)
from tasks.ppo.rollout import make_experience
from tasks.scoring import TokenScorer, positions_from_mask
from tests.tiny import EOS, MAX_NEW, PAD, brute_response_mask, random_prompts

REPO = Path(__file__).resolve().parents[2]
TOL = {"atol": 1e-5, "rtol": 1e-5}


# ----------------------------------------------------------------------------- make_experience


def ppo_cfg(**overrides: Any) -> Any:
    return load_params(REPO / "params.yaml").ppo.model_copy(update=overrides)


EXPERIENCE_CASES = {
    # actor is the reference: KL 0; scores normalised, EOS penalty, whitened, temperature != 1
    "default": {
        "cfg": {"temperature": 0.7, "missing_eos_penalty": 1.0, "whiten_advantages": True},
        "score_stats": (0.3, 2.0),
        "same_reference": True,
        "pad": PAD,
        "stop_ids": [EOS],
    },
    # another reference (KL != 0, k3), raw scores, no penalty, no whitening, pad == EOS,
    # a second stop id, a reward clip that bites, gamma/lam < 1
    "variant": {
        "cfg": {
            "temperature": 1.3,
            "missing_eos_penalty": None,
            "whiten_advantages": False,
            "kl_estimator": "k3",
            "reward_clip": 0.3,
            "gamma": 0.9,
            "lam": 0.8,
        },
        "score_stats": None,
        "same_reference": False,
        "pad": EOS,
        "stop_ids": [EOS, 7],
    },
}


def _alone(prompt_ids, prompt_mask, responses, mask, row: int) -> tuple[torch.Tensor, int, int]:
    """Row `row` of the rollout without padding: ([1, n] ids, prompt length, response length)."""
    prompt = prompt_ids[row][prompt_mask[row].bool()]
    length = int(mask[row].sum())
    return torch.cat([prompt, responses[row, :length]]).unsqueeze(0), len(prompt), length


@pytest.fixture(scope="module", params=list(EXPERIENCE_CASES))
def rollout(request, lm, other_lm, classifier, reward_classifier) -> dict[str, Any]:
    case = EXPERIENCE_CASES[request.param]
    cfg = ppo_cfg(**case["cfg"])
    prompt_ids, prompt_mask = random_prompts(16, seed=4)
    torch.manual_seed(5)
    exp = make_experience(
        actor=lm,
        reference=lm if case["same_reference"] else other_lm,
        critic=TokenScorer(classifier),
        reward=TokenScorer(reward_classifier),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        generation={
            "do_sample": True,
            "temperature": cfg.temperature,
            "top_k": 0,
            "top_p": 1.0,
            "max_new_tokens": MAX_NEW,
            "pad_token_id": case["pad"],
            "eos_token_id": case["stop_ids"],
            "use_cache": True,
        },
        stop_ids=case["stop_ids"],
        cfg=cfg,
        kl_coef=0.2,
        score_stats=case["score_stats"],
    )
    return {
        "exp": exp,
        "cfg": cfg,
        "case": case,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "reference": lm if case["same_reference"] else other_lm,
    }


def test_experience_shapes_and_masks(rollout: dict[str, Any]) -> None:
    exp, case = rollout["exp"], rollout["case"]
    prompt_ids, prompt_mask = rollout["prompt_ids"], rollout["prompt_mask"]
    B, P = prompt_ids.shape
    T = exp.mask.shape[1]
    assert 1 <= T <= MAX_NEW
    assert exp.prompt_length == P
    assert exp.sequences.shape == (B, P + T)
    assert torch.equal(exp.sequences[:, :P], prompt_ids)
    for name in ("mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert getattr(exp, name).shape == (B, T), name
    for name in ("scores", "raw_scores", "has_eos"):
        assert getattr(exp, name).shape == (B,), name
    for name in ("logprobs", "ref_logprobs", "values", "scores", "rewards", "advantages"):
        assert torch.isfinite(getattr(exp, name)).all(), name

    responses = exp.sequences[:, P:]
    expected_mask, expected_eos = brute_response_mask(responses, case["stop_ids"])
    assert exp.mask.tolist() == expected_mask
    assert exp.has_eos.tolist() == expected_eos
    assert 0 < exp.has_eos.sum() < B  # the rollout holds both endings
    for row in range(B):  # generate pads a finished row: nothing real after the first stop
        n = int(exp.mask[row].sum())
        assert (responses[row, n:] == case["pad"]).all()
    assert torch.equal(exp.attention_mask, torch.cat([prompt_mask, exp.mask], dim=1))
    assert torch.equal(exp.position_ids, positions_from_mask(exp.attention_mask))


def test_experience_logprobs_brute_force(rollout: dict[str, Any], lm: Any) -> None:
    exp, cfg = rollout["exp"], rollout["cfg"]
    P = exp.prompt_length
    responses = exp.sequences[:, P:]
    for row in range(responses.shape[0]):
        ids, p, n = _alone(rollout["prompt_ids"], rollout["prompt_mask"], responses, exp.mask, row)
        targets = ids[0, p:]
        with torch.no_grad():
            for model, got in ((lm, exp.logprobs), (rollout["reference"], exp.ref_logprobs)):
                logits = model(input_ids=ids).logits[0, p - 1 : -1].float()
                expected = torch.log_softmax(logits / cfg.temperature, -1)[torch.arange(n), targets]
                assert_close(got[row, :n], expected, **TOL)
                at_one = torch.log_softmax(logits, -1)[torch.arange(n), targets]
                assert (got[row, :n] - at_one).abs().max() > 1e-4  # the temperature was applied
    if rollout["case"]["same_reference"]:
        assert torch.equal(exp.ref_logprobs, exp.logprobs)  # KL exactly 0
    else:
        assert (exp.ref_logprobs - exp.logprobs).abs().max() > 1e-2


def test_experience_values_and_scores_brute_force(
    rollout: dict[str, Any], classifier: Any, reward_classifier: Any
) -> None:
    exp, cfg, case = rollout["exp"], rollout["cfg"], rollout["case"]
    responses = exp.sequences[:, exp.prompt_length :]
    raw = []
    for row in range(responses.shape[0]):
        ids, p, n = _alone(rollout["prompt_ids"], rollout["prompt_mask"], responses, exp.mask, row)
        ones = torch.ones_like(ids)
        with torch.no_grad():
            # V(s_t) is read just before response token t: positions p-1 ... p+n-2 of the row
            # alone (per-position scores equal the classifier's pooled score of each prefix:
            # test_scoring.py: test_left_padding_does_not_change_values)
            values = TokenScorer(classifier)(ids, ones, positions_from_mask(ones))[0]
            raw.append(reward_classifier(input_ids=ids).logits[0, 0])  # the last valid token
        assert_close(exp.values[row, :n], values[p - 1 : p - 1 + n], **TOL)
    raw_scores = torch.stack(raw)
    assert_close(exp.raw_scores, raw_scores, **TOL)

    expected = raw_scores
    if case["score_stats"] is not None:
        mean, std = case["score_stats"]
        expected = (expected - mean) / std
    if cfg.missing_eos_penalty is not None:
        expected = expected - cfg.missing_eos_penalty * (~exp.has_eos).float()
    assert_close(exp.scores, expected, **TOL)
    if case["score_stats"] is not None or cfg.missing_eos_penalty is not None:
        assert not torch.allclose(exp.scores, exp.raw_scores)  # the transformation did apply
    else:
        assert torch.equal(exp.scores, exp.raw_scores)


def test_experience_rewards_advantages_returns(rollout: dict[str, Any]) -> None:
    exp, cfg, case = rollout["exp"], rollout["cfg"], rollout["case"]
    rewards = kl_penalized_rewards(
        exp.logprobs,
        exp.ref_logprobs,
        exp.scores,
        exp.mask,
        0.2,
        cfg.reward_clip,
        cfg.kl_estimator,
    )
    assert_close(exp.rewards, rewards)
    advantages, returns = compute_gae(exp.rewards, exp.values, exp.mask, cfg.gamma, cfg.lam)
    assert_close(exp.returns, returns)  # value targets from the un-whitened advantages
    if cfg.whiten_advantages:
        assert_close(exp.advantages, masked_whiten(advantages, exp.mask))
        assert abs(masked_mean(exp.advantages, exp.mask).item()) < 1e-5
        assert abs(masked_var(exp.advantages, exp.mask).item() - 1.0) < 1e-4
    else:
        assert_close(exp.advantages, advantages)
    assert (exp.advantages[exp.mask == 0] == 0).all()

    # the score lands (clipped) on each row's last valid token, the KL penalty elsewhere
    last = exp.mask.sum(dim=1) - 1
    clipped = exp.scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if case["same_reference"]:  # actor == reference: no KL, the reward is the score alone
        expected = torch.zeros_like(exp.rewards)
        expected[torch.arange(len(last)), last] = clipped
        assert torch.equal(exp.rewards, expected)
    else:
        assert (clipped.abs() < exp.scores.abs()).any()  # the clip was exercised
        at_last = exp.rewards[torch.arange(len(last)), last]
        assert not torch.allclose(at_last, clipped)  # a KL penalty was added on top
