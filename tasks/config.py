"""The sections of `params.yaml`: frozen, typed, with a docstring per field.

Every key is required: `params.yaml` is the single record of what a run used, so DVC tracks every
value and `dvc params diff` shows every change. There is a section per stage (tasks/stages.py):
a TRL stage's is `TrainerStage` (`lora` + `trainer:`, the TRL config's own field names) unless
it has a schema of its own (`tasks.params.SECTIONS`; PPO's is in tasks/ppo_config.py).
`tasks/params.py` puts them together as `Params` and reads a file into it.
"""

from __future__ import annotations

import os
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.stages import POLICIES, STAGES


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
    path: str | None = None
    """Local file (.jsonl/.json/.parquet/.csv) or directory of them (data.source: local)."""
    name: str | None = None
    """Dataset name or path for `datasets.load_dataset` (data.source: hub)."""
    config: str | None = None
    """Dataset configuration name (hub), null for the default."""
    split: str = "train"
    """Split to read (hub)."""
    columns: dict[str, str] = {}
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
    sft: DataSourceConfig = DataSourceConfig()
    """SFT data: prompt/completion or messages. Omitted → prompt + chosen of the preferences."""
    preference: DataSourceConfig = DataSourceConfig()
    """Preference pairs: prompt/chosen/rejected, implicit-prompt or conversational. Required
    with data.source local/hub: the reward model, DPO and SimPO train on them."""
    prompts: DataSourceConfig = DataSourceConfig()
    """Prompts for PPO and evaluation. Omitted → the preference prompts."""
    gold_reward_model: str | None = None
    """A second reward model standing for the true preference (Gao et al. 2022): a local model
    directory or a hub id. PPO, GRPO and RLOO report its score as the gold in their held-out
    evaluations and evaluate as `gold_reward`; null: the synthetic task's ground truth is the
    gold (other data: no gold)."""

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

    lora: LoraConfig | None = None
    """LoRA adapters via peft instead of full fine-tuning; null for full fine-tuning."""
    trainer: dict[str, Any]
    """Fields of the TRL config (same names, same types); the pipeline sets output_dir, run_name,
    report_to, seed and bf16/fp16 itself."""


class SimPOStageConfig(TrainerStage):
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


class OnlineStageConfig(TrainerStage):
    """grpo, rloo: TRL's online trainers, generating from the prompts and rewarded by `rewards`."""

    rewards: dict[Literal["reward_model", "ground_truth"], float] = Field(min_length=1)
    """Reward name → weight (TRL's reward_funcs + reward_weights): `reward_model` scores like
    PPO's (models/reward_model on the text it was trained on, normalised with its
    reward_stats.json); `ground_truth` is the synthetic task's scorer (a verifiable reward)."""
    sample_every: int = Field(ge=1)
    """Steps between tables of completions and their rewards logged to MLflow."""
    eval_every: int | None = Field(default=None, ge=1)
    """Steps between held-out evaluations of the policy (gold, proxy and KL to SFT: before the
    first step, every eval_every steps and after the last; tasks/heldout.py); null: none."""
    eval_prompts: int = Field(default=64, ge=1)
    """Held-out prompts each of those evaluations answers (the first ones, greedy)."""

    @model_validator(mode="after")
    def _rewards_and_groups(self) -> OnlineStageConfig:
        for name, weight in self.rewards.items():
            if weight < 0:
                raise ValueError(f"rewards.{name}: weight {weight} is negative (use 0 or more)")
        if not any(self.rewards.values()):
            raise ValueError("rewards: every weight is 0 (give one reward a positive weight)")
        if "reward_weights" in self.trainer:
            raise ValueError("trainer.reward_weights: set by the pipeline from rewards, remove it")
        group = self.trainer.get("num_generations", 8)  # TRL's default
        if isinstance(group, int) and group < 2:
            raise ValueError(
                f"trainer.num_generations: {group}; a group needs at least 2 completions per "
                "prompt (its advantages compare them)"
            )
        batch = self.trainer.get("generation_batch_size") or self._default_generation_batch()
        if isinstance(group, int) and isinstance(batch, int) and batch % group:
            raise ValueError(
                f"trainer.num_generations: {group} does not divide the {batch} completions "
                "generated per step (trainer.generation_batch_size, by default "
                "per_device_train_batch_size × processes × steps_per_generation)"
            )
        step = self.trainer.get("per_device_train_batch_size", 8) * _processes()
        given = self.trainer.get("generation_batch_size")
        if isinstance(given, int) and isinstance(step, int) and given % step:
            raise ValueError(
                f"trainer.generation_batch_size: {given} is not a multiple of the {step} "
                "completions a step trains on (per_device_train_batch_size × processes)"
            )
        return self

    def _default_generation_batch(self) -> int | None:
        """TRL's default: one batch per process for each of `steps_per_generation` steps
        (default: gradient_accumulation_steps), summed over the processes of the launch."""
        per_device = self.trainer.get("per_device_train_batch_size", 8)
        steps = self.trainer.get("steps_per_generation") or self.trainer.get(
            "gradient_accumulation_steps", 1
        )
        ok = all(isinstance(v, int) for v in (per_device, steps))
        return per_device * steps * _processes() if ok else None


