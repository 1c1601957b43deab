"""Unit tests for tasks/config.py: the repo's params.yaml, and one exact line per kind of error."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from transformers.trainer_utils import SchedulerType

import flows.infra.cli
from flows.infra.testing import DELETE
from tasks.errors import ParamsError
from tasks.params import Params, load_params
from tasks.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
REPO_PARAMS = REPO / "params.yaml"
MISSING = "missing key (it has no default; copy it from the project's params.yaml)"
PLAIN = (bool, int, float, str, type(None))


def key_line(path: Path, dotted: str) -> int:
    """1-based line of `dotted` (`data.sft.path`) in a block-style YAML file, by indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start, indent, found = 0, -1, -1
    for part in dotted.split("."):
        found, child = -1, None
        for number in range(start, len(lines)):
            text = lines[number].lstrip()
            if not text or text.startswith("#"):
                continue
            depth = len(lines[number]) - len(text)
            if depth <= indent:
                break  # left the parent mapping
            child = depth if child is None else child
            if depth == child and re.match(rf"{re.escape(part)}:(\s|$)", text):
                found = number
                break
        if found < 0:
            raise AssertionError(f"{dotted}: no line for {part!r} in {path}")
        start, indent = found + 1, child
    return found + 1


def text_line(path: Path, pattern: str) -> int:
    """1-based line of the only line of `path` matching the regex `pattern`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = [n for n, line in enumerate(lines, start=1) if re.search(pattern, line)]
    assert len(hits) == 1, f"{pattern!r} matches lines {hits} of {path}"
    return hits[0]


def load_error(path: Path) -> str:
    """The one line reading `path` gives: the schema, then the TRL check of `trainer:` keys."""
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- the repo's file


def test_repo_params_load_with_plain_python_types() -> None:
    params = load_params(REPO_PARAMS)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{where}.{name}".lstrip("."))
        elif isinstance(value, dict):
            assert type(value) is dict, (where, type(value))
            for key, item in value.items():
                assert type(key) is str, (where, type(key))
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            assert type(value) is list, (where, type(value))
            for i, item in enumerate(value):
                walk(item, f"{where}.{i}")
        else:
            assert type(value) in PLAIN, (where, type(value))

    walk(params, "")
    assert type(params.common.seed) is int
    assert type(params.ppo.temperature) is float
    assert type(params.dpo.trainer["loss_type"]) is list


def test_scientific_notation_is_a_float(make_params) -> None:
    # ruamel reads `3.0e-3` as its own ScalarFloat; the loaded params hold plain floats.
    raw = dict(_leaves(YAML().load(REPO_PARAMS)))
    loaded = dict(_leaves(load_params(REPO_PARAMS).model_dump()))
    ruamel_floats = [k for k, v in raw.items() if isinstance(v, float) and type(v) is not float]
    assert ruamel_floats, "expected the round-trip loader to give ScalarFloat values"
    for key in ruamel_floats:
        assert type(loaded[key]) is float, (key, type(loaded[key]))
        assert loaded[key] == raw[key]
    # YAML 1.2 reads `1e-5` (no dot) as a float too, unlike PyYAML.
    path = make_params({"ppo.actor_lr": "LR_PLACEHOLDER"})
    path.write_text(path.read_text().replace("LR_PLACEHOLDER", "1e-5"))
    actor_lr = load_params(path).ppo.actor_lr
    assert type(actor_lr) is float
    assert actor_lr == 1e-5


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}.{k}".lstrip("."))]
    return [(prefix, tree)]


def test_models_are_frozen() -> None:
    params = load_params(REPO_PARAMS)
    with pytest.raises(ValidationError, match="frozen"):
        params.common.seed = 7  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        params.model.tiny.num_heads = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        params.data = params.data  # type: ignore[misc]
    assert params.common.seed == load_params(REPO_PARAMS).common.seed


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every pydantic model reachable from its fields (through Optional/unions)."""
    found = [model]
    for field in model.model_fields.values():
        for candidate in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found += [m for m in _models(candidate) if m not in found]
    return found


