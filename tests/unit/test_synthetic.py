"""Unit tests for tasks/synthetic.py: the seeded generator and the ground-truth scorer."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tasks.config import SyntheticConfig
from tasks.synthetic import CLOSERS, OPENERS, generate, ground_truth

# Any question wording, ending in `<a> <op> <b>?` or `.` and a newline; operands are non-negative.
QUESTION = re.compile(r"^[^\d\n]*\b(?P<a>\d+) (?P<op>plus|minus|times) (?P<b>\d+)[?.]\n$")


def config(**overrides: Any) -> SyntheticConfig:
    values = {
        "num_sft": 3000,
        "num_preference": 500,
        "num_prompts": 200,
        "max_operand": 9,
        "operations": ["plus", "minus", "times"],
        "correct_rate": 0.7,
        "polite_rate": 0.3,
    }
    return SyntheticConfig(**(values | overrides))


@pytest.fixture(scope="module")
def default() -> dict[str, list[dict[str, Any]]]:
    return generate(config(), 42)


# ----------------------------------------------------------------------------- generator


def test_deterministic_in_the_seed(default) -> None:
    assert generate(config(), 42) == default
    other = generate(config(), 43)
    for kind in ("sft", "preference", "prompts"):
        assert other[kind] != default[kind], kind


def test_sizes_follow_the_config() -> None:
    rows = generate(config(num_sft=17, num_preference=23, num_prompts=11), 0)
    assert {kind: len(kind_rows) for kind, kind_rows in rows.items()} == {
        "sft": 17,
        "preference": 23,
        "prompts": 11,
    }
    assert all(set(r) == {"prompt", "completion"} for r in rows["sft"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows["preference"])
    assert all(set(r) == {"prompt"} for r in rows["prompts"])


def test_prompts_are_questions_with_operands_in_range(default) -> None:
    prompts = [r["prompt"] for kind_rows in default.values() for r in kind_rows]
    ops = set()
    for prompt in prompts:
        match = QUESTION.match(prompt)
        assert match, prompt
        assert int(match["a"]) <= 9 and int(match["b"]) <= 9, prompt
        ops.add(match["op"])
    assert ops == {"plus", "minus", "times"}


@pytest.mark.parametrize("operations", [["times"], ["plus", "minus"]])
def test_operations_restricted_to_the_config(operations) -> None:
    rows = generate(config(operations=operations, max_operand=3), 1)
    prompts = [r["prompt"] for kind_rows in rows.values() for r in kind_rows]
    matches = [QUESTION.match(p) for p in prompts]
    assert all(matches), [p for p, m in zip(prompts, matches, strict=True) if not m][:3]
    assert {m["op"] for m in matches} == set(operations)
    assert max(max(int(m["a"]), int(m["b"])) for m in matches) == 3


def test_chosen_always_scores_higher(default) -> None:
    margins = set()
    for row in default["preference"]:
        chosen = ground_truth(row["prompt"], row["chosen"])["score"]
        rejected = ground_truth(row["prompt"], row["rejected"])["score"]
        assert chosen > rejected, row
        margins.add(chosen - rejected)
    assert margins == {0.5, 1.0}  # both one-level and two-level gaps occur


def test_sft_quality_rates_follow_the_config(default) -> None:
    scores = [ground_truth(r["prompt"], r["completion"]) for r in default["sft"]]
    n = len(scores)
    correct = sum(s["correct"] for s in scores) / n
    polite = sum(s["polite"] for s in scores) / n
    # n = 3000: the standard error is below 0.009, so 0.03 is more than 3 of them.
    assert correct == pytest.approx(0.7, abs=0.03)
    assert polite == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize(("correct_rate", "polite_rate"), [(0.0, 1.0), (1.0, 0.0)])
def test_extreme_rates(correct_rate, polite_rate) -> None:
    rows = generate(config(num_sft=200, correct_rate=correct_rate, polite_rate=polite_rate), 3)
    for row in rows["sft"]:
        truth = ground_truth(row["prompt"], row["completion"])
        assert truth["correct"] == correct_rate and truth["polite"] == polite_rate, row


# ----------------------------------------------------------------------------- scorer


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (
            "What is 3 plus 4?\n",
            "Sure! 3 plus 4 is 7. Hope this helps!",
            {"correct": 1.0, "polite": 1.0, "score": 1.0},
        ),
        ("What is 3 plus 4?\n", "7.", {"correct": 1.0, "polite": 0.0, "score": 0.5}),
        (
            "Compute 3 plus 4.\n",
            "Of course! 3 plus 4 is 8. Have a nice day!",
            {"correct": 0.0, "polite": 1.0, "score": 0.5},
        ),
        ("Compute 2 minus 5.\n", "-3.", {"correct": 1.0, "polite": 0.0, "score": 0.5}),
        ("Compute 2 minus 5.\n", "3.", {"correct": 0.0, "polite": 0.0, "score": 0.0}),
        (
            "Tell me 2 minus 9.\n",
            "Happy to help! 2 minus 9 is -7. Hope this helps!",
            {"correct": 1.0, "polite": 1.0, "score": 1.0},
        ),
        ("Tell me 6 times 7.\n", "42.", {"correct": 1.0, "polite": 0.0, "score": 0.5}),
        (
            "Tell me 6 times 7.\n",
            "The answer is 142.",
            {"correct": 0.0, "polite": 0.0, "score": 0.0},
        ),
        (
            "What is 3 plus 4?\n",
            "Sure! I cannot count. Hope this helps!",
            {"correct": 0.0, "polite": 1.0, "score": 0.5},
        ),
        ("What is 3 plus 4?\n", "", {"correct": 0.0, "polite": 0.0, "score": 0.0}),
        ("What is 3 plus 4?\n", "Sure! 7.", {"correct": 1.0, "polite": 0.0, "score": 0.5}),
        (
            "What is 3 plus 4?\n",
            "7. Hope this helps!",
            {"correct": 1.0, "polite": 0.0, "score": 0.5},
        ),
        (
            "What is 3 plus 4?\n",
            "  Sure! It is 7. Have a nice day!\n",
            {"correct": 1.0, "polite": 1.0, "score": 1.0},
        ),
    ],
)
def test_ground_truth_by_hand(prompt, response, expected) -> None:
    assert ground_truth(prompt, response) == expected


def test_openers_and_closers_are_what_the_scorer_knows() -> None:
    for opener in OPENERS:
        for closer in CLOSERS:
            assert ground_truth("What is 1 plus 1?\n", f"{opener} 2. {closer}")["score"] == 1.0


@pytest.mark.parametrize("prompt", ["Tell me a joke.\n", "What is 3 divided by 4?\n", ""])
def test_non_synthetic_prompt_is_rejected(prompt) -> None:
    with pytest.raises(ValueError, match=r"^not a synthetic arithmetic prompt: ") as info:
        ground_truth(prompt, "7.")
    assert repr(prompt) in str(info.value)
