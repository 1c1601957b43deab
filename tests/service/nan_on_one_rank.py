"""Run under `torchrun --nproc_per_node 2`: a NaN loss on rank 1 only must stop both ranks in
PPO's finiteness check (tasks/ppo/train.py), instead of leaving rank 0 in the next collective.
Each rank prints `rank R: stopped: <message>` or `rank R: went on`."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from tasks.errors import TrainingDiverged
from tasks.ppo.train import _check_finite

accelerator = Accelerator(cpu=True)
run = SimpleNamespace(  # the fields of a PPORun the check reads
    accelerator=accelerator, checkpoints=Path("checkpoints/ppo"), state_dir=Path("none")
)
rank = accelerator.process_index
loss = torch.tensor(float("nan") if rank == 1 else 0.5)
try:
    _check_finite(run, "actor loss", loss, 3)
    accelerator.wait_for_everyone()  # where a rank that went on would wait for ever
    print(f"rank {rank}: went on", flush=True)
except TrainingDiverged as exc:
    print(f"rank {rank}: stopped: {exc}", flush=True)
    sys.exit(1)
