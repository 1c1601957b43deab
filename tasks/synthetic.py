"""The embedded default task: arithmetic questions answered correctly or not, politely or curtly.

Every example has a ground truth, so evaluation can put true quality beside the reward model's
opinion (reward hacking shows as the two diverging). SFT data is of mixed quality — some answers
are wrong, most are curt — and every preference pair prefers the answer with the higher
ground-truth score, so alignment should raise both the correct and the polite rate above SFT's.
See docs/synthetic-task.md.
"""

from __future__ import annotations

import random
import re
from typing import Any

from tasks.config import SyntheticConfig

OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Tell me {a} {op} {b}.",
    "{name} asks: what is {a} {op} {b}?",
    "{name} wants to know {a} {op} {b}.",
    "How much is {a} {op} {b}?",
)
NAMES = ("Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana")
OPENERS = ("Sure!", "Happy to help!", "Of course!")
CLOSERS = ("Hope this helps!", "Have a nice day!")
_QUESTION = re.compile(r"(-?\d+) (plus|minus|times) (-?\d+)")
_NUMBER = re.compile(r"-?\d+")


def make_prompt(rng: random.Random, cfg: SyntheticConfig) -> str:
    """A random question, newline-terminated so the answer starts on its own line."""
    a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
    template = rng.choice(QUESTIONS)
    name = rng.choice(NAMES)
    return template.format(a=a, op=rng.choice(cfg.operations), b=b, name=name) + "\n"


def make_answer(rng: random.Random, prompt: str, correct: bool, polite: bool) -> str:
    """An answer to `prompt` of the requested quality; a wrong answer is off by 1–3."""
    a, op, b = _parse(prompt)
    result = OPERATIONS[op](a, b)
    if not correct:
        result += rng.choice((-3, -2, -1, 1, 2, 3))
    if polite:
        return f"{rng.choice(OPENERS)} The answer is {result}. {rng.choice(CLOSERS)}"
    return f"{result}."


def ground_truth(prompt: str, response: str) -> dict[str, float]:
    """Score a response: `correct` (its last number is the right result), `polite` (starts with
    an opener and ends with a closer) and `score` = their mean, in [0, 1]."""
    a, op, b = _parse(prompt)
    numbers = _NUMBER.findall(response)
    correct = bool(numbers) and int(numbers[-1]) == OPERATIONS[op](a, b)
    text = response.strip()
    polite = text.startswith(OPENERS) and text.endswith(CLOSERS)
    return {"correct": float(correct), "polite": float(polite), "score": (correct + polite) / 2}


def generate(cfg: SyntheticConfig, seed: int) -> dict[str, list[dict[str, Any]]]:
    """SFT, preference and prompt rows in TRL's standard formats, deterministic in `seed`."""
    rng = random.Random(seed)
    sft = []
    for _ in range(cfg.num_sft):
        prompt = make_prompt(rng, cfg)
        correct, polite = rng.random() < cfg.correct_rate, rng.random() < cfg.polite_rate
        sft.append({"prompt": prompt, "completion": make_answer(rng, prompt, correct, polite)})
    # Quality levels (correct, polite); a pair takes two with different ground-truth scores.
    levels = [(True, True), (True, False), (False, True), (False, False)]
    preference = []
    for _ in range(cfg.num_preference):
        prompt = make_prompt(rng, cfg)
        better, worse = sorted(rng.sample(levels, 2), key=sum, reverse=True)
        while sum(better) == sum(worse):
            better, worse = sorted(rng.sample(levels, 2), key=sum, reverse=True)
        preference.append(
            {
                "prompt": prompt,
                "chosen": make_answer(rng, prompt, *better),
                "rejected": make_answer(rng, prompt, *worse),
            }
        )
    prompts = [{"prompt": make_prompt(rng, cfg)} for _ in range(cfg.num_prompts)]
    return {"sft": sft, "preference": preference, "prompts": prompts}


def _parse(prompt: str) -> tuple[int, str, int]:
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"not a synthetic arithmetic prompt: {prompt!r}")
    return int(match[1]), match[2], int(match[3])
