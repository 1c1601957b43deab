"""Resumable PPO state in `checkpoints/ppo/state/` (outside DVC's outs, git- and dvc-ignored).

accelerate's `save_state` writes what it prepared — actor and critic (safetensors), their
optimizers — and every process's RNG states; `load_state` reads them back with
`weights_only=True`. The rest (iteration, KL coefficient, metric history, the two LR schedules,
which are not prepared: accelerate would step them once per process) goes to `ppo_state.pt`,
also read with `weights_only=True`. Every process writes into one directory beside the old one,
renamed when all are done, so a kill mid-save keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tasks.io import damaged, replace_dir

log = logging.getLogger(__name__)

STATE_FILE = "ppo_state.pt"


def save_checkpoint(accelerator: Any, directory: Path, state: dict[str, Any]) -> None:
    """Write the prepared models, optimizers, RNG states and `state` to `directory`. Called on
    every process."""
    staging = directory.with_name(f".{directory.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        torch.save(state, staging / STATE_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(staging, directory)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, directory: Path) -> dict[str, Any] | None:
    """Restore the prepared models, optimizers and this process's RNG states from `directory`;
    the saved `state`, or None when there is none or it is damaged (then it is deleted)."""
    if not directory.is_dir():
        return None
    problem = damaged(directory, (STATE_FILE, "model*.safetensors", "optimizer*.bin"))
    if problem is not None:  # checked before loading: a half-loaded model cannot start over
        log.warning("ppo: discarding damaged checkpoint %s (%s); starting over", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    accelerator.load_state(str(directory))
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
