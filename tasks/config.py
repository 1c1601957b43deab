"""`params.yaml` → frozen, typed configuration, parsed once.

Every key is required: `params.yaml` is the single record of what a run used, so DVC tracks every
value and `dvc params diff` shows every change. The sections follow the stages (SPEC §4); a stage's
`trainer:` keys are the TRL config's own field names, checked against that dataclass at load time.
Errors name the file, line and key:
`params.yaml:12: data.sourse: unknown key (did you mean 'source'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

STAGES = ("prepare", "sft", "reward_model", "ppo", "dpo", "simpo", "evaluate")
POLICIES = ("sft", "ppo", "dpo", "simpo")
# The params.yaml sections each stage reads: its dvc.yaml `params:` and its MLflow params.
STAGE_SECTIONS = {
    "prepare": ("common", "model", "data"),
    "sft": ("common", "model", "sft"),
    "reward_model": ("common", "model", "reward_model"),
    "ppo": ("common", "model", "ppo"),
    "dpo": ("common", "model", "dpo"),
    "simpo": ("common", "model", "simpo"),
    "evaluate": ("common", "model", "data", "evaluate"),
}

# Output locations are fixed (one name per stage everywhere); dvc.yaml declares the same paths.
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
PLOTS_DIR = Path("plots")


class ParamsError(ValueError):
    """A problem in params.yaml, already phrased as one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax pydantic reads YAML `true` as 1 (or 1.0): for a number field that is a typo.
        annotation = cls.model_fields[info.field_name].annotation
        types = set(typing.get_args(annotation) or [annotation])  # `int | None` → {int, None}
        if isinstance(value, bool) and types & {int, float}:
            raise ValueError(f"input should be a number, not a boolean, got {value!r}")
        return value


# ---------------------------------------------------------------- common, model


class CommonConfig(Section):
    seed: int = Field(ge=0)
    """Seed for data generation, splits, model init, training and sampling."""
    device: Literal["auto", "cpu", "cuda"]
    """Where models run: `auto` takes a GPU when torch sees one."""


class TinyModelConfig(Section):
    vocab_size: int = Field(ge=64, le=65536)
    """BPE vocabulary size of the tokenizer trained on the prepared text."""
    hidden_size: int = Field(ge=8)
    """Width of the Llama-style model."""
    intermediate_size: int = Field(ge=8)
    """Width of the MLP."""
    num_layers: int = Field(ge=1)
    """Number of transformer blocks."""
    num_heads: int = Field(ge=1)
    """Attention heads; must divide hidden_size."""
    max_position_embeddings: int = Field(ge=16)
    """Longest sequence (prompt + response) in tokens."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}"
            )
        return self


class ModelConfig(Section):
    base: str = Field(min_length=1)
    """`tiny` (built locally by prepare), a hub id (`Qwen/Qwen2.5-0.5B-Instruct`) or a local dir."""
    revision: str | None
    """Hub revision (branch, tag or commit) of a hub model; null for the default branch."""
    trust_remote_code: bool
    """Run code shipped with a hub model. Off unless you trust its author."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Weights dtype for training and inference; `auto` is bfloat16 on a GPU that has it, else
    float32."""
    tiny: TinyModelConfig
    """Shape of the random-init model built when base is `tiny`."""


# ---------------------------------------------------------------- data


class DataSourceConfig(Section):
    path: str | None
    """Local file (.jsonl/.json/.parquet/.csv) or directory of them (data.source: local)."""
    name: str | None
    """Dataset name or path for `datasets.load_dataset` (data.source: hub)."""
    config: str | None
    """Dataset configuration name (hub), null for the default."""
    split: str
    """Split to read (hub)."""
    columns: dict[str, str]
    """Renames source columns to TRL's names, e.g. {prompt: question, chosen: good_answer}."""


class SyntheticConfig(Section):
    num_sft: int = Field(ge=10)
    """SFT examples (prompt/completion) generated."""
    num_preference: int = Field(ge=10)
    """Preference pairs (prompt/chosen/rejected) generated."""
    num_prompts: int = Field(ge=10)
    """Prompts generated for PPO and evaluation."""
    max_operand: int = Field(ge=1, le=999)
    """Operands are drawn from 0..max_operand."""
    operations: list[Literal["plus", "minus", "times"]] = Field(min_length=1)
    """Arithmetic operations questions use."""
    correct_rate: float = Field(ge=0, le=1)
    """Fraction of SFT answers that are correct."""
    polite_rate: float = Field(ge=0, le=1)
    """Fraction of SFT answers written politely (opener + closer) rather than curtly."""


