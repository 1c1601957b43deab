"""Every stage, described once.

The params sections a stage reads (its `dvc.yaml` params and MLflow params), the schema of its
own section, the CLI's choices, the TRL trainer task, evaluate's policies, the resume fingerprint,
the tests and the benchmarks all derive from this table; `tests/test_wiring.py` checks
`dvc.yaml`, `prefect.yaml` and `params.yaml` against it. Adding a stage:
docs/architecture.md ("Adding a stage").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Output locations are fixed (one name per stage everywhere); dvc.yaml declares the same paths.
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
PLOTS_DIR = Path("plots")


def project_root() -> Path:
    """The repository a run belongs to, where its MLflow store and `.rlhf/` state live. `dvc exp
    run --temp`/`--queue` runs the stages in a copy under `.dvc/tmp/exps/` that DVC deletes
    afterwards, and tells every stage command the repository's own root in $DVC_ROOT (as it
    does in `dvc repro`); a stage run by hand: the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def state_dir() -> Path:
    """`.rlhf/`: the project's services, shared Prefect server and warm process (their pid,
    URL, socket and log files), one set however many copies run stages."""
    return project_root() / ".rlhf"


Kind = Literal["prepare", "trl", "ppo", "evaluate"]
Head = Literal["causal_lm", "scorer"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    """The one name: params section, dvc.yaml stage, `flows/<name>.py`, MLflow run,
    `models/<name>/`, `metrics/<name>.json`, `plots/<name>.json`, `checkpoints/<name>/`."""
    kind: Kind
    """Which code trains it: prepare, a TRL trainer (`tasks/trainers.py`), our PPO, evaluate."""
    description: str
    """One line: `rlhf stage --help` and the docstring of its params section."""
    section: str = ""
    """Its own params.yaml section; empty: its name (prepare's is `data`)."""
    reads: tuple[str, ...] = ()
    """Other params sections it reads, besides common, model and its own."""
    dataset: str | None = None
    """`data/prepared/<dataset>/` it trains on (train.jsonl, eval.jsonl)."""
    start: str | None = None
    """`models/<start>/` it starts from (`base`: what models/base/base.json points at)."""
    uses: tuple[str, ...] = ()
    """Other paths written by other stages (or raw data) that it reads."""
    head: Head = "causal_lm"
    """What it trains: a causal LM, or a 1-label sequence classifier read as a scorer."""
    trainer: str | None = None
    """`module:Class` of the TRL trainer (kind trl)."""
    trl_config: str | None = None
    """`module:Class` of the TRL config its `trainer:` section fills (kind trl)."""
    summary: Mapping[str, str] = field(default_factory=dict)
    """`metrics/<name>.json` key ← the trainer's final-evaluation key (kind trl)."""
    policy: bool = False
    """A policy that evaluate compares (and `rlhf generate --compare` shows)."""
    online: bool = False
    """Generates from its `dataset` prompts while it trains, rewarded by its `rewards:` section
    (TRL's `reward_funcs`, tasks/online.py)."""

    @property
    def own_section(self) -> str:
        return self.section or self.name

    @property
    def sections(self) -> tuple[str, ...]:
        """The params.yaml sections it reads: its dvc.yaml `params:` and its MLflow params."""
        return ("common", "model", *self.reads, self.own_section)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Paths of other stages' outputs it reads: its dvc.yaml data/model deps, and what a
        resumable checkpoint's fingerprint covers."""
        dataset = (f"data/prepared/{self.dataset}",) if self.dataset else ()
        start = (f"models/{self.start}",) if self.start else ()
        return (*dataset, *start, *self.uses)


_ONLINE_SUMMARY = {  # and eval_rewards/<name> per reward (tasks/trainers.py)
    "eval_reward": "eval_reward",
    "eval_reward_std": "eval_reward_std",
    "eval_completion_length": "eval_completions/mean_length",
}
_DPO_SUMMARY = {
    "eval_reward_accuracy": "eval_rewards/accuracies",
    "eval_reward_margin": "eval_rewards/margins",
    "eval_logps_chosen": "eval_logps/chosen",
    "eval_logps_rejected": "eval_logps/rejected",
}

PREPARE = StageSpec(
    "prepare",
    "prepare",
    "raw sources → TRL datasets in data/prepared/, and the base model in models/base/",
    section="data",
    uses=("data/raw",),
)
TRAINING = (
    StageSpec(
        "sft",
        "trl",
        "supervised fine-tuning of the base model (TRL SFTTrainer)",
        dataset="sft",
        start="base",
        trainer="trl:SFTTrainer",
        trl_config="trl:SFTConfig",
        summary={"eval_loss": "eval_loss", "eval_token_accuracy": "eval_mean_token_accuracy"},
        policy=True,
    ),
    StageSpec(
        "reward_model",
        "trl",
        "a 1-label reward model from the SFT model, Bradley–Terry loss on the preference pairs "
        "(TRL RewardTrainer)",
        dataset="preference",
        start="sft",
        head="scorer",
        trainer="trl:RewardTrainer",
        trl_config="trl:RewardConfig",
        summary={"eval_accuracy": "eval_accuracy", "eval_margin": "eval_margin"},
    ),
    StageSpec(
        "ppo",
        "ppo",
        "RLHF of the SFT policy against the reward model with our PPO (tasks/ppo/)",
        reads=("data",),  # the gold of its held-out evaluations (tasks/heldout.py)
        dataset="prompts",
        start="sft",
        uses=("data/prepared/sft", "models/reward_model"),
        policy=True,
    ),
    StageSpec(
        "dpo",
        "trl",
        "direct preference optimisation of the SFT policy, frozen SFT as reference "
        "(TRL DPOTrainer)",
        dataset="preference",
        start="sft",
        trainer="trl:DPOTrainer",
        trl_config="trl:DPOConfig",
        summary=_DPO_SUMMARY,
        policy=True,
    ),
    StageSpec(
        "simpo",
        "trl",
        "reference-free SimPO of the SFT policy (TRL CPOTrainer, loss_type simpo, cpo_alpha 0)",
        dataset="preference",
        start="sft",
        trainer="trl.experimental.cpo:CPOTrainer",
        trl_config="trl.experimental.cpo:CPOConfig",
        summary=_DPO_SUMMARY,
        policy=True,
    ),
    StageSpec(
        "grpo",
        "trl",
        "group-relative policy optimisation of the SFT policy on the prompts, rewarded by the "
        "reward model and/or the ground truth (TRL GRPOTrainer)",
        reads=("data",),
        dataset="prompts",
        start="sft",
        uses=("models/reward_model",),
        trainer="trl:GRPOTrainer",
        trl_config="trl:GRPOConfig",
        summary=_ONLINE_SUMMARY,
        policy=True,
        online=True,
    ),
    StageSpec(
        "rloo",
        "trl",
        "REINFORCE leave-one-out of the SFT policy on the prompts, rewarded like grpo "
        "(TRL RLOOTrainer)",
        reads=("data",),
        dataset="prompts",
        start="sft",
        uses=("models/reward_model",),
        trainer="trl:RLOOTrainer",
        trl_config="trl:RLOOConfig",
        summary=_ONLINE_SUMMARY,
        policy=True,
        online=True,
    ),
)
POLICIES = tuple(spec.name for spec in TRAINING if spec.policy)
BEST_OF = "bon@"
"""Prefix of evaluate's best-of-n policies: `bon@4` is SFT's best of 4 samples by the reward
model (`evaluate.best_of_n`)."""
HELD_OUT = tuple(spec.name for spec in TRAINING if spec.online or spec.kind == "ppo")
"""The stages that judge their policy on the held-out prompts while they train (tasks/heldout.py):
the rows of their plots/<stage>.json are the trajectories of evaluate's over-optimisation
picture (tasks/overopt.py), which evaluate therefore reads."""
EVALUATE = StageSpec(
    "evaluate",
    "evaluate",
    "every policy on the held-out prompts, side by side (report, DVC metrics, MLflow, registry)",
    reads=("data",),
    dataset="prompts",
    uses=(
        *(f"models/{policy}" for policy in POLICIES),
        "models/reward_model",
        *(f"{PLOTS_DIR}/{name}.json" for name in HELD_OUT),
    ),
)
STAGES = (PREPARE, *TRAINING, EVALUATE)
"""Every stage, in pipeline order."""
STAGE = {spec.name: spec for spec in STAGES}


def producer(path: str) -> str:
    """The stage that writes `path` (data/prepared/… and models/base: prepare; models/<stage>,
    plots/<stage>.json, metrics/<stage>.json: that stage)."""
    if path.startswith(("data/prepared", "models/base")):
        return "prepare"
    parts = Path(path).parts
    if parts[0] in (str(MODELS_DIR), str(PLOTS_DIR), str(METRICS_DIR)) and len(parts) == 2:
        return Path(parts[1]).stem
    return path


TRL_STAGES = tuple(spec.name for spec in STAGES if spec.kind == "trl")
