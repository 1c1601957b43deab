"""Inputs where a NaN meets one rank of a `torchrun --nproc_per_node 2` PPO, in one iteration
(test_faults.py): the real stage must stop both ranks with the same error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from tasks.params import Params

POISON = (
    "@"  # a byte no synthetic text holds: a token of its own (the byte-level alphabet), no merge
)


def poison_one_prompt(repo: Path, work: Path, params: Params) -> None:
    """In `work`, PPO's inputs copied from `repo`, where the reward model (and so the critic,
    which starts from it) computes NaN on the POISON token: one training prompt of 64 carries
    it, and the actor never samples it (its generation config suppresses it). With 16 prompts
    per rank and iteration, 64 prompts are 2 iterations of 2 ranks, each prompt drawn once, by
    one rank: the poisoned one is the first that rank 1 draws in iteration 1, as PPO's own
    `prompt_batch` draws them."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from tasks.ppo.train import prompt_batch

    for rel in ("data/prepared", "models/sft", "models/reward_model"):
        shutil.copytree(repo / rel, work / rel)
    tokenizer = AutoTokenizer.from_pretrained(work / "models" / "sft")
    (token,) = tokenizer(POISON)["input_ids"]
    prompts = work / "data" / "prepared" / "prompts" / "train.jsonl"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()][:64]
    assert len(rows) == 64 and not any(POISON in row["prompt"] for row in rows)
    rank_1 = SimpleNamespace(num_processes=2, process_index=1)
    draws = SimpleNamespace(params=params, prompts=list(range(64)), accelerator=rank_1)
    (poisoned, *_) = prompt_batch(draws, 1)  # type: ignore[arg-type]
    rows[poisoned]["prompt"] = rows[poisoned]["prompt"].rstrip("\n") + f" {POISON}\n"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = work / "models" / "reward_model" / "model.safetensors"
    tensors = load_file(weights)
    (embedding,) = [name for name in tensors if name.endswith("embed_tokens.weight")]
    tensors[embedding][token] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    generation = work / "models" / "sft" / "generation_config.json"
    config = json.loads(generation.read_text())
    generation.write_text(json.dumps(config | {"suppress_tokens": [token]}))
