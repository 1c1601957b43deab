"""The evaluate stage: every policy answers the held-out prompts with the same decoding, and three
judges score the answers — the reward model, the SFT reference (KL) and the task's ground truth.

The ground truth is what the reward model is a proxy for: a policy whose reward rises while its
ground-truth score does not is hacking the reward model, and the comparison shows it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import MissingInput
from tasks.generation import decode_responses, eval_prompts, generate, load_policy, render_prompts
from tasks.heldout import GoldScorer
from tasks.models import dtype, load_scorer, locate
from tasks.params import Params
from tasks.scoring import TokenScorer, judge, stop_ids
from tasks.stages import BEST_OF

log = logging.getLogger(__name__)

METRICS = (
    "reward_mean",
    "reward_std",
    "win_rate_vs_sft",
    "kl_to_sft",
    "response_length",
    "eos_rate",
    "ground_truth_score",
    "ground_truth_correct",
    "ground_truth_polite",
)


def check_policies(policies: list[str]) -> None:
    """Every listed policy, and the reward model, has a model: none is skipped silently, and a
    missing one fails before the others were judged."""
    for policy in (*policies, "reward_model"):
        try:
            locate(policy)
        except MissingInput as exc:
            hint = f" (or remove '{policy}' from evaluate.policies)" if policy in policies else ""
            raise MissingInput(f"{exc}{hint}") from None


def base_policy(policy: str) -> str:
    """The model a policy's responses come from: SFT for best-of-n, else the policy itself."""
    return "sft" if policy.startswith(BEST_OF) else policy


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π_sft) = log n − (n−1)/n nats (Stiennon et al. 2020; Gao et al. 2022, eq. 1)."""
    return math.log(n) - (n - 1) / n


def pick_best_of_n(rows: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    """Rows of n consecutive samples per prompt → per prompt the one with the highest score
    (the first on ties, as argmax), its KL replaced by the analytic best-of-n KL."""
    scores = torch.tensor(rows["score"]).view(-1, n)
    best = (scores.argmax(dim=1) + torch.arange(len(scores)) * n).tolist()
    picked = {key: [values[i] for i in best] for key, values in rows.items()}
    picked["kl"] = [best_of_n_kl(n)] * len(best)
    return picked


@task(cache_policy=NO_CACHE)
def answer(policy: str, params: Params) -> dict[str, list[Any]]:
    """The policy's responses to the eval prompts, judged: per prompt the response text, its
    reward-model score, its KL to SFT (nats, summed over tokens), its length and whether it
    ended with EOS. `bon@<n>`: SFT samples n per prompt, the reward model keeps the best."""
    cfg = params.evaluate
    n = int(policy.removeprefix(BEST_OF)) if policy.startswith(BEST_OF) else 1
    model, tokenizer = load_policy(base_policy(policy), params)
    reference = model if base_policy(policy) == "sft" else load_policy("sft", params)[0]
    frozen = dtype(params.model.dtype, model.device)
    reward = load_scorer("reward_model", params.model, frozen, tokenizer.pad_token_id)
    reward = TokenScorer(reward.requires_grad_(False).eval()).to(model.device)
    stops = stop_ids(tokenizer, model)
    torch.manual_seed(params.common.seed)  # every policy samples with the same seed
    rows: dict[str, list[Any]] = {"response": [], "score": [], "kl": [], "length": [], "eos": []}
    prompts = render_prompts(eval_prompts(cfg.max_prompts), tokenizer)
    batches = generate(
        model,
        tokenizer,
        [prompt for prompt in prompts for _ in range(n)],  # n samples of a prompt side by side
        cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample or n > 1,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    for prompt_mask, sequences in batches:
        with torch.no_grad():
            judged = judge(model, reference, reward, sequences, prompt_mask, stops)
        rows["response"] += decode_responses(tokenizer, sequences, prompt_mask.shape[1])
        for key, values in judged.items():
            rows[key] += values.tolist()
    return pick_best_of_n(rows, n) if n > 1 else rows


def compare(
    answers: dict[str, dict[str, list[Any]]],
    prompts: list[Any],
    synthetic: bool,
    gold: GoldScorer | None = None,
) -> dict[str, dict[str, float]]:
    """`{policy: {metric: value}}` with the keys of METRICS (the ground truth's score and its
    parts — which quality a policy gained — only when the task has one: the synthetic one), and
    `gold_reward`, the mean score of a gold reward model (`data.gold_reward_model`), with one."""
    from tasks.synthetic import ground_truth

    sft_scores = torch.tensor(answers["sft"]["score"])
    metrics = {}
    for policy, rows in answers.items():
        scores = torch.tensor(rows["score"])
        wins = (scores > sft_scores).float() + 0.5 * (scores == sft_scores).float()
        metrics[policy] = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "win_rate_vs_sft": wins.mean().item(),
            "kl_to_sft": sum(rows["kl"]) / len(rows["kl"]),
            "response_length": sum(rows["length"]) / len(rows["length"]),
            "eos_rate": sum(rows["eos"]) / len(rows["eos"]),
        }
        if synthetic:
            judged = [ground_truth(p, r) for p, r in zip(prompts, rows["response"], strict=True)]
            for part in judged[0]:  # score, and the parts it averages: correct, polite
                mean = sum(truth[part] for truth in judged) / len(judged)
                metrics[policy][f"ground_truth_{part}"] = mean
        if gold is not None:
            ended = [eos > 0 for eos in rows["eos"]]
            metrics[policy]["gold_reward"] = sum(gold(prompts, rows["response"], ended)) / len(
                ended
            )
    return metrics


def best_policy(metrics: dict[str, dict[str, float]]) -> str:
    """Highest ground-truth score when there is one (ties: higher reward), else highest gold
    reward-model score, else highest reward; among trained policies only (best-of-n needs the
    reward model at inference: no one model)."""
    key = next(
        k for k in ("ground_truth_score", "gold_reward", "reward_mean") if k in metrics["sft"]
    )
    trained = sorted(p for p in metrics if not p.startswith(BEST_OF))
    return max(trained, key=lambda p: (metrics[p][key], metrics[p]["reward_mean"]))


def samples_table(
    answers: dict[str, dict[str, list[Any]]], prompts: list[Any], count: int, synthetic: bool
) -> dict[str, list[Any]]:
    """Columns: prompt, then per policy its response, reward and ground truth (first `count`)."""
    from tasks.synthetic import ground_truth

    prompts = prompts[:count]
    table: dict[str, list[Any]] = {
        "prompt": [p if isinstance(p, str) else json.dumps(p) for p in prompts]
    }
    for policy, rows in answers.items():
        table[f"{policy}_response"] = rows["response"][:count]
        table[f"{policy}_reward"] = rows["score"][:count]
        if synthetic:
            table[f"{policy}_ground_truth"] = [
                ground_truth(p, r)["score"]
                for p, r in zip(prompts, rows["response"][:count], strict=True)
            ]
    return table


@task(cache_policy=NO_CACHE)
def publish(
    metrics: dict[str, dict[str, float]],
    best: str,
    report: Path,
    samples: dict[str, list[Any]],
    params: Params,
) -> str:
    """MLflow: the report and samples on the stage's run, one child run `evaluate/<policy>` per
    policy with identical metric keys (the UI's compare view lines them up), and the best policy
    registered under `tracking.registered_model`; returns the new model version."""
    import mlflow

    from tasks.catalog import lineage, log_model, trained_by
    from tasks.tracking import pipeline_id, upstream_hashes

    mlflow.log_artifacts(str(report))
    mlflow.log_table(samples, "evaluate_samples.json")
    hashes = upstream_hashes("evaluate")
    source, children = "", {}
    for policy, values in metrics.items():
        model = base_policy(policy)  # best-of-n: SFT's lineage
        trained_params, lineage_tags = lineage(
            model, hashes.get(f"dvc.dep.models/{model}", "unknown")
        )
        tags = {"rlhf.stage": "evaluate", "rlhf.policy": policy, "rlhf.pipeline_id": pipeline_id()}
        with mlflow.start_run(
            run_name=f"evaluate/{policy}", nested=True, tags=tags | lineage_tags
        ) as child:
            mlflow.log_params(trained_params)  # what produced it, beside how it scored
            mlflow.log_metrics(values)
            children[policy] = child.info.run_id
            if policy == best:  # the registry points at a copy of the weights in MLflow
                mlflow.log_artifacts(locate(policy)[0], "model")
                source, best_run = mlflow.get_artifact_uri("model"), child.info.run_id
    if (scorer := trained_by("reward_model")) and "dvc.dep.models/reward_model" in hashes:
        log_model("reward_model", scorer, hashes["dvc.dep.models/reward_model"])
    mlflow.set_tag(
        "mlflow.note.content",
        "Policies compared (child runs): "
        + ", ".join(
            f"[{policy}](#/experiments/{mlflow.active_run().info.experiment_id}/runs/{run_id})"
            for policy, run_id in children.items()
        ),
    )
    tags = {f"metric.{key}": f"{value:.4f}" for key, value in metrics[best].items()}
    tags |= {"rlhf.policy": best, "dvc.md5": hashes.get(f"dvc.dep.models/{best}", "unknown")}
    client, name = mlflow.MlflowClient(), params.tracking.registered_model
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description="Best policy of the evaluate stage")
    version = client.create_model_version(name, source, run_id=best_run, tags=tags)
    log.info("registered %s as %s version %s", best, name, version.version)
    return str(version.version)
