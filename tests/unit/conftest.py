"""The random tiny models of the scoring, rollout and evaluate tests (tests/tiny.py), built once
per module: two policies and two 1-label classifiers, each with its own seed; and a workdir with
a tiny tokenizer, base model and reward model for the text-level scorers (online, held-out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.models import build_tiny, load_scorer, load_tokenizer
from tasks.params import load_params
from tests.tiny import tiny_classifier, tiny_lm

PROMPTS = ["What is 1 plus 2?\n", "Compute 3 minus 1.\n", "Tell me 2 plus 2.\n"]
COMPLETIONS = [
    "Sure! The answer is 3. Hope this helps!",
    "2.",
    "Of course! The answer is 5. Have a nice day!",
]
STATS = {"reward_mean": 0.25, "reward_std": 2.0}


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_lm(0)


@pytest.fixture(scope="module")
def other_lm() -> Any:
    """A second policy (different weights): the reference when KL must not vanish."""
    return tiny_lm(1)


@pytest.fixture(scope="module")
def classifier() -> Any:
    """The critic's classifier."""
    return tiny_classifier(2)


@pytest.fixture(scope="module")
def reward_classifier() -> Any:
    return tiny_classifier(3)


@pytest.fixture
def reward_model(workdir: Path, make_params) -> tuple[object, object]:
    """models/base (the tiny tokenizer + model) and models/reward_model (a 1-label classifier on
    it with a random head, its score statistics) in the working directory → (params, tokenizer)."""
    params = load_params(make_params({"model.tiny.hidden_size": 16, "model.tiny.num_heads": 2}))
    base = workdir / "models" / "base"
    build_tiny(params.model, 0, [*PROMPTS, *COMPLETIONS] * 10, base)
    tokenizer = load_tokenizer("base", params.model)
    scorer = load_scorer("base", params.model, torch.float32, tokenizer.pad_token_id)
    torch.manual_seed(1)
    with torch.no_grad():
        scorer.score.weight.normal_(0.0, 1.0)
    scorer.save_pretrained(workdir / "models" / "reward_model")
    tokenizer.save_pretrained(workdir / "models" / "reward_model")
    (workdir / "models" / "reward_model" / "reward_stats.json").write_text(json.dumps(STATS))
    return params, tokenizer
