"""A NaN that only one rank of a torchrun PPO meets (test_faults.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

POISON = "@"  # a byte no synthetic text contains: its token is its own, in no merge


def poison_one_prompt(repo: Path, work: Path) -> str:
    """In `work`, PPO's inputs from `repo` with a NaN that only one rank meets, in one
    iteration: the reward model (and so the critic, its copy) computes NaN on the POISON
    token, which one prompt of 64 carries and the actor never samples (its generation config
    suppresses it). 64 prompts are 2 iterations of 2 ranks × 16: each prompt is drawn once, by
    one rank. → the poisoned prompt."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    for rel in ("data/prepared", "models/sft", "models/reward_model"):
        shutil.copytree(repo / rel, work / rel)
    tokenizer = AutoTokenizer.from_pretrained(work / "models" / "sft")
    (token,) = tokenizer(POISON)["input_ids"]
    prompts = work / "data" / "prepared" / "prompts" / "train.jsonl"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()][:64]
    assert len(rows) == 64 and not any(POISON in row["prompt"] for row in rows)
    rows[-1]["prompt"] = rows[-1]["prompt"].rstrip("\n") + f" {POISON}\n"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = work / "models" / "reward_model" / "model.safetensors"
    tensors = load_file(weights)
    (embedding,) = [name for name in tensors if name.endswith("embed_tokens.weight")]
    tensors[embedding][token] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    generation = work / "models" / "sft" / "generation_config.json"
    config = json.loads(generation.read_text())
    generation.write_text(json.dumps(config | {"suppress_tokens": [token]}))
    return rows[-1]["prompt"]