class DataConfig(Section):
    source: Literal["synthetic", "local", "hub"]
    """Where examples come from."""
    eval_fraction: float = Field(gt=0, le=0.5)
    """Share of prompts held out for evaluation (split by prompt hash, so stable)."""
    max_chars: int = Field(ge=16)
    """Examples with any text longer than this are dropped (counted in stats.json)."""
    synthetic: SyntheticConfig
    """The embedded arithmetic task (data.source: synthetic)."""
    sft: DataSourceConfig
    """SFT data: prompt/completion or messages. Omitted → prompt + chosen of the preferences."""
    preference: DataSourceConfig
    """Preference pairs: prompt/chosen/rejected, implicit-prompt or conversational. Required
    with data.source local/hub: the reward model, DPO and SimPO train on them."""
    prompts: DataSourceConfig
    """Prompts for PPO and evaluation. Omitted → the preference prompts."""

    @model_validator(mode="after")
    def _sources_match(self) -> DataConfig:
        kinds = {"sft": self.sft, "preference": self.preference, "prompts": self.prompts}
        for kind, src in kinds.items():
            if self.source != "local" and src.path is not None:
                raise ValueError(
                    f"{kind}.path: set but data.source is '{self.source}' "
                    "(set data.source: local, or path: null)"
                )
            if self.source != "hub" and src.name is not None:
                raise ValueError(
                    f"{kind}.name: set but data.source is '{self.source}' "
                    "(set data.source: hub, or name: null)"
                )
        # The reward model, DPO and SimPO train on pairs: without them prepare has nothing to give.
        key = {"local": "path", "hub": "name"}.get(self.source)
        if key and getattr(self.preference, key) is None:
            raise ValueError(
                f"preference.{key}: not set, but data.source is '{self.source}' "
                "(the reward model, DPO and SimPO need preference pairs)"
            )
        return self


# ---------------------------------------------------------------- training stages


