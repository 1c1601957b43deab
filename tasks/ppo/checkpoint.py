"""Resumable PPO state in `checkpoints/ppo/state/` (outside DVC's outs, git- and dvc-ignored).

DDP or one process: accelerate's `save_state` writes what it prepared — actor and critic
(safetensors), their optimizers — and every process's RNG states; `load_state` reads them back
with `weights_only=True`. FSDP: torch.distributed.checkpoint (DCP) writes each process's shards
of actor, critic and their AdamW states (`*.distcp`, `.metadata`), and reads them back into the
same layout; no RNG state is needed, since every draw of the loop is seeded by (seed,
iteration, process). Either way the rest (iteration, KL coefficient, metric history, the two LR
schedules, which are not prepared: accelerate would step them once per process) goes to
`ppo_state.pt`, also read with `weights_only=True`. Every process writes into one directory
beside the old one, renamed when all are done, so a kill mid-save keeps the last good checkpoint.
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
Shards = dict[str, tuple[Any, Any]]  # name → (sharded model, its optimizer)


def save_checkpoint(
    accelerator: Any, directory: Path, state: dict[str, Any], shards: Shards | None = None
) -> None:
    """Write the models, optimizers, (DDP) RNG states and `state` to `directory`: `shards`
    through DCP, else what accelerate prepared. Called on every process."""
    import torch.distributed.checkpoint as dcp

    staging = directory.with_name(f".{directory.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if shards is None:
        accelerator.save_state(str(staging))
    else:
        dcp.save(_sharded_state(shards), checkpoint_id=str(staging))
    if accelerator.is_main_process:
        torch.save(state, staging / STATE_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(staging, directory)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Any, directory: Path, shards: Shards | None = None
) -> dict[str, Any] | None:
    """Restore the models, optimizers (and, DDP, this process's RNG states) from `directory`;
    the saved `state`, or None when there is none or it is damaged (then it is deleted)."""
    if not directory.is_dir():
        return None
    written = ("model*.safetensors", "optimizer*.bin")
    if shards is not None:
        written = (".metadata", "*.distcp")  # DCP's index (written last) and the shards
    problem = damaged(directory, (STATE_FILE, *written))
    if problem is not None:  # checked before loading: a half-loaded model cannot start over
        log.warning("ppo: discarding damaged checkpoint %s (%s); starting over", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    if shards is None:
        accelerator.load_state(str(directory))
    else:
        _load_shards(shards, directory)
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def _sharded_state(shards: Shards) -> dict[str, dict[str, Any]]:
    """{name: {model, optimizer}} state dicts of this process's shards (DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (model, optimizer) in shards.items():
        weights, moments = get_state_dict(model, optimizer)
        state[name] = {"model": weights, "optimizer": moments}
    return state


def _load_shards(shards: Shards, directory: Path) -> None:
    """Read each process's shards of `directory` into the sharded models and optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(shards)  # the layout to read into (a new optimizer gets its state)
    dcp.load(state, checkpoint_id=str(directory))
    for name, (model, optimizer) in shards.items():
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state[name]["model"],
            optim_state_dict=state[name]["optimizer"],
        )
