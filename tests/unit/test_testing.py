"""The helpers of flows/infra/testing.py that every other test relies on: params overrides, the FAST
sizes, the upstream stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from flows.infra.testing import DELETE, FAST, REPO, SMALL, upstream, write_params
from tasks.params import load_params
from tasks.stages import STAGES, TRL_STAGES


def _read(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def test_write_params_overrides_and_keeps_comments(tmp_path: Path) -> None:
    path = write_params(tmp_path / "p.yaml", {"data.eval_fraction": 0.2, "common.device": DELETE})
    tree = _read(path)
    assert tree["data"]["eval_fraction"] == 0.2
    assert "device" not in tree["common"]
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Every key is required")  # a round trip: comments stay
    assert _read(write_params(tmp_path / "q.yaml", {})) == _read(REPO / "params.yaml")


@pytest.mark.parametrize(
    "key", ["data.sourse", "nope.trainer.max_steps", "model.tiny.x.y", "ppo.adaptive_kl.target"]
)
def test_write_params_rejects_a_key_params_yaml_lacks(tmp_path: Path, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        write_params(tmp_path / "p.yaml", {key: 1})
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        write_params(tmp_path / "p.yaml", {key: DELETE})


def test_write_params_adds_trainer_fields_and_asked_for_keys(tmp_path: Path) -> None:
    tree = _read(write_params(tmp_path / "p.yaml", {"sft.trainer.max_steps": 3}))
    assert tree["sft"]["trainer"]["max_steps"] == 3
    tree = _read(write_params(tmp_path / "p.yaml", {"data.sourse": "x"}, new_keys=True))
    assert tree["data"]["sourse"] == "x"


def test_fast_makes_every_stage_short_and_loads(tmp_path: Path) -> None:
    assert SMALL.items() <= FAST.items()
    for stage in TRL_STAGES:
        assert FAST[f"{stage}.trainer.max_steps"] == 3, stage
    params = load_params(write_params(tmp_path / "p.yaml", FAST))
    assert params.ppo.num_iterations == 2
    assert params.evaluate.max_prompts == 16


def test_upstream_follows_the_inputs() -> None:
    assert upstream("prepare") == []
    assert upstream("sft") == ["prepare"]
    assert upstream("ppo") == ["prepare", "sft", "reward_model"]
    assert upstream("evaluate") == [spec.name for spec in STAGES[:-1]]