class LoraConfig(Section):
    r: int = Field(ge=1)
    """Rank of the low-rank update."""
    alpha: int = Field(ge=1)
    """Scaling numerator (lora_alpha)."""
    dropout: float = Field(ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: list[str] | Literal["all-linear"]
    """Module names to adapt, or `all-linear`."""


class TrainerStage(Section):
    """A stage trained by a TRL trainer: `trainer:` holds that TRL config's own fields."""

    trl_config: typing.ClassVar[str]
    lora: LoraConfig | None
    """LoRA adapters via peft instead of full fine-tuning; null for full fine-tuning."""
    trainer: dict[str, Any]
    """Fields of the TRL config (same names, same types); the pipeline sets output_dir, run_name,
    report_to, seed and bf16/fp16 itself."""


class SFTStageConfig(TrainerStage):
    trl_config = "trl:SFTConfig"


class RewardModelStageConfig(TrainerStage):
    trl_config = "trl:RewardConfig"


class DPOStageConfig(TrainerStage):
    trl_config = "trl:DPOConfig"


class SimPOStageConfig(TrainerStage):
    trl_config = "trl.experimental.cpo:CPOConfig"

    @model_validator(mode="after")
    def _is_simpo(self) -> SimPOStageConfig:
        if self.trainer.get("loss_type", "simpo") != "simpo":
            raise ValueError(
                f"trainer.loss_type: must be 'simpo', got "
                f"{self.trainer['loss_type']!r} (other losses belong to other stages)"
            )
        if self.trainer.get("cpo_alpha", 0.0) != 0.0:
            raise ValueError(
                "trainer.cpo_alpha: must be 0.0; a non-zero value is CPO-SimPO, a different method"
            )
        beta = self.trainer.get("beta", 2.0)
        if isinstance(beta, (int, float)) and beta < 0.5:
            raise ValueError(
                f"trainer.beta: {self.trainer['beta']} is DPO-sized; SimPO wants beta ≈ 2–10"
            )
        return self


class AdaptiveKLConfig(Section):
    target: float = Field(gt=0)
    """KL (nats per sequence) the controller steers towards."""
    horizon: int = Field(ge=1)
    """Episodes over which the coefficient adapts (Ziegler et al. 2019)."""


class PPOConfig(Section):
    num_iterations: int = Field(ge=1)
    """Rollout + update iterations."""
    rollout_batch_size: int = Field(ge=1)
    """Prompts per rollout (episodes per iteration)."""
    mini_batch_size: int = Field(ge=1)
    """Episodes per gradient step; must divide rollout_batch_size."""
    ppo_epochs: int = Field(ge=1)
    """Passes over each rollout's experience."""
    max_new_tokens: int = Field(ge=1)
    """Longest generated response."""
    temperature: float = Field(gt=0)
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_k: int = Field(ge=0)
    """Top-k sampling, 0 to disable."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus sampling, 1.0 to disable."""
    actor_lr: float = Field(gt=0)
    """AdamW learning rate of the actor (policy)."""
    critic_lr: float = Field(gt=0)
    """AdamW learning rate of the critic (value model)."""
    lr_scheduler: Literal["constant", "linear", "cosine"]
    """Schedule of both learning rates over all update steps."""
    warmup_steps: int = Field(ge=0)
    """Linear warm-up steps of both schedules."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(gt=0)
    """Gradient clipping (global L2 norm), per model."""
    gamma: float = Field(ge=0, le=1)
    """Discount γ of GAE."""
    lam: float = Field(ge=0, le=1)
    """λ of GAE."""
    clip_range: float = Field(gt=0)
    """ε of the clipped policy ratio."""
    clip_range_value: float = Field(gt=0)
    """ε_v of the clipped value loss."""
    whiten_advantages: bool
    """Normalise advantages over each rollout."""
    kl_coef: float = Field(ge=0)
    """β of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"]
    """Per-token KL estimator in the reward: k1 = log π − log π_ref, k3 = Schulman's."""
    adaptive_kl: AdaptiveKLConfig | None
    """Adaptive KL controller; null keeps kl_coef fixed."""
    reward_clip: float = Field(gt=0)
    """Scores are clipped to ±reward_clip before entering the reward."""
    normalize_scores: bool
    """Standardise reward-model scores with the mean/std stored by the reward_model stage."""
    missing_eos_penalty: float | None
    """Subtracted from the score of responses that hit max_new_tokens without EOS; null: off."""
    ptx_coef: float = Field(ge=0)
    """PPO-ptx: weight of the LM loss on SFT batches added to the actor loss; 0 disables."""
    ptx_batch_size: int = Field(ge=1)
    """SFT examples per PPO-ptx step."""
    gradient_checkpointing: bool
    """Trade compute for memory in actor and critic."""
    checkpoint_every: int = Field(ge=1)
    """Iterations between resumable checkpoints."""
    sample_every: int = Field(ge=1)
    """Iterations between sample-generation tables logged to MLflow."""
    lora: LoraConfig | None
    """LoRA for actor and critic; null for full fine-tuning."""

    @model_validator(mode="after")
    def _batches_fit(self) -> PPOConfig:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size: {self.mini_batch_size} does not divide "
                f"rollout_batch_size {self.rollout_batch_size}"
            )
        return self


class EvaluateConfig(Section):
    policies: list[Literal["sft", "ppo", "dpo", "simpo"]] = Field(min_length=1)
    """Policies to compare; sft is the reference for win rate and KL, so it must be listed."""
    max_new_tokens: int = Field(ge=1)
    """Longest generated response."""
    do_sample: bool
    """Greedy decoding (false) or seeded sampling (true)."""
    temperature: float = Field(gt=0)
    """Sampling temperature (do_sample: true)."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus sampling (do_sample: true)."""
    batch_size: int = Field(ge=1)
    """Prompts generated at once."""
    max_prompts: int | None = Field(ge=1)
    """Evaluate on at most this many eval prompts; null for all."""
    num_samples_logged: int = Field(ge=0)
    """Rows of the samples table logged to MLflow."""

    @model_validator(mode="after")
    def _sft_is_reference(self) -> EvaluateConfig:
        if "sft" not in self.policies:
            raise ValueError("policies: must include 'sft' (the reference for win rate and KL)")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies: listed twice in {self.policies}")
        return self


