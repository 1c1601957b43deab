"""The random tiny models of the scoring, rollout and evaluate tests (tests/tiny.py), built once
per module: two policies and two 1-label classifiers, each with its own seed."""

from __future__ import annotations

from typing import Any

import pytest

from tests.tiny import tiny_classifier, tiny_lm


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
