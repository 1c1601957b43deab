"""Where a stage runs (flows/infra/deployment.py: placement): the most specific choice wins —
$RLHF_ORCHESTRATION's for the stage, then `orchestration.stages.<stage>`, then the variable's
default, then `orchestration.backend` / `work_pool`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flows.infra.deployment import placement
from tasks.errors import UserError
from tasks.params import load_params


@pytest.fixture
def params(make_params: Callable[..., Path]) -> Callable[..., object]:
    def make(stages: dict | None = None, backend: str = "local") -> object:
        overrides = {"orchestration.backend": backend, "orchestration.stages": stages or {}}
        return load_params(make_params(overrides))

    return make


@pytest.mark.parametrize(
    ("variable", "stages", "expected"),
    [
        ("", None, {"prepare": ("local", "gpu"), "ppo": ("local", "gpu")}),
        ("deployment", None, {"prepare": ("deployment", "gpu"), "ppo": ("deployment", "gpu")}),
        (
            "deployment,prepare=local,ppo=deployment@big",
            None,
            {
                "prepare": ("local", "gpu"),
                "sft": ("deployment", "gpu"),
                "ppo": ("deployment", "big"),
            },
        ),
        (  # the params' per-stage choice beats the variable's default ...
            "deployment",
            {"prepare": {"backend": "local"}, "ppo": {"work_pool": "big"}},
            {
                "prepare": ("local", "gpu"),
                "sft": ("deployment", "gpu"),
                "ppo": ("deployment", "big"),
            },
        ),
        (  # ... and the variable's per-stage choice beats the params'
            "prepare=deployment@cpu",
            {"prepare": {"backend": "local"}},
            {"prepare": ("deployment", "cpu"), "sft": ("local", "gpu")},
        ),
    ],
)
def test_the_most_specific_choice_wins(
    params: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    stages: dict | None,
    expected: dict[str, tuple[str, str]],
) -> None:
    monkeypatch.setenv("RLHF_ORCHESTRATION", variable)
    loaded = params(stages)
    assert {stage: placement(stage, loaded) for stage in expected} == expected


def test_params_alone_place_the_stages(params: Callable[..., object]) -> None:
    loaded = params({"evaluate": {"backend": "local"}}, backend="deployment")
    assert placement("evaluate", loaded) == ("local", "gpu")
    assert placement("grpo", loaded) == ("deployment", "gpu")


@pytest.mark.parametrize(
    "variable", ["remote", "deployment,ppo=gpu", "sft=local,nope=local", "@big"]
)
def test_a_bad_variable_is_one_line(
    params: Callable[..., object], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv("RLHF_ORCHESTRATION", variable)
    with pytest.raises(UserError, match=r"^RLHF_ORCHESTRATION=.*stage=backend\[@pool\]"):
        placement("sft", params())


def test_an_unknown_stage_in_params_is_refused(make_params: Callable[..., Path]) -> None:
    from tasks.errors import ParamsError

    with pytest.raises(ParamsError, match=r"orchestration\.stages\.nope"):
        load_params(make_params({"orchestration.stages": {"nope": {"backend": "local"}}}))
