"""A PPO run's state: the four models, their optimizers and schedules, the data, the KL
coefficient — loaded from models/sft and models/reward_model, or resumed from checkpoints/ppo/.

Actor (policy) = models/sft, trained; reference = models/sft, frozen; reward = models/reward_model,
frozen; critic = initialised from the reward model, trained. Frozen models are in eval mode with
no gradients and never reach an optimizer.
"""

from __future__ import annotations

import json
import logging
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
    actor: Any  # causal LM, trained (accelerate-prepared)
    critic: TokenScorer  # trained (accelerate-prepared)
    reference: Any  # causal LM, frozen
    reward: TokenScorer  # frozen
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

    @property
    def checkpoints(self) -> Path:
        return CHECKPOINTS_DIR / "ppo"

    @property
    def state_dir(self) -> Path:
        """The resumable state (tasks/ppo/checkpoint.py)."""
        return self.checkpoints / "state"


def setup(params: Params) -> PPORun:
    """Load the four models and the data; resume from `checkpoints/ppo/` when it matches."""
    from accelerate import Accelerator
    from transformers import get_scheduler, set_seed

    cfg = params.ppo
    set_seed(params.common.seed)
    dev = device(params.common.device)
    frozen_dtype = dtype(params.model.dtype, dev)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(frozen_dtype, "no")
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=precision)
    tokenizer, actor, reference = _load_policies(params, frozen_dtype)
    critic, reward = _load_scorers(params, frozen_dtype, tokenizer)
    actor_optimizer = torch.optim.AdamW(
        [p for p in actor.parameters() if p.requires_grad],
        lr=cfg.actor_lr,
        weight_decay=cfg.weight_decay,
    )
    critic_optimizer = torch.optim.AdamW(
        [p for p in critic.parameters() if p.requires_grad],
        lr=cfg.critic_lr,
        weight_decay=cfg.weight_decay,
    )
    steps = cfg.num_iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    actor, critic, actor_optimizer, critic_optimizer = accelerator.prepare(
        actor, critic, actor_optimizer, critic_optimizer
    )
    run = PPORun(
        params=params,
        accelerator=accelerator,
        tokenizer=tokenizer,
        actor=actor,
        critic=critic,
        reference=reference.to(accelerator.device),
        reward=reward.to(accelerator.device),
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        actor_scheduler=get_scheduler(cfg.lr_scheduler, actor_optimizer, cfg.warmup_steps, steps),
        critic_scheduler=get_scheduler(cfg.lr_scheduler, critic_optimizer, cfg.warmup_steps, steps),
        prompts=render_prompts(_read_column("prompts", "prompt"), tokenizer),
        ptx_examples=_ptx_examples(tokenizer) if cfg.ptx_coef > 0 else [],
        score_stats=score_stats(MODELS_DIR / "reward_model") if cfg.normalize_scores else None,
        kl_coef=cfg.kl_coef,
    )
    resumable_dir(run.checkpoints, params, "ppo", [Path(p) for p in STAGE["ppo"].inputs])
    state = load_checkpoint(accelerator, run.state_dir)
    if state is not None:
        run.iteration, run.kl_coef, run.history = (
            state["iteration"],
            state["kl_coef"],
            state["history"],
        )
        run.actor_scheduler.load_state_dict(state["actor_scheduler"])
        run.critic_scheduler.load_state_dict(state["critic_scheduler"])
        log.info("ppo: resuming at iteration %d from %s", run.iteration, run.checkpoints)
        if accelerator.is_main_process:
            run.logged_until = logged_until(mlflow.active_run().info.run_id)
    return run


def _load_policies(params: Params, frozen_dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Tokenizer, actor (float32, trainable) and reference (frozen) from models/sft."""
    tokenizer = load_tokenizer("sft", params.model, padding_side="left")
    actor = load_causal_lm("sft", params.model, torch.float32)
    reference = load_causal_lm("sft", params.model, frozen_dtype)
    actor = _trainable(actor, params.ppo.lora, "causal_lm", params.ppo.gradient_checkpointing)
    return tokenizer, actor, _frozen(reference)


def _load_scorers(
    params: Params, frozen_dtype: torch.dtype, tokenizer: Any
) -> tuple[TokenScorer, TokenScorer]:
    """Critic (trainable, from the reward model) and the frozen reward model."""
    pad = tokenizer.pad_token_id
    critic = load_scorer("reward_model", params.model, torch.float32, pad)
    critic = _trainable(critic, params.ppo.lora, "scorer", params.ppo.gradient_checkpointing)
    reward = load_scorer("reward_model", params.model, frozen_dtype, pad)
    return TokenScorer(critic), TokenScorer(_frozen(reward))


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