def test_every_field_is_in_the_repo_params_yaml() -> None:
    raw = YAML(typ="safe").load(REPO_PARAMS)
    missing: list[str] = []

    def walk(model: type[BaseModel], node: Any, where: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{where}.{name}".lstrip(".")
            if not isinstance(node, dict) or name not in node:
                missing.append(key)
                continue
            if typing.get_origin(field.annotation) is dict:  # a mapping of sections by name
                continue
            for candidate in typing.get_args(field.annotation) or (field.annotation,):
                is_model = isinstance(candidate, type) and issubclass(candidate, BaseModel)
                if is_model and isinstance(node[name], dict):
                    walk(candidate, node[name], key)

    walk(Params, raw, "")
    assert missing == []
    assert set(raw) == set(Params.model_fields)


def test_every_field_has_a_description() -> None:
    models = _models(Params)
    assert {m.__name__ for m in models} >= {"LoraConfig", "AdaptiveKLConfig", "TinyModelConfig"}
    undocumented = [
        f"{model.__name__}.{name}"
        for model in models
        if model is not Params
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undocumented == []


def test_every_section_has_a_description() -> None:
    # SPEC §4: a docstring per field, the top-level sections included.
    undocumented = [
        name for name, field in Params.model_fields.items() if not (field.description or "").strip()
    ]
    assert undocumented == []


# ----------------------------------------------------------------------------- error lines


ERRORS = [
    # unknown keys, with a suggestion when one is close
    (
        {"data.sourse": "synthetic"},
        "data.sourse",
        "data.sourse: unknown key (did you mean 'source'?)",
    ),
    (
        {"data.source": "DELETE", "data.sourse": "synthetic"},  # misspelt beats missing
        "data.sourse",
        "data.sourse: unknown key (did you mean 'source'?)",
    ),
    ({"evalute": 1}, "evalute", "evalute: unknown key (did you mean 'evaluate'?)"),
    (
        {"zzz": 1},
        "zzz",
        "zzz: unknown key (known keys: common, model, data, sft, reward_model, ppo, dpo, simpo, "
        "grpo, rloo, evaluate, tracking, orchestration)",
    ),
    (
        {"model.tiny.num_heads": "DELETE", "model.tiny.num_head": 4},
        "model.tiny.num_head",
        "model.tiny.num_head: unknown key (did you mean 'num_heads'?)",
    ),
    (
        {"ppo.adaptive_kl": {"target": 6.0, "horizn": 100}},  # inside an Optional section
        "ppo.adaptive_kl.horizn",
        "ppo.adaptive_kl.horizn: unknown key (did you mean 'horizon'?)",
    ),
    ({"common.zzz": 1}, "common.zzz", "common.zzz: unknown key (known keys: seed, device)"),
    # missing keys: the line of the enclosing section
    ({"data.eval_fraction": "DELETE"}, "data", f"data.eval_fraction: {MISSING}"),
    ({"model.tiny.vocab_size": "DELETE"}, "model.tiny", f"model.tiny.vocab_size: {MISSING}"),
    ({"ppo": "DELETE"}, None, f"ppo: {MISSING}"),
    # wrong types
    (
        {"common.seed": "abc"},
        "common.seed",
        "common.seed: input should be a valid integer, unable to parse string as an integer, "
        "got 'abc'",
    ),
    (
        {"common.seed": 1.5},
        "common.seed",
        "common.seed: input should be a valid integer, got a number with a fractional part, "
        "got 1.5",
    ),
    (
        {"ppo.whiten_advantages": "maybe"},
        "ppo.whiten_advantages",
        "ppo.whiten_advantages: input should be a valid boolean, unable to interpret input, "
        "got 'maybe'",
    ),
    (
        {"common": 5},
        "common",
        "common: input should be a valid dictionary or instance of CommonConfig, got 5",
    ),
    # out of range
    (
        {"data.eval_fraction": 1.5},
        "data.eval_fraction",
        "data.eval_fraction: input should be less than or equal to 0.5, got 1.5",
    ),
    ({"ppo.top_p": 0}, "ppo.top_p", "ppo.top_p: input should be greater than 0, got 0"),
    (
        {"evaluate.max_prompts": 0},
        "evaluate.max_prompts",
        "evaluate.max_prompts: input should be greater than or equal to 1, got 0",
    ),
    (
        {"ppo.adaptive_kl": {"target": 0, "horizon": 100}},
        "ppo.adaptive_kl.target",
        "ppo.adaptive_kl.target: input should be greater than 0, got 0",
    ),
    # Literal mismatch
    (
        {"data.source": "s3"},
        "data.source",
        "data.source: input should be 'synthetic', 'local' or 'hub', got 's3'",
    ),
    (
        {"common.device": "tpu"},
        "common.device",
        "common.device: input should be 'auto', 'cpu' or 'cuda', got 'tpu'",
    ),
    # cross-field checks: the line of the key they name
    (
        {"model.tiny.hidden_size": 96, "model.tiny.num_heads": 5},
        "model.tiny.num_heads",
        "model.tiny.num_heads: 5 does not divide hidden_size 96",
    ),
    (
        {"ppo.rollout_batch_size": 64, "ppo.mini_batch_size": 10},
        "ppo.mini_batch_size",
        "ppo.mini_batch_size: 10 does not divide rollout_batch_size 64",
    ),
    (
        {"evaluate.policies": ["ppo", "dpo"]},
        "evaluate.policies",
        "evaluate.policies: must include 'sft' (the reference for win rate and KL)",
    ),
    (
        {"evaluate.policies": ["sft", "ppo", "sft"]},
        "evaluate.policies",
        "evaluate.policies: listed twice in ['sft', 'ppo', 'sft']",
    ),
    (
        {"data.sft.path": "data/raw/sft.jsonl"},
        "data.sft.path",
        "data.sft.path: set but data.source is 'synthetic' (set data.source: local, or path: null)",
    ),
    (
        {"data.source": "local", "data.prompts.name": "org/prompts"},
        "data.prompts.name",
        "data.prompts.name: set but data.source is 'local' (set data.source: hub, or name: null)",
    ),
    (
        {"data.source": "local"},
        "data.preference.path",
        "data.preference.path: not set, but data.source is 'local' "
        "(the reward model, DPO and SimPO need preference pairs)",
    ),
    (
        {"data.source": "hub"},
        "data.preference.name",
        "data.preference.name: not set, but data.source is 'hub' "
        "(the reward model, DPO and SimPO need preference pairs)",
    ),
    # trainer sections: checked against the TRL config dataclass
    (
        {"sft.trainer.learning_rat": 1.0e-3},
        "sft.trainer.learning_rat",
        "sft.trainer.learning_rat: not a field of SFTConfig (did you mean 'learning_rate'?)",
    ),
    (
        {"dpo.trainer.bta": 0.1},
        "dpo.trainer.bta",
        "dpo.trainer.bta: not a field of DPOConfig (did you mean 'beta'?)",
    ),
    (
        {"sft.trainer.num_train_epochs": "many"},
        "sft.trainer.num_train_epochs",
        "sft.trainer.num_train_epochs: input should be a valid number, unable to parse string as "
        "a number, got 'many' (type of SFTConfig.num_train_epochs: <class 'float'>)",
    ),
    (
        {"dpo.trainer.loss_type": "sigmoid"},
        "dpo.trainer.loss_type",
        "dpo.trainer.loss_type: input should be a valid list, got 'sigmoid' "
        "(type of DPOConfig.loss_type: list[str])",
    ),
    (  # choices, as HfArgumentParser refuses them: an enum's values, a field's `choices`
        {"dpo.trainer.eval_strategy": "epochs"},
        "dpo.trainer.eval_strategy",
        "dpo.trainer.eval_strategy: must be one of 'no', 'steps', 'epoch', got 'epochs' "
        "(did you mean 'epoch'?)",
    ),
    (
        {"sft.trainer.loss_type": "nl"},
        "sft.trainer.loss_type",
        "sft.trainer.loss_type: must be one of 'nll', 'dft', 'chunked_nll', got 'nl' "
        "(did you mean 'nll'?)",
    ),
    (
        {"rloo.trainer.lr_scheduler_type": "cosinee"},
        "rloo.trainer.lr_scheduler_type",
        f"rloo.trainer.lr_scheduler_type: must be one of the {len(SchedulerType)} values of "
        "RLOOConfig.lr_scheduler_type, got 'cosinee' (did you mean 'cosine'?)",
    ),
    (
        {"sft.trainer.output_dir": "elsewhere"},
        "sft.trainer.output_dir",
        "sft.trainer.output_dir: set by the pipeline, remove it",
    ),
    (
        {"reward_model.trainer.seed": 1},
        "reward_model.trainer.seed",
        "reward_model.trainer.seed: set by the pipeline, remove it",
    ),
    (
        {"simpo.trainer.loss_type": "sigmoid"},
        "simpo.trainer.loss_type",
        "simpo.trainer.loss_type: must be 'simpo', got 'sigmoid' (other losses belong to other "
        "stages)",
    ),
    (
        {"simpo.trainer.cpo_alpha": 1.0},
        "simpo.trainer.cpo_alpha",
        "simpo.trainer.cpo_alpha: must be 0.0; a non-zero value is CPO-SimPO, a different method",
    ),
    (
        {"simpo.trainer.beta": 0.1},
        "simpo.trainer.beta",
        "simpo.trainer.beta: 0.1 is DPO-sized; SimPO wants beta ≈ 2–10",
    ),
    # the online stages: rewards and groups
    (
        {"grpo.rewards": {"reward_modle": 1.0}},
        "grpo.rewards.reward_modle",
        "grpo.rewards.reward_modle: input should be 'reward_model' or 'ground_truth', "
        "got 'reward_modle'",
    ),
    (
        {"rloo.rewards": {"reward_model": 1.0, "ground_truth": -0.5}},
        "rloo.rewards.ground_truth",
        "rloo.rewards.ground_truth: weight -0.5 is negative (use 0 or more)",
    ),
    (
        {"grpo.trainer.num_generations": 1},
        "grpo.trainer.num_generations",
        "grpo.trainer.num_generations: 1; a group needs at least 2 completions per prompt "
        "(its advantages compare them)",
    ),
    (
        {"rloo.trainer.generation_batch_size": 12},
        "rloo.trainer.num_generations",
        "rloo.trainer.num_generations: 8 does not divide the 12 completions generated per step "
        "(trainer.generation_batch_size, by default per_device_train_batch_size × processes × "
        "steps_per_generation)",
    ),
    (
        {"grpo.trainer.per_device_train_batch_size": 12},
        "grpo.trainer.num_generations",
        "grpo.trainer.num_generations: 8 does not divide the 12 completions generated per step "
        "(trainer.generation_batch_size, by default per_device_train_batch_size × processes × "
        "steps_per_generation)",
    ),
    (
        {"grpo.trainer.reward_weights": [2.0]},
        "grpo.trainer.reward_weights",
        "grpo.trainer.reward_weights: set by the pipeline from rewards, remove it",
    ),
    (
        {
            "data.source": "local",
            "data.preference.path": "data/raw/pairs.jsonl",
            "grpo.rewards": {"reward_model": 1.0, "ground_truth": 1.0},
        },
        "grpo.rewards.ground_truth",
        "grpo.rewards.ground_truth: data.source is 'local', whose prompts have no ground truth "
        "(only the synthetic task's do); remove ground_truth from grpo.rewards",
    ),
]


@pytest.mark.parametrize(("overrides", "line_key", "expected"), ERRORS, ids=lambda v: str(v)[:60])
def test_error_line(make_params, overrides, line_key, expected) -> None:
    overrides = {k: DELETE if v == "DELETE" else v for k, v in overrides.items()}
    path = make_params(overrides, new_keys=True)  # some rows misspell a key on purpose
    line = key_line(path, line_key) if line_key else 1
    assert load_error(path) == f"{path}:{line}: {expected}"


def test_error_line_of_a_list_item(make_params) -> None:
    path = make_params({"data.synthetic.operations": ["plus", "divide"]})
    line = text_line(path, r"\bdivide\b")
    assert load_error(path) == (
        f"{path}:{line}: data.synthetic.operations.1: input should be 'plus', 'minus' or 'times', "
        "got 'divide'"
    )


def test_union_error_names_the_key_not_the_union_member(make_params) -> None:
    # `target_modules: list[str] | Literal["all-linear"]`: the reported key must be one the user
    # can find in params.yaml, and the hint must not hide the `all-linear` alternative.
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all"}
    path = make_params({"ppo.lora": lora})
    message = load_error(path)
    line = key_line(path, "ppo.lora.target_modules")
    assert message.startswith(f"{path}:{line}: ppo.lora.target_modules: "), message
    assert "all-linear" in message, message


@pytest.mark.parametrize(("source", "key"), [("local", "path"), ("hub", "name")])
def test_source_without_preferences_is_rejected(make_params, tmp_path, source, key) -> None:
    # prepare needs preferences (reward model, DPO, SimPO and the PPO prompts come from them):
    # a config with only the SFT source must fail at load time, not later in prepare.
    path = make_params({"data.source": source, f"data.sft.{key}": str(tmp_path / "sft.jsonl")})
    line = key_line(path, f"data.preference.{key}")
    message = load_error(path)
    assert message.startswith(f"{path}:{line}: data.preference.{key}: "), message


def test_valid_overrides_load(make_params) -> None:
    # The cross-field checks do not reject what they should accept.
    lora = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
    params = load_params(
        make_params(
            {
                "data.source": "local",
                "data.preference.path": "data/raw/pairs.jsonl",
                "data.preference.columns": {"prompt": "question"},
                "ppo.adaptive_kl": {"target": 6.0, "horizon": 10000},
                "ppo.lora": lora,
                "evaluate.policies": ["sft"],
                "model.tiny.hidden_size": 96,
                "model.tiny.num_heads": 8,
            }
        )
    )
    assert params.data.preference.path == "data/raw/pairs.jsonl"
    assert params.data.preference.columns == {"prompt": "question"}
    assert params.ppo.adaptive_kl is not None and params.ppo.adaptive_kl.horizon == 10000
    assert params.ppo.lora is not None and params.ppo.lora.target_modules == "all-linear"
    assert params.evaluate.policies == ["sft"]


# ----------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("common:\n  seed: 42\n device: auto\n", 3, "expected <block end>"),
        ("common: {seed: 42\nmodel: 3\n", 2, "expected ',' or '}'"),
        ("common: {seed: 1}\nmodel: {}\ncommon: {seed: 2}\n", 3, 'duplicate key "common"'),
    ],
)
def test_invalid_yaml_names_its_line(tmp_path, text, line, problem) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    message = load_error(path)
    assert message.startswith(f"{path}:{line}: not valid YAML ("), message
    assert problem in message


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"{path}: no such file (run from the project root or pass --params)"


