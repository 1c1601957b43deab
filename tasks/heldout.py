"""Gold, proxy and KL of a policy on the held-out prompts while it trains (Gao et al. 2022).

PPO, GRPO and RLOO judge their current policy before the first step, every `eval_every` steps
and after the last, on the first `eval_prompts` held-out prompts, greedy, at the stage's own
response length, with evaluate's judge (`tasks.scoring.judge`):

- `heldout/proxy`: the raw reward-model score, the quantity the stage optimises;
- `heldout/kl`: the exact KL to SFT, nats summed over the response (evaluate's `kl_to_sft`);
- `heldout/gold`: what the reward model is a proxy for — the score of `data.gold_reward_model`
  when one is named, else the synthetic task's ground truth; absent with neither.

The stage logs them to its MLflow run at that step and writes them into plots/<stage>.json;
evaluate draws gold and proxy against √KL from them (reports/overoptimisation.png).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.errors import ParamsError
from tasks.generation import decode_responses, eval_prompts, generate, render_prompts
from tasks.params import Params
from tasks.scoring import judge, stop_ids, text_scorer
from tasks.synthetic import ground_truth

GoldScorer = Callable[[list[Any], list[str], list[bool]], list[float]]
"""(prompts, responses, ended) → gold score per response."""


@dataclass(frozen=True)
class HeldOut:
    """The prompts and judges of a stage's held-out evaluations, loaded once per run."""

    prompts: list[Any]  # as prepare wrote them: the ground truth reads the raw prompt
    rendered: list[str]  # through the policy's chat template
    reference: Any  # SFT, frozen (PPO: the run's own reference, no extra copy)
    reward: Any  # the reward model read at every position (a TokenScorer), frozen
    gold: GoldScorer | None
    max_new_tokens: int
    synced_gpus: bool = False  # FSDP: every process joins every layer's gather


def held_out(
    params: Params,
    count: int,
    max_new_tokens: int,
    tokenizer: Any,
    reference: Any,
    reward: Any,
    synced_gpus: bool = False,
) -> HeldOut:
    """The first `count` held-out prompts with the judges a stage evaluates its policy with."""
    prompts = eval_prompts(count)
    rendered = render_prompts(prompts, tokenizer)
    return HeldOut(
        prompts, rendered, reference, reward, gold_scorer(params), max_new_tokens, synced_gpus
    )


def gold_scorer(params: Params) -> GoldScorer | None:
    """`data.gold_reward_model` (a local directory or a hub id) on the text a reward model reads,
    with its own tokenizer; else the synthetic task's ground truth; else None."""
    name, key = params.data.gold_reward_model, "data.gold_reward_model"
    if name is None:
        return _ground_truth if params.data.source == "synthetic" else None
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not (local / "config.json").is_file():
        what = "is not a model directory (no config.json)" if local.exists() else "does not exist"
        raise ParamsError(f"{key}: '{name}' {what} (give a model directory or a hub id)", key=key)
    try:
        score = text_scorer(local if local.exists() else name, params)
    except (OSError, ValueError) as exc:  # a hub id that is not there, or not reachable
        problem = str(exc).strip().splitlines()[0]
        raise ParamsError(f"{key}: cannot load '{name}': {problem}", key=key) from None
    return lambda prompts, responses, ended: score(prompts, responses, ended).tolist()


def _ground_truth(prompts: list[Any], responses: list[str], _: list[bool]) -> list[float]:
    return [ground_truth(p, r)["score"] for p, r in zip(prompts, responses, strict=True)]


@torch.no_grad()
def evaluate_held_out(
    policy: Any, tokenizer: Any, held: HeldOut, batch_size: int = 64
) -> dict[str, float]:
    """`heldout/proxy`, `heldout/kl` and (with a gold) `heldout/gold`: means over the prompts
    of the policy's greedy responses. The policy is in eval mode meanwhile (no dropout)."""
    training = policy.training
    policy.eval()
    stops = stop_ids(tokenizer, policy)
    scores, kls, responses, ended = [], [], [], []
    for prompt_mask, sequences in generate(
        policy,
        tokenizer,
        held.rendered,
        batch_size,
        max_new_tokens=held.max_new_tokens,
        do_sample=False,
        synced_gpus=held.synced_gpus,
    ):
        judged = judge(policy, held.reference, held.reward, sequences, prompt_mask, stops)
        scores += judged["score"].tolist()
        kls += judged["kl"].tolist()
        ended += judged["eos"].bool().tolist()
        responses += decode_responses(tokenizer, sequences, prompt_mask.shape[1])
    policy.train(training)
    metrics = {"heldout/proxy": sum(scores) / len(scores), "heldout/kl": sum(kls) / len(kls)}
    if held.gold is not None:
        gold = held.gold(held.prompts, responses, ended)
        metrics["heldout/gold"] = sum(gold) / len(gold)
    return metrics


def due(step: int, every: int, last: int) -> bool:
    """Whether the policy after `step` steps is evaluated: the first, every `every`-th, the last."""
    return step % every == 0 or step == last
