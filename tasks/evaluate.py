"""The evaluate stage: every policy answers the held-out prompts with the same decoding, and three
judges score the answers — the reward model, the SFT reference (KL) and the task's ground truth.

The ground truth is what the reward model is a proxy for: a policy whose reward rises while its
ground-truth score does not is hacking the reward model, and the comparison shows it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import MODELS_DIR, Params
from tasks.generation import eval_prompts, load_policy, render_prompts
from tasks.models import device, dtype
from tasks.ppo.rollout import TokenScorer, positions_from_mask, response_mask

log = logging.getLogger(__name__)

METRICS = (
    "reward_mean",
    "reward_std",
    "win_rate_vs_sft",
    "kl_to_sft",
    "response_length",
    "eos_rate",
    "ground_truth_score",
)


def policy_dir(policy: str) -> Path:
    """models/<policy>, which must hold a model: a listed policy is never skipped silently."""
    path = MODELS_DIR / policy
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: policy '{policy}' is listed in evaluate.policies but has no model "
            f"(run `dvc repro {policy}`, or remove it from evaluate.policies)"
        )
    return path


@task(cache_policy=NO_CACHE)
def answer(policy: str, params: Params) -> dict[str, list[Any]]:
    """The policy's responses to the eval prompts, judged: per prompt the response text, its
    reward-model score, its KL to SFT (nats, summed over tokens), its length and whether it
    ended with EOS."""
    cfg = params.evaluate
    prompts = eval_prompts(cfg.max_prompts)
    model, tokenizer = load_policy(policy_dir(policy), params)
    reference = model if policy == "sft" else load_policy(policy_dir("sft"), params)[0]
    reward = _reward_model(params, model.device)
    stop_ids = sorted(
        {tokenizer.eos_token_id, *_ids(model.generation_config.eos_token_id)} - {None}
    )
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        if cfg.do_sample
        else {"do_sample": False}
    )
    torch.manual_seed(params.common.seed)  # every policy samples with the same seed
    rows: dict[str, list[Any]] = {"response": [], "score": [], "kl": [], "length": [], "eos": []}
    rendered = render_prompts(prompts, tokenizer)
    for start in range(0, len(rendered), cfg.batch_size):
        batch = tokenizer(
            rendered[start : start + cfg.batch_size], return_tensors="pt", padding=True
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
                use_cache=True,
                **sampling,
            )
            judged = _judge(model, reference, reward, out, batch["attention_mask"], stop_ids)
        P = batch["input_ids"].shape[1]
        rows["response"] += tokenizer.batch_decode(out[:, P:], skip_special_tokens=True)
        for key, values in judged.items():
            rows[key] += values.tolist()
    return rows


def _judge(
    policy: Any,
    reference: Any,
    reward: TokenScorer,
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    stop_ids: list[int],
) -> dict[str, torch.Tensor]:
    """Per row of `[B, P+T]` sequences: reward score at the last valid token, exact KL to the
    reference summed over the response (`Σ_t Σ_v π(v|s_t) log π(v|s_t)/π_ref(v|s_t)`),
    length (EOS included) and EOS flag."""
    P = prompt_mask.shape[1]
    mask, has_eos = response_mask(sequences[:, P:], stop_ids)
    attention = torch.cat([prompt_mask, mask], dim=1)
    positions = positions_from_mask(attention)
    inputs = {"input_ids": sequences, "attention_mask": attention, "position_ids": positions}
    T = mask.shape[1]
    keep = {"logits_to_keep": T + 1}  # the lm head only over the response: [B, T+1, V]
    logp = torch.log_softmax(policy(**inputs, **keep).logits[:, :-1].float(), dim=-1)
    ref_logp = torch.log_softmax(reference(**inputs, **keep).logits[:, :-1].float(), dim=-1)
    kl = ((logp.exp() * (logp - ref_logp)).sum(dim=-1) * mask).sum(dim=1)
    last = P + mask.sum(dim=1) - 1
    scores = reward(sequences, attention, positions).gather(1, last.unsqueeze(1)).squeeze(1)
    return {"score": scores, "kl": kl, "length": mask.sum(dim=1), "eos": has_eos.float()}


def _reward_model(params: Params, where: torch.device) -> TokenScorer:
    from transformers import AutoModelForSequenceClassification

    path = MODELS_DIR / "reward_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no reward model (run `dvc repro reward_model` first)")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype(params.model.dtype, device(params.common.device))
    )
    return TokenScorer(model.requires_grad_(False).eval()).to(where)


def _ids(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def compare(
    answers: dict[str, dict[str, list[Any]]], prompts: list[Any], synthetic: bool
) -> dict[str, dict[str, float]]:
    """`{policy: {metric: value}}` with the keys of METRICS (ground_truth_score only when the
    task has a ground truth, i.e. the synthetic default)."""
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
            truth = [
                ground_truth(p, r)["score"] for p, r in zip(prompts, rows["response"], strict=True)
            ]
            metrics[policy]["ground_truth_score"] = sum(truth) / len(truth)
    return metrics


def best_policy(metrics: dict[str, dict[str, float]]) -> str:
    """Highest ground-truth score when there is one (ties: higher reward), else highest reward."""
    key = "ground_truth_score" if "ground_truth_score" in metrics["sft"] else "reward_mean"
    return max(sorted(metrics), key=lambda p: (metrics[p][key], metrics[p]["reward_mean"]))


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

    from tasks.tracking import pipeline_id, upstream_hashes

    mlflow.log_artifacts(str(report))
    mlflow.log_table(samples, "evaluate_samples.json")
    hashes = upstream_hashes("evaluate")
    source = ""
    for policy, values in metrics.items():
        tags = {"rlhf.stage": "evaluate", "rlhf.policy": policy, "rlhf.pipeline_id": pipeline_id()}
        with mlflow.start_run(run_name=f"evaluate/{policy}", nested=True, tags=tags) as child:
            mlflow.log_metrics(values)
            if policy == best:  # the registry points at a copy of the weights in MLflow
                mlflow.log_artifacts(str(policy_dir(policy)), "model")
                source, best_run = mlflow.get_artifact_uri("model"), child.info.run_id
    tags = {f"metric.{key}": f"{value:.4f}" for key, value in metrics[best].items()}
    tags |= {"rlhf.policy": best, "dvc.md5": hashes.get(f"dvc.dep.models/{best}", "unknown")}
    client, name = mlflow.MlflowClient(), params.tracking.registered_model
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description="Best policy of the evaluate stage")
    version = client.create_model_version(name, source, run_id=best_run, tags=tags)
    log.info("registered %s as %s version %s", best, name, version.version)
    return str(version.version)