@pytest.mark.parametrize("text", ["- common\n- model\n", "", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_error(path) == f"{path}: expected a mapping of sections at the top level"


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"data.sourse": "synthetic"}, "data.sourse: unknown key (did you mean 'source'?)"),
        ({"common.seed": "abc"}, "common.seed: input should be a valid integer"),
    ],
)
def test_cli_bad_params_is_one_line(make_params, capsys, overrides, expected) -> None:
    bad = make_params(overrides, new_keys=True)
    line = key_line(bad, next(iter(overrides)))
    assert flows.infra.cli.main(["stage", "prepare", "--params", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rlhf: error: {bad}:{line}: {expected}"), lines[0]


def _typo(spec: Any) -> tuple[str, dict[str, Any]]:
    """A misspelt key in the stage's own section (a TRL config field for a TRL stage) →
    (its dotted key, the overrides that write it)."""
    if spec.kind == "trl":
        key = f"{spec.name}.trainer.learning_rat"
    else:
        section = Params.model_fields[spec.own_section].annotation
        key = f"{spec.own_section}.{next(iter(section.model_fields))}x"
    return key, {key: 1}


LORA_TYPO = {"r": 8, "alpah": 16, "dropout": 0.0, "target_modules": "all-linear"}
TYPOS = [_typo(spec) for spec in STAGES] + [
    ("grpo.rewards.reward_modle", {"grpo.rewards": {"reward_modle": 1.0}}),
    ("dpo.lora.alpah", {"dpo.lora": LORA_TYPO}),
]


@pytest.mark.parametrize(("dotted", "overrides"), TYPOS, ids=[key for key, _ in TYPOS])
def test_a_typo_in_any_stage_section_stops_prepare(
    make_params, capsys, monkeypatch, prefect_server: str, dotted: str, overrides: dict
) -> None:
    """`rlhf stage prepare` (what `dvc repro` runs first) checks every stage's section, the
    TRL `trainer:` fields, rewards and LoRA included: the mistake is one line naming file,
    line and key before anything is prepared."""
    bad = make_params(overrides, new_keys=True)
    line = key_line(bad, dotted)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)  # `rlhf stage` gets as far as Prefect
    monkeypatch.chdir(bad.parent)
    assert flows.infra.cli.main(["stage", "prepare", "--params", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"rlhf: error: {bad}:{line}: {dotted}: "), err
    assert not (bad.parent / "data").exists()  # nothing prepared


def test_cli_missing_params_file_is_one_line(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.yaml"
    assert flows.infra.cli.main(["stage", "prepare", "--params", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"rlhf: error: {missing}: no such file (run from the project root or pass --params)\n"
    )


def test_keys_with_an_obvious_default_may_be_left_out(tmp_path: Path) -> None:
    from flows.infra.testing import write_params

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    left_out = {
        "data.source": "local",
        "data.sft": DELETE,
        "data.prompts": DELETE,
        "data.preference": {"path": str(pairs)},
        "sft.lora": DELETE,
        "tracking.tracking_uri": DELETE,
        "tracking.system_metrics": DELETE,
    }
    params = load_params(write_params(tmp_path / "p.yaml", left_out, base=REPO_PARAMS))
    assert params.data.preference.path == str(pairs)
    assert (params.data.preference.split, params.data.preference.columns) == ("train", {})
    assert params.data.sft.path is None and params.data.prompts.name is None
    assert params.sft.lora is None and params.tracking.tracking_uri is None
    assert params.tracking.system_metrics is True


def test_the_shipped_params_list_every_key_even_those_with_defaults() -> None:
    from ruamel.yaml import YAML

    raw = YAML(typ="safe").load(REPO_PARAMS.read_text(encoding="utf-8"))

    def missing(model: type[BaseModel], tree: dict[str, Any], where: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if name not in tree:
                found.append(f"{where}{name}")
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += missing(field.annotation, tree[name], f"{where}{name}.")
        return found

    assert missing(Params, raw, "") == []
