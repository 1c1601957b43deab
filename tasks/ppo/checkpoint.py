"""Resumable PPO state in `checkpoints/ppo/state/` (outside DVC's outs, git- and dvc-ignored).

Weights go to safetensors; optimizers, schedules, RNG states, iteration, KL coefficient and the
metric history to `trainer_state.pt`, read back with `torch.load(weights_only=True)`. The
directory is written beside the old one and renamed, so a kill mid-save keeps the last good one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_model, save_model

from tasks.io import atomic_dir

if TYPE_CHECKING:
    from tasks.ppo.run import PPORun

STATE = "state"


def save_checkpoint(run: PPORun) -> Path:
    """Write the run's full state; returns the checkpoint directory."""
    unwrap = run.accelerator.unwrap_model
    with atomic_dir(run.checkpoints / STATE) as out:
        save_model(unwrap(run.actor), str(out / "actor.safetensors"))
        save_model(unwrap(run.critic), str(out / "critic.safetensors"))
        torch.save(
            {
                "iteration": run.iteration,
                "kl_coef": run.kl_coef,
                "history": run.history,
                "actor_optimizer": run.actor_optimizer.state_dict(),
                "critic_optimizer": run.critic_optimizer.state_dict(),
                "actor_scheduler": run.actor_scheduler.state_dict(),
                "critic_scheduler": run.critic_scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rng_python": random.getstate(),
            },
            out / "trainer_state.pt",
        )
    return run.checkpoints / STATE


def has_checkpoint(run: PPORun) -> bool:
    return (run.checkpoints / STATE / "trainer_state.pt").is_file()


def load_checkpoint(run: PPORun) -> None:
    """Restore everything `save_checkpoint` wrote into the freshly set-up `run`."""
    state_dir = run.checkpoints / STATE
    unwrap, where = run.accelerator.unwrap_model, str(run.accelerator.device)
    load_model(unwrap(run.actor), str(state_dir / "actor.safetensors"), device=where)
    load_model(unwrap(run.critic), str(state_dir / "critic.safetensors"), device=where)
    state = torch.load(state_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
    run.iteration, run.kl_coef, run.history = state["iteration"], state["kl_coef"], state["history"]
    run.actor_optimizer.load_state_dict(state["actor_optimizer"])
    run.critic_optimizer.load_state_dict(state["critic_optimizer"])
    run.actor_scheduler.load_state_dict(state["actor_scheduler"])
    run.critic_scheduler.load_state_dict(state["critic_scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate(state["rng_python"])