# ---------------------------------------------------------------- untracked sections


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)
    """MLflow experiment every stage logs into."""
    tracking_uri: str | None
    """MLflow tracking URI; null → $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    registered_model: str = Field(min_length=1)
    """Model-registry name the evaluate stage registers the best policy under."""


class OrchestrationConfig(Section):
    backend: Literal["local", "deployment"]
    """`local` runs a stage's flow in-process; `deployment` runs its Prefect deployment on a
    worker. $RLHF_ORCHESTRATION overrides it."""
    work_pool: str = Field(min_length=1)
    """Prefect work pool the deployments run on."""
    timeout_s: float = Field(gt=0)
    """A deployment run taking longer than this fails the stage."""
    poll_interval_s: float = Field(gt=0)
    """How often the state of a deployment run is polled."""


class Params(Section):
    common: CommonConfig
    """Seed and device shared by every stage."""
    model: ModelConfig
    """The base model every policy starts from (tiny, hub id or local dir)."""
    data: DataConfig
    """prepare: where the SFT, preference and prompt examples come from, and how they are split."""
    sft: SFTStageConfig
    """sft: supervised fine-tuning of the base model (TRL SFTTrainer)."""
    reward_model: RewardModelStageConfig
    """reward_model: the reward model trained on preference pairs (TRL RewardTrainer)."""
    ppo: PPOConfig
    """ppo: RLHF of the SFT policy against the reward model with PPO."""
    dpo: DPOStageConfig
    """dpo: direct preference optimisation of the SFT policy (TRL DPOTrainer)."""
    simpo: SimPOStageConfig
    """simpo: reference-free SimPO of the SFT policy (TRL CPOTrainer, loss_type simpo)."""
    evaluate: EvaluateConfig
    """evaluate: generation settings and policies compared on the held-out prompts."""
    tracking: TrackingConfig
    """MLflow experiment, tracking URI and registered model name (not tracked by DVC)."""
    orchestration: OrchestrationConfig
    """How stages run: in-process or as Prefect deployments (not tracked by DVC)."""


# Keys the pipeline sets itself in every TRL config.
RESERVED_TRAINER_KEYS = frozenset(
    {"output_dir", "run_name", "report_to", "seed", "bf16", "fp16", "use_cpu", "logging_dir"}
)


@functools.cache
def trl_config_class(stage: str) -> type:
    """The TRL config dataclass behind a training stage's `trainer:` section."""
    module, name = Params.model_fields[stage].annotation.trl_config.split(":")
    with warnings.catch_warnings():  # SimPO lives in trl.experimental, pinned to TRL's minor
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def load_params(path: str | Path = "params.yaml", *, trainers: bool = True) -> Params:
    """Read and validate `path`; raise ParamsError naming file, line and key on any problem.
    `trainers=False` leaves out the check of the `<stage>.trainer` sections against the TRL
    configs, which imports TRL (torch, transformers: seconds)."""
    path = Path(path)
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
    try:
        params = Params.model_validate(_plain(raw))
    except ValidationError as exc:
        # An unknown key usually is a misspelt known one: report it (with its suggestion) first.
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise ParamsError(_describe(errors, raw, path)) from None
    for stage in ("sft", "reward_model", "dpo", "simpo") if trainers else ():
        _check_trainer(stage, getattr(params, stage).trainer, raw, path)
    return params


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
        model = Params
        for part in loc[:-1]:
            model = _submodel(model, part)
        msg = "unknown key" + _suggest(loc[-1], list(model.model_fields) if model else [])
    elif error["type"] == "missing":
        msg = "missing key (every key is required; copy it from the project's params.yaml)"
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
    for candidate in typing.get_args(model.model_fields[field].annotation) or (
        model.model_fields[field].annotation,
    ):
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


def _check_trainer(stage: str, trainer: dict[str, Any], raw: CommentedMap, path: Path) -> None:
    """`<stage>.trainer` keys must be fields of the stage's TRL config, with values of its types."""
    config_cls = trl_config_class(stage)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    for key, value in trainer.items():
        loc = [stage, "trainer", key]
        where = f"{path}:{_line_of(raw, loc)}: {'.'.join(loc)}"
        if key in RESERVED_TRAINER_KEYS:
            raise ParamsError(f"{where}: set by the pipeline, remove it")
        if key not in fields:
            raise ParamsError(
                f"{where}: not a field of {config_cls.__name__}" + _suggest(key, sorted(fields))
            )
        try:
            adapter = TypeAdapter(hints[key], config=ConfigDict(arbitrary_types_allowed=True))
            adapter.validate_python(value, strict=False)
        except ValidationError as exc:
            raise ParamsError(
                f"{where}: {exc.errors()[0]['msg'].lower()}, got {value!r} "
                f"(type of {config_cls.__name__}.{key}: {hints[key]})"
            ) from None
