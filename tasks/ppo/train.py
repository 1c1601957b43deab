"""The PPO loop of the seed's "PPO-epoch" section: each iteration a rollout task, an update task.

Four models: the actor (policy, from models/sft, trained), the reference (models/sft, frozen),
the reward model (models/reward_model, frozen) and the critic (initialised from the reward model,
trained). Actor and critic have their own AdamW optimizers and schedules. Resumable state —
both models, optimizers, schedules, RNG states, iteration, KL coefficient and the metric history —
is checkpointed to `checkpoints/ppo/` every `ppo.checkpoint_every` iterations; a rerun of a
killed stage continues there and ends where an uninterrupted run would.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import time
from typing import Any

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from trl.trainer.utils import entropy_from_logits  # chunked: faster than one pass (performance.md)

from tasks.catalog import record_run
from tasks.errors import TrainingDiverged, stop_if_signalled
from tasks.generation import generation_kwargs
from tasks.heldout import HeldOut, due, evaluate_held_out, held_out
from tasks.io import atomic_dir, write_json
from tasks.models import device, dtype, load_tokenizer
from tasks.params import Params
from tasks.ppo.checkpoint import STATE_FILE, save_checkpoint
from tasks.ppo.distributed import check_replicas, mean_over_ranks, unsharded_policy
from tasks.ppo.losses import (
    adaptive_kl_coef,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    value_loss,
)
from tasks.ppo.rollout import Experience, make_experience
from tasks.ppo.run import PPORun, setup
from tasks.scoring import response_logits
from tasks.stages import MODELS_DIR, PLOTS_DIR
from tasks.tracking_queue import log_table

log = logging.getLogger(__name__)


def prompt_batch(run: PPORun, iteration: int) -> list[str]:
    """This iteration's prompts: epochs over a seeded permutation of the prompt set, so the
    batch depends only on (seed, iteration, process) — a resumed run draws the same prompts."""
    size, total = run.params.ppo.rollout_batch_size, len(run.prompts)
    start = (iteration * run.accelerator.num_processes + run.accelerator.process_index) * size
    orders: dict[int, torch.Tensor] = {}
    batch = []
    for index in range(start, start + size):
        epoch, offset = divmod(index, total)
        if epoch not in orders:
            seeded = torch.Generator().manual_seed(run.params.common.seed + epoch)
            orders[epoch] = torch.randperm(total, generator=seeded)
        batch.append(run.prompts[orders[epoch][offset]])
    return batch


@task(cache_policy=NO_CACHE)
def rollout(run: PPORun, iteration: int) -> tuple[Experience, dict[str, float]]:
    """Generate, score and build the experience of one iteration; rollout statistics."""
    cfg, tokenizer = run.params.ppo, run.tokenizer
    start = time.perf_counter()
    prompts = tokenizer(prompt_batch(run, iteration), return_tensors="pt", padding=True)
    # Seeded per iteration and process: a resumed run, and every rank, samples reproducibly.
    torch.manual_seed(
        run.params.common.seed * 1_000_003 + iteration * 101 + run.accelerator.process_index
    )
    actor = run.accelerator.unwrap_model(run.actor)
    generation = generation_kwargs(
        actor,
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
    )
    if run.sharded:  # every process joins every layer's gather until all have finished
        generation["synced_gpus"] = True
    with run.accelerator.autocast():
        experience = make_experience(
            actor=actor,
            reference=run.reference,
            critic=run.critic,
            reward=run.reward,
            prompt_ids=prompts["input_ids"].to(run.accelerator.device),
            prompt_mask=prompts["attention_mask"].to(run.accelerator.device),
            generation=generation,
            stop_ids=generation["eos_token_id"],
            cfg=cfg,
            kl_coef=run.kl_coef,
            score_stats=run.score_stats,
        )
    _check_finite(run, "reward-model score", experience.raw_scores, iteration)
    seconds = time.perf_counter() - start
    mask = experience.mask
    kl = ((experience.logprobs - experience.ref_logprobs) * mask).sum(dim=1)  # k1, per sequence
    tokens = mask.sum().item()
    stats = {
        "objective/kl": kl.mean().item(),
        "objective/kl_coef": run.kl_coef,
        "objective/scores": experience.scores.mean().item(),
        "objective/scores_raw": experience.raw_scores.mean().item(),
        "objective/rlhf_reward": (experience.rewards * mask).sum(dim=1).mean().item(),
        "val/eos_rate": experience.has_eos.float().mean().item(),
        "val/response_length": mask.sum(dim=1).float().mean().item(),
        "val/explained_variance": explained_variance(
            experience.values, experience.returns, mask
        ).item(),
        "time/rollout_tokens_per_s": tokens / seconds,
        "time/rollout_s": seconds,
    }
    return experience, stats


@task(cache_policy=NO_CACHE)
def update(run: PPORun, experience: Experience, iteration: int) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled mini-batches of the experience; mean statistics."""
    cfg = run.params.ppo
    start = time.perf_counter()
    episodes = experience.mask.shape[0]
    shuffle = torch.Generator().manual_seed(run.params.common.seed * 100_003 + iteration)
    steps = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(episodes, generator=shuffle)
        for begin in range(0, episodes, cfg.mini_batch_size):
            rows = order[begin : begin + cfg.mini_batch_size].to(experience.mask.device)
            steps.append(_step(run, experience, rows, iteration, len(steps)))
    stats = {key: sum(step[key] for step in steps) / len(steps) for key in steps[0]}
    seconds = time.perf_counter() - start
    stats["time/update_tokens_per_s"] = experience.mask.sum().item() * cfg.ppo_epochs / seconds
    stats["time/update_s"] = seconds
    stats["lr/actor"] = run.actor_scheduler.get_last_lr()[0]
    stats["lr/critic"] = run.critic_scheduler.get_last_lr()[0]
    return stats


