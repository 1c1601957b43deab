"""Batched generation with the KV cache: samples after training, and the terminal's `generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import MODELS_DIR, PREPARED_DIR, Params
from tasks.models import device, dtype
from tasks.tracking import is_main_process


def load_policy(path: str | Path, params: Params) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from `path`, in eval mode, padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no model here (run its stage, e.g. `dvc repro {Path(path).name}`)"
        )
    dev = device(params.common.device)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype(params.model.dtype, dev), trust_remote_code=params.model.trust_remote_code
    ).to(dev)
    return model.eval(), tokenizer


def render_prompts(prompts: list[Any], tokenizer: Any) -> list[str]:
    """Plain prompts as they are; conversational ones through the chat template."""
    from trl.data_utils import maybe_apply_chat_template

    return [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Responses to rendered `prompts` (left-padded batches, stop at EOS, special tokens cut)."""
    responses = []
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if do_sample
        else {"do_sample": False}
    )
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True
        ).to(model.device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        responses += tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return responses


def eval_prompts(limit: int | None = None) -> list[Any]:
    """Held-out prompts written by `prepare`."""
    path = PREPARED_DIR / "prompts" / "eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run `dvc repro prepare` first)")
    rows = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()]
    return rows[:limit]


@task(cache_policy=NO_CACHE)
def log_samples(stage: str, params: Params, count: int = 8, max_new_tokens: int = 48) -> None:
    """Greedy responses of `models/<stage>` to a few eval prompts, as an MLflow table."""
    if not is_main_process():
        return
    model, tokenizer = load_policy(MODELS_DIR / stage, params)
    prompts = render_prompts(eval_prompts(count), tokenizer)
    responses = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    mlflow.log_table({"prompt": prompts, "response": responses}, f"{stage}_samples.json")
