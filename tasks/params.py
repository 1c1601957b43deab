"""`Params`, all of params.yaml (the sections of tasks/config.py, one per stage of
tasks/stages.py), and reading a file into it — or one line naming file, line and key.

`params.yaml:12: data.sourse: unknown key (did you mean 'source'?)`. The YAML is read with
ruamel.yaml, as DVC reads it (PyYAML would read `1e-5` as a string), keeping line numbers.
Every `<stage>.trainer` section is then checked against its TRL config as TRL's own scripts
(`HfArgumentParser`) check it: field names, types, choices (`check_trainers`; it imports TRL,
seconds once per process, so the CLI's first, torch-free look leaves it for later).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib
import re
import typing
import warnings
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from tasks.config import (
    CommonConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    OnlineStageConfig,
    OrchestrationConfig,
    Section,
    SimPOStageConfig,
    TrackingConfig,
    TrainerStage,
)
from tasks.errors import ParamsError
from tasks.ppo_config import PPOConfig
from tasks.stages import STAGE, STAGES, TRL_STAGES

# Keys the pipeline sets itself in every TRL config.
RESERVED_TRAINER_KEYS = frozenset(
    {"output_dir", "run_name", "report_to", "seed", "bf16", "fp16", "use_cpu", "logging_dir"}
)


# The stage sections whose schema is more than a TRL stage's `lora` + `trainer`.
SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "ppo": PPOConfig,
    "simpo": SimPOStageConfig,
    "grpo": OnlineStageConfig,
    "rloo": OnlineStageConfig,
    "evaluate": EvaluateConfig,
}


def _params_model() -> type[Section]:
    """The root model: the shared sections, one section per stage, then the untracked ones."""
    shared = {
        "common": (CommonConfig, "Seed and device shared by every stage."),
        "model": (ModelConfig, "The base model every policy starts from (tiny, hub id, dir)."),
    }
    stages = {
        spec.own_section: (SECTIONS.get(spec.own_section, TrainerStage), spec.description)
        for spec in STAGES
    }
    untracked = {
        "tracking": (TrackingConfig, "MLflow experiment, URI, registered model (not tracked)."),
        "orchestration": (OrchestrationConfig, "In-process or as deployments (not tracked)."),
    }
    fields = {
        name: (schema, Field(description=text))
        for name, (schema, text) in (shared | stages | untracked).items()
    }
    checks = {"_ground_truth_needs_its_task": model_validator(mode="after")(_ground_truth_task)}
    return create_model(
        "Params", __base__=Section, __module__=__name__, __validators__=checks, **fields
    )


def _ground_truth_task(params: Any) -> Any:
    """The `ground_truth` reward is the synthetic task's scorer: other data has none."""
    for spec in STAGES:
        rewards = getattr(getattr(params, spec.own_section), "rewards", {})
        if rewards.get("ground_truth") and params.data.source != "synthetic":
            raise ValueError(
                f"{spec.name}.rewards.ground_truth: data.source is '{params.data.source}', whose "
                f"prompts have no ground truth (only the synthetic task's do); remove "
                f"ground_truth from {spec.name}.rewards"
            )
    return params


Params = _params_model()
"""All of params.yaml: `params.common`, `params.model`, one attribute per stage section
(`params.sft`, `params.data`, …), `params.tracking`, `params.orchestration`."""


@functools.cache
def trl_config_class(stage: str) -> type:
    """The TRL config dataclass behind a TRL stage's `trainer:` section."""
    module, name = str(STAGE[stage].trl_config).split(":")
    with warnings.catch_warnings():  # SimPO lives in trl.experimental, pinned to TRL's minor
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def load_params(path: str | Path = "params.yaml", *, trainers: bool = True) -> Params:
    """Read and validate `path`: every section, and (`trainers`) every `<stage>.trainer`
    against its TRL config (`check_trainers`). ParamsError names file, line and key."""
    path = Path(path)
    raw = _read(path)
    try:
        params = Params.model_validate(_plain(raw))
    except ValidationError as exc:
        # An unknown key usually is a misspelt known one: report it (with its suggestion) first.
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise ParamsError(_describe(errors, raw, path)) from None
    if trainers:
        check_trainers(params, path)
    return params


def check_trainers(params: Params, path: str | Path) -> None:
    """Every `<stage>.trainer` key of every TRL stage is a field of the stage's TRL config, with
    a value of its type and among its choices, and not one the pipeline sets itself.

    What TRL declares is checked, as `HfArgumentParser` checks it; TRL's cross-field checks run
    in the config's `__post_init__`, which also sets up accelerate's device state (a process
    group under torchrun), so they stay where the stage builds its config (tasks/trainers.py)."""
    for stage in TRL_STAGES:
        config_cls, fields = trl_config_class(stage), _trainer_fields(stage)
        for key, value in getattr(params, stage).trainer.items():
            dotted = f"{stage}.trainer.{key}"
            if key in RESERVED_TRAINER_KEYS:
                problem = "set by the pipeline, remove it"
            elif key not in fields:
                problem = f"not a field of {config_cls.__name__}" + _suggest(key, sorted(fields))
            else:
                problem = _field_problem(config_cls, key, value, *fields[key])
            if problem:
                raise ParamsError(f"{locate(path, dotted)}: {dotted}: {problem}")