def _step(
    run: PPORun, exp: Experience, rows: torch.Tensor, iteration: int, step: int
) -> dict[str, float]:
    """One gradient step of the actor (clipped surrogate [+ ptx]) and one of the critic."""
    cfg, accelerator = run.params.ppo, run.accelerator
    sequences, attention, positions = (
        exp.sequences[rows],
        exp.attention_mask[rows],
        exp.position_ids[rows],
    )
    mask, P, T = exp.mask[rows], exp.prompt_length, exp.mask.shape[1]
    with accelerator.autocast():
        logits = response_logits(run.actor, sequences, attention, positions, T, cfg.temperature)
        logprobs = logprobs_from_logits(logits, sequences[:, P:])
        pg_loss, pg_stats = policy_loss(
            logprobs, exp.logprobs[rows], exp.advantages[rows], mask, cfg.clip_range
        )
        actor_loss, stats = pg_loss, {}
        if cfg.ptx_coef > 0:
            ptx_loss = run.actor(**_ptx_batch(run, iteration, step)).loss
            actor_loss = actor_loss + cfg.ptx_coef * ptx_loss
            stats["ptx/loss"] = ptx_loss.item()
    _descend(run, "actor", actor_loss, iteration)

    with accelerator.autocast():
        values = run.critic(sequences, attention, positions)[:, P - 1 : -1]
        vf_loss, vf_stats = value_loss(
            values, exp.values[rows], exp.returns[rows], mask, cfg.clip_range_value
        )
    _descend(run, "critic", vf_loss, iteration)
    return stats | {
        "loss/policy": pg_loss.item(),
        "loss/value": vf_loss.item(),
        "policy/clipfrac": pg_stats["clipfrac"].item(),
        "policy/approx_kl": pg_stats["approx_kl"].item(),
        "policy/entropy": masked_mean(entropy_from_logits(logits.detach()), mask).item(),
        "val/clipfrac": vf_stats["clipfrac"].item(),
    }


def _descend(run: PPORun, model: str, loss: torch.Tensor, iteration: int) -> None:
    """One optimizer step of the actor or the critic on `loss`: backward, clip the gradient
    norm, step, advance the schedule. A non-finite loss or norm stops before the weights move."""
    _check_finite(run, f"{model} loss", loss, iteration)
    run.accelerator.backward(loss)
    parameters = getattr(run, model).parameters()
    norm = run.accelerator.clip_grad_norm_(parameters, run.params.ppo.max_grad_norm)
    # The norm of DDP's averaged gradients: the same on every process, no collective needed.
    _check_finite(run, f"{model} gradient", norm, iteration, same_on_every_rank=True)
    optimizer = getattr(run, f"{model}_optimizer")
    optimizer.step()
    getattr(run, f"{model}_scheduler").step()
    optimizer.zero_grad()


