"""A PPO run's state: the models, their optimizers and schedules, the data, the KL coefficient —
loaded from models/sft and models/reward_model, or resumed from checkpoints/ppo/.

Actor (policy) = models/sft, trained; reference = models/sft, frozen; reward = models/reward_model,
frozen; critic = initialised from the reward model, trained. Frozen models are in eval mode with
no gradients and never reach an optimizer. With `ppo.lora` only the adapters train, so the
frozen models are the trained ones' bases: the reference is the actor with its adapter disabled
and the reward model the critic with its adapter (and its score head's trainable copy)
disabled — two base models in memory instead of four. Under an FSDP launch every model is
sharded over the processes (tasks/ppo/distributed.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch

from tasks.config import LoraConfig
from tasks.errors import MissingInput
from tasks.generation import render_prompts
from tasks.io import resumable_dir
from tasks.models import device, dtype, load_causal_lm, load_scorer, load_tokenizer, lora_config
from tasks.params import Params
from tasks.ppo.checkpoint import load_checkpoint
from tasks.ppo.distributed import fsdp_plugin, shard
from tasks.scoring import TokenScorer, score_stats
from tasks.stages import CHECKPOINTS_DIR, MODELS_DIR, PREPARED_DIR, STAGE
from tasks.tracking import logged_until

log = logging.getLogger(__name__)


@dataclass
class PPORun:
    """What a run carries from one iteration to the next."""

    params: Params
    accelerator: Any
    tokenizer: Any
    actor: Any  # causal LM, trained (accelerate-prepared, or sharded)
    critic: Any  # TokenScorer, trained (accelerate-prepared, or sharded)
    reference: Any  # causal LM, frozen (or the actor with its adapter disabled)
    reward: Any  # TokenScorer, frozen (or the critic with its adapter disabled)
    actor_optimizer: Any
    critic_optimizer: Any
    actor_scheduler: Any
    critic_scheduler: Any
    prompts: list[str]
    ptx_examples: list[tuple[str, str]]  # (prompt, completion) for PPO-ptx
    score_stats: tuple[float, float] | None
    kl_coef: float
    iteration: int = 0  # the next iteration to run
    history: list[dict[str, float]] = field(default_factory=list)
    logged_until: int = -1  # the last step the (resumed) MLflow run has: not logged again
    sharded: bool = False  # FSDP: every model sharded over the processes

    @property
    def shards(self) -> dict[str, tuple[Any, Any]] | None:
        """FSDP: the trained models with their optimizers, which a checkpoint holds (sharded);
        None otherwise (accelerate checkpoints what it prepared)."""
        if not self.sharded:
            return None
        return {
            "actor": (self.actor, self.actor_optimizer),
            "critic": (self.critic, self.critic_optimizer),
        }

    @property
    def checkpoints(self) -> Path:
        return CHECKPOINTS_DIR / "ppo"

    @property
    def state_dir(self) -> Path:
        """The resumable state (tasks/ppo/checkpoint.py)."""
        return self.checkpoints / "state"


def setup(params: Params) -> PPORun:
    """Load the models and the data; resume from `checkpoints/ppo/` when it matches."""
    from accelerate import Accelerator
    from transformers import get_scheduler, set_seed

    cfg = params.ppo
    set_seed(params.common.seed)
    dev = device(params.common.device)
    frozen_dtype = dtype(params.model.dtype, dev)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(frozen_dtype, "no")
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=precision)
    plugin = fsdp_plugin(accelerator)

    def place(model: Any) -> Any:  # each model as soon as it is loaded: one whole at a time
        return shard(model, plugin) if plugin else model.to(accelerator.device)

    tokenizer, actor, critic = _load_trained(params, place)
    if cfg.lora is None:
        reference, reward = frozen_copies(params, frozen_dtype, tokenizer.pad_token_id, place)
    actor_optimizer = _adamw(actor, cfg.actor_lr, cfg.weight_decay)
    critic_optimizer = _adamw(critic, cfg.critic_lr, cfg.weight_decay)
    steps = cfg.num_iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    if plugin is None:  # DDP (or one process); FSDP has sharded them already
        actor, critic, actor_optimizer, critic_optimizer = accelerator.prepare(
            actor, critic, actor_optimizer, critic_optimizer
        )
    if cfg.lora is not None:  # the frozen models are the trained ones' bases
        policy, scorer = accelerator.unwrap_model(actor), accelerator.unwrap_model(critic)
        reference = AdapterDisabled(policy, policy)
        reward = AdapterDisabled(scorer, scorer.classifier)
    run = PPORun(
        params=params,
        accelerator=accelerator,
        tokenizer=tokenizer,
        actor=actor,
        critic=critic,
        reference=reference,
        reward=reward,
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        actor_scheduler=get_scheduler(cfg.lr_scheduler, actor_optimizer, cfg.warmup_steps, steps),
        critic_scheduler=get_scheduler(cfg.lr_scheduler, critic_optimizer, cfg.warmup_steps, steps),
        prompts=render_prompts(_read_column("prompts", "prompt"), tokenizer),
        ptx_examples=_ptx_examples(tokenizer) if cfg.ptx_coef > 0 else [],
        score_stats=score_stats(MODELS_DIR / "reward_model") if cfg.normalize_scores else None,
        kl_coef=cfg.kl_coef,
        sharded=plugin is not None,
    )
    _resume(run)
    return run


def _resume(run: PPORun) -> None:
    """Restore the state of `checkpoints/ppo/` if it was written with these params and inputs."""
    resumable_dir(run.checkpoints, run.params, "ppo", [Path(p) for p in STAGE["ppo"].inputs])
    state = load_checkpoint(run.accelerator, run.state_dir, run.shards)
    if state is None:
        return
    run.iteration, run.kl_coef, run.history = state["iteration"], state["kl_coef"], state["history"]
    run.actor_scheduler.load_state_dict(state["actor_scheduler"])
    run.critic_scheduler.load_state_dict(state["critic_scheduler"])
    log.info("ppo: resuming at iteration %d from %s", run.iteration, run.checkpoints)
    if run.accelerator.is_main_process:
        run.logged_until = logged_until(mlflow.active_run().info.run_id)


def _load_trained(params: Params, place: Callable[[Any], Any]) -> tuple[Any, Any, TokenScorer]:
    """Tokenizer; actor (float32, from models/sft) and critic (float32, from the reward model),
    trainable, each `place`d."""
    cfg = params.ppo
    tokenizer = load_tokenizer("sft", params.model, padding_side="left")
    actor = load_causal_lm("sft", params.model, torch.float32)
    actor = place(_trainable(actor, cfg.lora, "causal_lm", cfg.gradient_checkpointing))
    critic = load_scorer("reward_model", params.model, torch.float32, tokenizer.pad_token_id)
    critic = _trainable(critic, cfg.lora, "scorer", cfg.gradient_checkpointing)
    return tokenizer, actor, place(TokenScorer(critic))


def frozen_copies(
    params: Params, frozen_dtype: torch.dtype, pad_token_id: int, place: Callable[[Any], Any]
) -> tuple[Any, TokenScorer]:
    """The reference (models/sft) and the reward model (models/reward_model) as models of their
    own, frozen, each `place`d: what full fine-tuning needs, and LoRA's shared bases replace."""
    reference = place(_frozen(load_causal_lm("sft", params.model, frozen_dtype)))
    reward = load_scorer("reward_model", params.model, frozen_dtype, pad_token_id)
    return reference, place(TokenScorer(_frozen(reward)))