def _processes() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE), 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class EvaluateConfig(Section):
    policies: list[Literal[POLICIES]] = Field(min_length=1)
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
    best_of_n: list[int] = Field(default_factory=list)
    """Best-of-n baselines, one policy `bon@<n>` per entry (each n ≥ 2): SFT samples n responses
    per prompt (temperature, top_p above) and the reward model keeps its highest-scored one; KL
    to SFT is the analytic log n − (n−1)/n. Costs n × SFT's generation; [] for none."""

    @model_validator(mode="after")
    def _sft_is_reference(self) -> EvaluateConfig:
        if "sft" not in self.policies:
            raise ValueError("policies: must include 'sft' (the reference for win rate and KL)")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies: listed twice in {self.policies}")
        if any(n < 2 for n in self.best_of_n) or len(set(self.best_of_n)) != len(self.best_of_n):
            raise ValueError(f"best_of_n: distinct integers ≥ 2 expected, got {self.best_of_n}")
        return self


# ---------------------------------------------------------------- sections no stage reads


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)
    """MLflow experiment every stage logs into."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null → $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    registered_model: str = Field(min_length=1)
    """Model-registry name the evaluate stage registers the best policy under."""
    system_metrics: bool = True
    """Log CPU, memory (and GPU, when there is one) to each stage's run, through MLflow's own
    system-metrics monitor (`system/...` in the run's charts)."""
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between two system-metrics samples."""


class StagePlacement(Section):
    backend: Literal["local", "deployment"] | None = None
    """This stage's backend; null: `orchestration.backend`."""
    work_pool: str | None = Field(default=None, min_length=1)
    """The work pool of this stage's deployment (`<stage>/<pool>`); null: `work_pool`."""


class OrchestrationConfig(Section):
    backend: Literal["local", "deployment"]
    """Every stage's default: `local` runs a stage's flow in-process; `deployment` runs its
    Prefect deployment on a worker. $RLHF_ORCHESTRATION overrides it (flows/infra/deployment.py:
    `deployment`, or per stage `deployment,prepare=local,ppo=deployment@big-gpu`)."""
    work_pool: str = Field(min_length=1)
    """Prefect work pool of the deployments (`rlhf deploy --pool` registers `<stage>/<pool>`)."""
    stages: dict[Literal[tuple(spec.name for spec in STAGES)], StagePlacement] = {}
    """Per-stage choices, e.g. {prepare: {backend: local}, ppo: {work_pool: big-gpu}}: the
    training stages on the GPU worker, the cheap ones here."""
    timeout_s: float = Field(gt=0)
    """A deployment run taking longer than this fails the stage."""
    poll_interval_s: float = Field(gt=0)
    """How often the state of a deployment run is polled."""
