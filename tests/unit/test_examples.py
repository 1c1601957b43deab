"""The example params files in docs/examples/ load with today's config and say what their docs say.

Loading goes through `tasks.params.load_params`, every section and every `trainer:` against its
TRL config, so a renamed or new key in tasks/config.py, or a TRL config field that disappears,
fails here instead of in a user's first run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from flows.infra.testing import write_params
from tasks.errors import ParamsError
from tasks.params import load_params
from tasks.stages import STAGE, STAGES, TRL_STAGES
from tests.unit.test_config import _leaves

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
QWEN = EXAMPLES / "params-qwen2.5-0.5b.yaml"
TRAINED = tuple(spec.name for spec in STAGES if spec.kind in ("trl", "ppo"))  # with a lora


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_loads_as_written(path: Path) -> None:
    """Every value of the file is the loaded value: nothing is dropped or replaced."""
    written = dict(_leaves(YAML(typ="safe").load(path.read_text(encoding="utf-8"))))
    loaded = dict(_leaves(load_params(path).model_dump()))
    assert {key: loaded.get(key, "<missing>") for key in written} == written


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_a_misspelt_trainer_field_in_an_example_fails(path: Path, tmp_path: Path) -> None:
    """The TRL check runs on the examples too (a `learning_rat` passed before)."""
    for stage in TRL_STAGES:
        bad = write_params(tmp_path / path.name, {f"{stage}.trainer.learning_rat": 1e-4}, base=path)
        where = rf"^{re.escape(str(bad))}:\d+: {stage}\.trainer\.learning_rat: not a field of "
        with pytest.raises(ParamsError, match=where):
            load_params(bad)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_has_the_same_sections_as_params_yaml(path: Path) -> None:
    yaml = YAML(typ="safe")
    example = yaml.load(path.read_text(encoding="utf-8"))
    project = yaml.load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert list(example) == list(project)


def test_qwen_example_uses_a_hub_model_and_hub_data() -> None:
    params = load_params(QWEN)
    assert params.model.base == "Qwen/Qwen2.5-0.5B-Instruct"
    assert params.model.trust_remote_code is False
    assert params.data.source == "hub"
    assert params.data.preference.name == "trl-lib/ultrafeedback_binarized"
    # SFT and prompts fall back to the preference pairs (prompt + chosen, preference prompts).
    assert params.data.sft.name is None
    assert params.data.prompts.name is None


def test_qwen_example_trains_lora_in_bf16_on_a_gpu() -> None:
    params = load_params(QWEN)
    assert params.common.device == "cuda"
    assert params.model.dtype == "bfloat16"
    for stage in TRAINED:
        lora = getattr(params, stage).lora
        assert lora is not None, f"{stage}.lora"
        assert lora.target_modules == "all-linear"
    assert params.ppo.gradient_checkpointing
    for stage in TRL_STAGES:
        trainer = getattr(params, stage).trainer
        assert trainer["activation_checkpointing"] is True, stage
        if STAGE[stage].online:  # prompts only: the completion is what is limited
            assert trainer["max_completion_length"] == 256, stage
            assert trainer["num_generations"] == 8, stage
        else:
            assert trainer["max_length"] == 1024, stage
            assert trainer["num_train_epochs"] == 1, stage


def test_qwen_example_learning_rates_and_losses() -> None:
    params = load_params(QWEN)
    # TRL's example scripts' LoRA learning rates (docs/real-models.md cites them).
    assert params.sft.trainer["learning_rate"] == pytest.approx(2e-4)
    assert params.reward_model.trainer["learning_rate"] == pytest.approx(1e-4)
    assert params.dpo.trainer["learning_rate"] == pytest.approx(5e-6)
    assert params.dpo.trainer["beta"] == pytest.approx(0.1)
    simpo = params.simpo.trainer
    assert (simpo["loss_type"], simpo["cpo_alpha"]) == ("simpo", 0.0)
    assert simpo["beta"] == pytest.approx(2.5)
    assert simpo["simpo_gamma"] / simpo["beta"] == pytest.approx(0.5)  # TRL's gamma is absolute