@functools.cache
def _trainer_fields(stage: str) -> dict[str, tuple[Any, TypeAdapter, tuple[str, ...]]]:
    """name → (type, its validator, allowed values or ()) of each field of the stage's TRL
    config; the allowed values are HfArgumentParser's choices: the field's `choices` metadata,
    or the values of the enum of an `Enum | str` field (the config converts it)."""
    config_cls = trl_config_class(stage)
    hints = typing.get_type_hints(config_cls)
    found = {}
    for field in (f for f in dataclasses.fields(config_cls) if f.init):
        hint = hints[field.name]
        enums = [t for t in typing.get_args(hint) if isinstance(t, enum.EnumMeta)]
        choices = field.metadata.get("choices") or (
            [member.value for member in enums[0]] if len(enums) == 1 else ()
        )
        adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
        found[field.name] = (hint, adapter, tuple(str(choice) for choice in choices))
    return found


def _field_problem(
    config_cls: type, key: str, value: Any, hint: Any, adapter: TypeAdapter, choices: tuple
) -> str | None:
    """What is wrong with `value` for the config's field `key`, or None."""
    try:
        adapter.validate_python(value, strict=False)
    except ValidationError as exc:
        return (
            f"{exc.errors()[0]['msg'].lower()}, got {value!r} "
            f"(type of {config_cls.__name__}.{key}: {hint})"
        )
    given = value if isinstance(value, list) else [value]
    wrong = [v for v in given if choices and isinstance(v, str) and v not in choices]
    if not wrong:
        return None
    close = difflib.get_close_matches(wrong[0], choices, n=1, cutoff=0.6)
    if len(choices) > 8:  # transformers' optimizers, schedulers: the suggestion, not the list
        allowed = f"one of the {len(choices)} values of {config_cls.__name__}.{key}"
    else:
        allowed = "one of " + ", ".join(repr(choice) for choice in choices)
    return f"must be {allowed}, got {wrong[0]!r}" + (
        f" (did you mean '{close[0]}'?)" if close else ""
    )


def locate(path: str | Path, dotted: str) -> str:
    """`file:line` of the deepest part of the dotted key present in the file (`file` alone when
    the file cannot be read)."""
    try:
        raw = YAML(typ="rt").load(Path(path).read_text(encoding="utf-8"))
    except (OSError, YAMLError, UnicodeDecodeError):
        return str(path)
    return f"{path}:{_line_of(raw, dotted.split('.'))}"


def _read(path: Path) -> CommentedMap:
    try:
        raw = YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: no such file (run from the project root or pass --params)"
        ) from None
    except (YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, CommentedMap):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def _plain(node: Any) -> Any:
    """ruamel's round-trip nodes → plain Python, so no ruamel type leaks into the config."""
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def _describe(errors: list[dict[str, Any]], raw: CommentedMap, path: Path) -> str:
    """One line for the first pydantic error: `file:line: dotted.key: what is wrong (fix)`."""
    error, loc = errors[0], _keys(errors[0]["loc"], raw)
    # A union fails once per member at the same key: join them, so every valid option shows.
    messages = [e["msg"] for e in errors if _keys(e["loc"], raw) == loc]
    msg = " or ".join([messages[0], *(m.removeprefix("Input should be ") for m in messages[1:])])
    msg = msg.removeprefix("Value error, ")
    if match := re.match(r"^([\w.]+): (.*)$", msg):  # cross-field checks name their own key
        loc, msg = loc + match[1].split("."), match[2]
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] | None = Params
        for part in loc[:-1]:
            model = _submodel(model, part)
        msg = "unknown key" + _suggest(loc[-1], list(model.model_fields) if model else [])
    elif error["type"] == "missing":
        msg = "missing key (it has no default; copy it from the project's params.yaml)"
    elif "input" in error and error["type"] != "value_error":
        msg = f"{msg[0].lower()}{msg[1:]}, got {error['input']!r}"
    return f"{path}:{_line_of(raw, loc)}: {'.'.join(loc)}: {msg}"


def _keys(loc: tuple[str | int, ...], raw: CommentedMap) -> list[str]:
    """`loc` without the union-member tags pydantic adds (`list[str]`, `literal['all-linear']`,
    `function-after[...]`): only keys of the YAML or of the model, which the user can find."""
    keys: list[str] = []
    node: Any = raw
    model: type[BaseModel] | None = Params
    for part in loc:
        in_yaml = isinstance(node, dict) and part in node
        in_model = model is not None and part in model.model_fields
        if isinstance(part, str) and not in_yaml and not in_model:
            continue  # a union-member tag
        keys.append(str(part))
        model = _submodel(model, str(part))
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        node = node[part] if in_yaml or in_list else None
    return keys


def _submodel(model: type[BaseModel] | None, field: str) -> type[BaseModel] | None:
    if model is None or field not in model.model_fields:
        return None
    annotation = model.model_fields[field].annotation
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"


def _line_of(raw: Any, loc: list[str]) -> int:
    """1-based line of the deepest key of `loc` present in the YAML tree."""
    line, node = 1, raw
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line, node = node.lc.key(part)[0] + 1, node[part]
        elif isinstance(node, CommentedSeq) and part.isdigit() and int(part) < len(node):
            line, node = node.lc.item(int(part))[0] + 1, node[int(part)]
        else:
            break
    return line
