"""Unit tests for tasks/scoring.py on tiny random Llamas: response masks, positions under left
padding, and the response logits and per-position scores (`TokenScorer`) of a left-padded batch
checked against each row alone and against brute-force recomputations."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tasks.ppo.losses import logprobs_from_logits
from tasks.scoring import TokenScorer, positions_from_mask, response_logits, response_mask
from tests.tiny import BOS, EOS, PAD, brute_response_mask, left_pad

TOL = {"atol": 1e-5, "rtol": 1e-5}


# ----------------------------------------------------------------------------- response_mask


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


PROMPTS = [[BOS, 5, 3], [BOS, 4, 6, 7, 3, 5, 6]]  # the first is left-padded by 4 in a batch
RESPONSES = [[6, 4, 7, 3, 5], [3, 3, 5, 7, 4]]


def _batched(
    prompts: list[list[int]], responses: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts, then responses: one batch → (sequences, attention, positions, ids)."""
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
