"""The one generation loop (batched, KV cache, stop at EOS): samples after training, evaluate's
answers, and the terminal's `rlhf generate`; PPO's rollout uses the same sampling settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import MissingInput
from tasks.models import device, dtype, load_causal_lm, load_tokenizer
from tasks.params import Params
from tasks.scoring import stop_ids
from tasks.stages import PREPARED_DIR
from tasks.tracking import is_main_process
from tasks.tracking_queue import log_table


def load_policy(model: str | Path, params: Params) -> tuple[Any, Any]:
    """A causal LM (a stage name or a model directory) and its tokenizer, in eval mode on the
    stage's device, padding on the left for generation."""
    dev = device(params.common.device)
    tokenizer = load_tokenizer(model, params.model, padding_side="left")
    policy = load_causal_lm(model, params.model, dtype(params.model.dtype, dev)).to(dev)
    return policy.eval(), tokenizer


def render_prompts(prompts: list[Any], tokenizer: Any) -> list[str]:
    """Plain prompts as they are; conversational ones through the chat template."""
    from trl.data_utils import maybe_apply_chat_template

    return [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]


def generation_kwargs(
    model: Any,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> dict[str, Any]:
    """`generate`'s keyword arguments: greedy, or sampling with the given settings; stops at
    any of the stop ids; pads with the tokenizer's pad token."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if do_sample
        else {"do_sample": False}
    )
    return sampling | {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop_ids(tokenizer, model),
        "use_cache": True,
    }


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int,
    synced_gpus: bool = False,
    **settings: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of rendered `prompts`: (prompt attention mask `[B, P]`, sequences `[B, P+T]`).
    `settings` are `generation_kwargs`'s; `synced_gpus` for a model sharded over processes."""
    kwargs = generation_kwargs(model, tokenizer, **settings)
    if synced_gpus:  # every process joins every layer's gather until all have finished
        kwargs["synced_gpus"] = True
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True
        ).to(model.device)
        yield batch["attention_mask"], model.generate(**batch, **kwargs)


def generate_texts(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int = 64, **settings: Any
) -> list[str]:
    """Responses to rendered `prompts`, special tokens cut."""
    responses = []
    for prompt_mask, sequences in generate(model, tokenizer, prompts, batch_size, **settings):
        responses += decode_responses(tokenizer, sequences, prompt_mask.shape[1])
    return responses


def decode_responses(tokenizer: Any, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    return tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)


def eval_prompts(limit: int | None = None) -> list[Any]:
    """Held-out prompts written by `prepare`."""
    path = PREPARED_DIR / "prompts" / "eval.jsonl"
    if not path.is_file():
        raise MissingInput(f"{path}: missing; run `dvc repro prepare`")
    rows = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()]
    return rows[:limit]


@task(cache_policy=NO_CACHE)
def log_samples(stage: str, params: Params, count: int = 8, max_new_tokens: int = 48) -> None:
    """Greedy responses of `models/<stage>` to a few eval prompts, as an MLflow table."""
    if not is_main_process():
        return
    model, tokenizer = load_policy(stage, params)
    prompts = render_prompts(eval_prompts(count), tokenizer)
    responses = generate_texts(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False
    )
    log_table({"prompt": prompts, "response": responses}, f"{stage}_samples.json")