class AdapterDisabled:
    """A peft-adapted model called with its adapter disabled: the model it adapts, no copy.
    `peft_model` is the PeftModel inside `model` (the model itself, or a TokenScorer's
    classifier). Disabling covers the LoRA layers and the trainable copy of a scorer's head
    (peft's modules_to_save), so the critic's base scores exactly as the reward model."""

    def __init__(self, model: Any, peft_model: Any) -> None:
        self.model, self.peft_model = model, peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)


def _adamw(model: Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The model's own AdamW over its trainable parameters (its shards, under FSDP)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


def _trainable(model: Any, lora: LoraConfig | None, head: str, checkpointing: bool) -> Any:
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)  # dropout would make old and new log-probs disagree
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora, head))
        if checkpointing:
            model.enable_input_require_grads()
    return model.train()


def _frozen(model: Any) -> Any:
    """Eval mode, no gradients, never given to an optimizer."""
    model.requires_grad_(False)
    return model.eval()


def _read_column(kind: str, column: str) -> list[Any]:
    path = PREPARED_DIR / kind / "train.jsonl"
    if not path.is_file():
        raise MissingInput(f"{path}: missing; run `dvc repro prepare`")
    return [json.loads(line)[column] for line in path.read_text(encoding="utf-8").splitlines()]


def _ptx_examples(tokenizer: Any) -> list[tuple[str, str]]:
    """SFT (prompt, completion + EOS) text pairs, rendered like SFTTrainer renders them."""
    from trl.data_utils import maybe_apply_chat_template

    path = PREPARED_DIR / "sft" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    pairs = []
    for row in rows:
        if "messages" in row:  # prepare splits messages, but a hand-made file may not
            row = {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
        text = maybe_apply_chat_template(row, tokenizer)
        eos = "" if isinstance(row["completion"], list) else tokenizer.eos_token
        pairs.append((text["prompt"], text["completion"] + eos))
    return pairs