def _ptx_batch(run: PPORun, iteration: int, step: int) -> dict[str, torch.Tensor]:
    """A seeded batch of SFT examples with labels on the completion tokens only."""
    size = run.params.ppo.ptx_batch_size
    pick = random.Random(f"{run.params.common.seed}-{iteration}-{step}")
    pairs = [pick.choice(run.ptx_examples) for _ in range(size)]
    tokenizer = run.tokenizer
    batch = tokenizer(
        [prompt + completion for prompt, completion in pairs],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        truncation=True,
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, (prompt, _) in enumerate(pairs):
        labels[row, : len(tokenizer(prompt)["input_ids"])] = -100  # learn the completion only
    return {key: value.to(run.accelerator.device) for key, value in batch.items()} | {
        "labels": labels.to(run.accelerator.device)
    }


def _check_finite(
    run: PPORun, what: str, value: torch.Tensor, iteration: int, same_on_every_rank: bool = False
) -> None:
    """Stop before a NaN/Inf reaches the weights; the last good checkpoint is kept. Every
    process learns whether any one saw it, so all stop together instead of one leaving the
    others waiting in the next collective."""
    bad = torch.tensor(0.0 if torch.isfinite(value).all() else 1.0, device=value.device)
    if run.accelerator.num_processes > 1 and not same_on_every_rank:
        bad = run.accelerator.reduce(bad, "sum")
    if bad.item() == 0:
        return
    kept = (
        f"the last good checkpoint stays in {run.checkpoints}"
        if (run.state_dir / STATE_FILE).is_file()
        else "no checkpoint was written yet"
    )
    raise TrainingDiverged(
        f"ppo: iteration {iteration}: non-finite {what}; {kept} "
        "(lower ppo.actor_lr / ppo.critic_lr, or check models/reward_model, and rerun)"
    )


def train_ppo(params: Params) -> dict[str, float]:
    """Run (or resume) the PPO iterations; write models/ppo/ and plots/ppo.json; summary metrics."""
    cfg = params.ppo
    run = setup(params)
    held = None
    if cfg.eval_every is not None:  # judged with the run's own reference and reward model
        held = held_out(
            params,
            cfg.eval_prompts,
            cfg.max_new_tokens,
            run.tokenizer,
            run.reference,
            run.reward,
            synced_gpus=run.sharded,
        )
    start = time.perf_counter()
    for iteration in range(run.iteration, cfg.num_iterations):
        stop_if_signalled()  # a SIGTERM whose exception library code swallowed
        probe = _held_out_metrics(run, held, iteration)  # the policy this rollout samples
        began = time.perf_counter()
        experience, stats = rollout(run, iteration)
        stats |= update(run, experience, iteration)
        stats["time/episodes_per_s"] = cfg.rollout_batch_size / (time.perf_counter() - began)
        stats = mean_over_ranks(run, stats, iteration) | probe
        if cfg.adaptive_kl is not None:  # every process steers with the same (mean) KL
            run.kl_coef = adaptive_kl_coef(
                run.kl_coef,
                stats["objective/kl"],
                cfg.adaptive_kl.target,
                cfg.adaptive_kl.horizon,
                cfg.rollout_batch_size,
            )
        run.history.append(stats)
        run.iteration = iteration + 1
        _report(run, stats, experience, began)
        if run.iteration % cfg.checkpoint_every == 0 and run.iteration < cfg.num_iterations:
            state = {
                "iteration": run.iteration,
                "kl_coef": run.kl_coef,
                "history": run.history,
                "actor_scheduler": run.actor_scheduler.state_dict(),
                "critic_scheduler": run.critic_scheduler.state_dict(),
            }
            save_checkpoint(run.accelerator, run.state_dir, state, run.shards)
    final = _held_out_metrics(run, held, cfg.num_iterations)  # the trained policy
    metrics = _summary(run.history) | {"train_runtime_s": time.perf_counter() - start}
    if final:  # the trained policy's gold, proxy and KL, and what judging cost in all
        judged = [*run.history, final]
        metrics |= {key.replace("/", "_"): final[key] for key in final if key.startswith("heldout")}
        metrics["heldout_s"] = sum(row.get("time/heldout_s", 0.0) for row in judged)
    # What only training needed goes before the export, or it is the run's peak (performance.md)
    run.critic = run.reward = run.reference = run.actor_optimizer = run.critic_optimizer = None
    run.actor_scheduler = run.critic_scheduler = held = None
    run.accelerator.free_memory()  # accelerate's own references to them, then a collection
    policy = unsharded_policy(run)  # FSDP: gathered to rank 0, with every process
    check_replicas(run, policy)
    if run.accelerator.is_main_process:
        if final and cfg.num_iterations > run.logged_until:
            mlflow.log_metrics(final, step=cfg.num_iterations)
        _save_policy(run, policy)
        rows = [{"iteration": i} | row for i, row in enumerate(run.history)]
        rows += [{"iteration": cfg.num_iterations} | final] if final else []
        write_json(PLOTS_DIR / "ppo.json", rows)
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # finished: nothing left to resume
    return metrics


def _held_out_metrics(run: PPORun, held: HeldOut | None, step: int) -> dict[str, float]:
    """When due, gold, proxy and KL of the policy after `step` iterations on the held-out
    prompts (tasks/heldout.py), and what they cost; {} otherwise. Every process judges the
    same prompts (FSDP needs them all in each forward; under DDP it costs no wall time)."""
    cfg = run.params.ppo
    if held is None or cfg.eval_every is None or not due(step, cfg.eval_every, cfg.num_iterations):
        return {}
    began = time.perf_counter()
    with run.accelerator.autocast():
        metrics = evaluate_held_out(run.accelerator.unwrap_model(run.actor), run.tokenizer, held)
    if run.accelerator.is_main_process:
        log.info(
            "ppo: held-out after %d iterations  proxy %.3f  gold %.3f  kl %.3f",
            step,
            metrics["heldout/proxy"],
            metrics.get("heldout/gold", float("nan")),
            metrics["heldout/kl"],
        )
    return metrics | {"time/heldout_s": time.perf_counter() - began}


def _report(run: PPORun, stats: dict[str, float], experience: Experience, began: float) -> None:
    """Progress line, MLflow metrics, and every `sample_every` iterations a samples table."""
    cfg = run.params.ppo
    if not run.accelerator.is_main_process:
        return
    log.info(
        "ppo: iteration %d/%d  score %.3f  kl %.3f  eos %.2f  (%.1f s)",
        run.iteration,
        cfg.num_iterations,
        stats["objective/scores"],
        stats["objective/kl"],
        stats["val/eos_rate"],
        time.perf_counter() - began,
    )
    if run.iteration - 1 > run.logged_until:  # a resumed run has the steps before its kill
        mlflow.log_metrics(stats, step=run.iteration - 1)
    if run.iteration % cfg.sample_every == 0 or run.iteration == cfg.num_iterations:
        _log_rollout_samples(run, experience, run.iteration - 1)


def _log_rollout_samples(run: PPORun, experience: Experience, iteration: int) -> None:
    """A few episodes of this rollout (prompt, response, score) as an MLflow table."""
    count = min(8, experience.mask.shape[0])
    P = experience.prompt_length
    decode = run.tokenizer.batch_decode
    log_table(
        {
            "iteration": [iteration] * count,
            "prompt": decode(experience.sequences[:count, :P], skip_special_tokens=True),
            "response": decode(experience.sequences[:count, P:], skip_special_tokens=True),
            "score": experience.scores[:count].tolist(),
        },
        f"ppo_samples/iteration_{iteration:05d}.json",
    )


def _summary(history: list[dict[str, float]]) -> dict[str, float]:
    """Score curve (first vs last quarter of iterations), final KL, throughput, peak memory."""
    quarter = max(1, len(history) // 4)

    def mean(key: str, rows: list[dict[str, float]]) -> float:
        return sum(row[key] for row in rows) / len(rows)

    return {
        "score_first_quarter": mean("objective/scores", history[:quarter]),
        "score_last_quarter": mean("objective/scores", history[-quarter:]),
        "kl_last_quarter": mean("objective/kl", history[-quarter:]),
        "kl_final": history[-1]["objective/kl"],
        "eos_rate_final": history[-1]["val/eos_rate"],
        "rollout_tokens_per_second": mean("time/rollout_tokens_per_s", history),
        "update_tokens_per_second": mean("time/update_tokens_per_s", history),
        "episodes_per_second": mean("time/episodes_per_s", history),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _save_policy(run: PPORun, policy: Any) -> None:
    """models/ppo/: the actor (LoRA merged) in the model dtype, with the SFT tokenizer."""
    actor = policy.merge_and_unload() if run.params.ppo.lora is not None else policy
    dev = device(run.params.common.device)
    with atomic_dir(MODELS_DIR / "ppo") as out:
        actor.config.use_cache = True  # gradient checkpointing turned it off for training
        actor.to(dtype(run.params.model.dtype, dev)).save_pretrained(out)
        load_tokenizer("sft", run.params.model).save_pretrained(out)
        record_run(out)
