"""Unit tests for tasks/ppo/rollout.py on tiny random Llama models: response masks, left padding,
and `make_experience` checked against brute-force per-row recomputations (no padding at all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tasks.config import load_params
from tasks.ppo.losses import (
    compute_gae,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)
from tasks.ppo.rollout import (
    TokenScorer,
    make_experience,
    positions_from_mask,
    response_logits,
    response_mask,
)
from tests.tiny import BOS, EOS, MAX_NEW, PAD, VOCAB, init_std, tiny_config

REPO = Path(__file__).resolve().parents[2]
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def lm() -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return init_std(LlamaForCausalLM(tiny_config()), 0.3)


@pytest.fixture(scope="module")
def other_lm() -> Any:
    """A second policy (different weights): the reference when KL must not vanish."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    return init_std(LlamaForCausalLM(tiny_config()), 0.3)


def _classifier(seed: int) -> Any:
    # pad_token_id None: the classifier's own pooling then reads the last position of a single
    # unpadded row, which makes it an independent brute-force reference for TokenScorer.
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return init_std(
        LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=None)), 0.3
    )


@pytest.fixture(scope="module")
def classifier() -> Any:
    return _classifier(2)


@pytest.fixture(scope="module")
def reward_classifier() -> Any:
    return _classifier(3)


# ----------------------------------------------------------------------------- response_mask


def brute_response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[list, list]:
    masks, has_eos = [], []
    for row in responses.tolist():
        first = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        has_eos.append(first is not None)
        end = len(row) if first is None else first + 1
        masks.append([1] * end + [0] * (len(row) - end))
    return masks, has_eos


RESPONSE_CASES = {
    "eos_in_the_middle": ([[5, 6, EOS, PAD, PAD]], [EOS], [[1, 1, 1, 0, 0]], [True]),
    "no_eos": ([[5, 6, 7, 3]], [EOS], [[1, 1, 1, 1]], [False]),
    "eos_first": ([[EOS, PAD, PAD]], [EOS], [[1, 0, 0]], [True]),
    "pad_is_eos": ([[5, EOS, EOS, EOS]], [EOS], [[1, 1, 0, 0]], [True]),
    "pad_is_eos_first": ([[EOS, EOS, EOS]], [EOS], [[1, 0, 0]], [True]),
    "several_stop_ids": (
        [[5, 7, EOS, 3], [5, 6, 3, 7], [EOS, 7, 7, 7], [5, 6, 4, 3]],
        [EOS, 7],
        [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]],
        [True, True, True, False],
    ),
    "mixed_batch": (
        [[5, EOS, PAD, PAD], [3, 4, 5, 6], [EOS, PAD, PAD, PAD], [3, 4, 5, EOS]],
        [EOS],
        [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]],
        [True, False, True, True],
    ),
}


@pytest.mark.parametrize("case", list(RESPONSE_CASES))
def test_response_mask_cases(case: str) -> None:
    responses, stop_ids, expected_mask, expected_eos = RESPONSE_CASES[case]
    mask, has_eos = response_mask(torch.tensor(responses), stop_ids)
    assert mask.dtype == torch.long
    assert has_eos.dtype == torch.bool
    assert mask.tolist() == expected_mask
    assert has_eos.tolist() == expected_eos


@pytest.mark.parametrize("seed", range(5))
def test_response_mask_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    responses = torch.randint(0, 6, (32, 7), generator=gen)
    stop_ids = [2, 4] if seed % 2 else [2]
    mask, has_eos = response_mask(responses, stop_ids)
    expected_mask, expected_eos = brute_response_mask(responses, stop_ids)
    assert mask.tolist() == expected_mask
    assert has_eos.tolist() == expected_eos
    assert 0 < has_eos.sum() < len(has_eos)  # both kinds of rows were exercised


# ----------------------------------------------------------------------------- positions


def test_positions_from_mask_left_padding() -> None:
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    positions = positions_from_mask(attention)
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_positions_from_mask_prompt_and_response() -> None:
    # left-padded prompt, then a response cut after EOS (trailing zeros)
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    positions = positions_from_mask(attention)
    for row, mask_row in zip(positions.tolist(), attention.tolist(), strict=True):
        real = [p for p, m in zip(row, mask_row, strict=True) if m]
        assert real == list(range(len(real)))  # counted from the first real token
        assert min(row) >= 0


# ----------------------------------------------------------------------------- left padding


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[BOS, 5, 3], [BOS, 4, 6, 7, 3, 5, 6]]  # the first is left-padded by 4 in a batch
RESPONSES = [[6, 4, 7, 3, 5], [3, 3, 5, 7, 4]]


def _batched(prompts: list[list[int]], responses: list[list[int]]):
    prompt_ids, prompt_mask = left_pad(prompts)
    response = torch.tensor(responses)
    sequences = torch.cat([prompt_ids, response], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(response)], dim=1)
    return sequences, attention, positions_from_mask(attention), response


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_left_padding_does_not_change_logprobs(lm: Any, temperature: float) -> None:
    sequences, attention, positions, response = _batched(PROMPTS, RESPONSES)
    T = response.shape[1]
    with torch.no_grad():
        batched = logprobs_from_logits(
            response_logits(lm, sequences, attention, positions, T, temperature), response
        )
        for row in range(len(PROMPTS)):
            alone = torch.tensor([PROMPTS[row] + RESPONSES[row]])
            logits = response_logits(
                lm,
                alone,
                torch.ones_like(alone),
                positions_from_mask(torch.ones_like(alone)),
                T,
                temperature,
            )
            assert_close(
                batched[row], logprobs_from_logits(logits, response[row : row + 1])[0], **TOL
            )
            # brute force: full forward, log-softmax at temperature, each response token
            full = torch.log_softmax(lm(alone).logits[0].float() / temperature, dim=-1)
            P = len(PROMPTS[row])
            expected = torch.stack([full[P - 1 + t, tok] for t, tok in enumerate(RESPONSES[row])])
            assert_close(batched[row], expected, **TOL)
        # the padding is really masked: attending to it changes the padded row
        unmasked = logprobs_from_logits(
            response_logits(lm, sequences, torch.ones_like(attention), positions, T, temperature),
            response,
        )
    assert (unmasked[0] - batched[0]).abs().max() > 1e-3


def test_left_padding_does_not_change_values(classifier: Any) -> None:
    scorer = TokenScorer(classifier)
    sequences, attention, positions, _ = _batched(PROMPTS, RESPONSES)
    width = sequences.shape[1]
    with torch.no_grad():
        batched = scorer(sequences, attention, positions)
        assert batched.shape == sequences.shape
        assert batched.dtype == torch.float32
        for row in range(len(PROMPTS)):
            alone = torch.tensor([PROMPTS[row] + RESPONSES[row]])
            values = scorer(
                alone, torch.ones_like(alone), positions_from_mask(torch.ones_like(alone))
            )
            n = alone.shape[1]
            assert_close(batched[row, width - n :], values[0], **TOL)
            # brute force: the HF classifier's own pooled score of every prefix
            prefixes = [classifier(input_ids=alone[:, : k + 1]).logits[0, 0] for k in range(n)]
            assert_close(values[0], torch.stack(prefixes), **TOL)


# ----------------------------------------------------------------------------- make_experience


def ppo_cfg(**overrides: Any) -> Any:
    return load_params(REPO / "params.yaml").ppo.model_copy(update=overrides)


def random_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (batch,), generator=gen).tolist()
    rows = [[BOS, *torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist()] for n in lengths]
    assert len(set(lengths)) > 1  # some rows are left-padded
    return left_pad(rows)


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
            # test_left_padding_does_not_change_values)
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
