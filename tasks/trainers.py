"""The TRL stages — sft, reward_model, dpo, simpo — as one task: train, save, summarise.

TRL does the training; this module wires it to the pipeline: the stage's `trainer:` params become
the TRL config (plus what the pipeline owns: output dir, run name, seed, precision, MLflow), the
trainer's own MLflow callback logs per-step metrics into the run the flow opened, intermediate
checkpoints live in `checkpoints/<stage>/` (outside DVC's outs) so a killed stage resumes, and
the final model is written atomically to `models/<stage>/` in safetensors.
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import (
    CHECKPOINTS_DIR,
    MODELS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    LoraConfig,
    Params,
    trl_config_class,
)
from tasks.io import atomic_dir, resumable_dir, write_json
from tasks.models import base_model, device, dtype

log = logging.getLogger(__name__)

TRAINERS = {
    "sft": "trl:SFTTrainer",
    "reward_model": "trl:RewardTrainer",
    "dpo": "trl:DPOTrainer",
    "simpo": "trl.experimental.cpo:CPOTrainer",
}
DATASET = {"sft": "sft", "reward_model": "preference", "dpo": "preference", "simpo": "preference"}
REWARD_STATS = "reward_stats.json"  # mean/std of the reward model's scores, for PPO
# Summary metrics (metrics/<stage>.json) ← the trainer's final evaluation keys.
SUMMARY = {
    "sft": {"eval_loss": "eval_loss", "eval_token_accuracy": "eval_mean_token_accuracy"},
    "reward_model": {"eval_accuracy": "eval_accuracy", "eval_margin": "eval_margin"},
    "dpo": {
        "eval_reward_accuracy": "eval_rewards/accuracies",
        "eval_reward_margin": "eval_rewards/margins",
        "eval_logps_chosen": "eval_logps/chosen",
        "eval_logps_rejected": "eval_logps/rejected",
    },
}
SUMMARY["simpo"] = SUMMARY["dpo"]


@task(cache_policy=NO_CACHE)
def train(stage: str, params: Params) -> dict[str, float]:
    """Train `stage` with its TRL trainer; write `models/<stage>/`; return summary metrics."""
    from transformers import set_seed

    section = getattr(params, stage)
    set_seed(params.common.seed)
    dev = device(params.common.device)
    model_dtype = dtype(params.model.dtype, dev)
    model, tokenizer = _load_start(stage, params, model_dtype)
    checkpoints = CHECKPOINTS_DIR / stage
    args = trl_config_class(stage)(
        **section.trainer,
        output_dir=str(checkpoints),
        run_name=stage,
        report_to=["mlflow"],
        seed=params.common.seed,
        use_cpu=dev.type == "cpu",
        bf16=model_dtype == torch.bfloat16,
        fp16=model_dtype == torch.float16,
    )
    start = MODELS_DIR / ("base" if stage == "sft" else "sft")
    resumable_dir(checkpoints, params, stage, [PREPARED_DIR / DATASET[stage], start])
    data = _load_dataset(DATASET[stage])
    module, name = TRAINERS[stage].split(":")
    trainer = getattr(importlib.import_module(module), name)(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        peft_config=_peft_config(section.lora, stage),
    )
    if trainer.is_world_process_zero():  # under `accelerate launch`, rank 0 tracks and writes
        mlflow.log_dict(args.to_dict(), f"{stage}_trl_config.json")
    resume = _last_complete_checkpoint(checkpoints)
    if resume:
        log.info("%s: resuming from %s", stage, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    evaluation = trainer.evaluate()
    runtime = result.metrics["train_runtime"]
    tokens = max((entry.get("num_tokens", 0) for entry in trainer.state.log_history), default=0)
    metrics = {"train_loss": result.training_loss, "train_runtime_s": runtime}
    if tokens and runtime:  # trainers that count tokens (SFT, DPO, reward) give throughput
        metrics["train_tokens_per_second"] = tokens / runtime
    metrics |= {name: evaluation[key] for name, key in SUMMARY[stage].items()}
    if stage == "sft":
        metrics["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    if not trainer.is_world_process_zero():
        return metrics
    with atomic_dir(MODELS_DIR / stage) as out:
        final = trainer.model.merge_and_unload() if section.lora else trainer.model
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if stage == "reward_model":
            metrics |= _score_stats(final, tokenizer, data["eval"], out)
    write_json(PLOTS_DIR / f"{stage}.json", _curve(trainer.state.log_history))
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing left to resume
    return metrics


def _last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest `checkpoint-<step>` the Trainer finished writing: a kill in the middle of a
    save leaves one without trainer_state.json, which cannot be resumed from."""
    done = [d for d in checkpoints.glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.rsplit("-", 1)[1]))) if done else None


def _curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The trainer's per-step training logs (loss, learning rate, DPO/SimPO reward margins and
    accuracies, ...) for `dvc plots show`; evaluation and summary entries are left out."""
    return [
        {key: value for key, value in entry.items() if isinstance(value, (int, float))}
        for entry in log_history
        if "loss" in entry and "train_runtime" not in entry
    ]


def _load_start(stage: str, params: Params, model_dtype: torch.dtype) -> tuple[Any, Any]:
    """The model a stage starts from: the base model for sft, the SFT model for the others."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if stage == "sft":
        name, revision = base_model()
    else:
        name, revision = str(MODELS_DIR / "sft"), None
        if not Path(name, "config.json").is_file():
            raise FileNotFoundError(f"{name}: no SFT model (run `dvc repro sft` first)")
    kwargs = {"revision": revision, "trust_remote_code": params.model.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:  # many chat models have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if stage == "reward_model":  # a 1-label sequence classifier on top of the SFT model
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, dtype=model_dtype, **kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=model_dtype, **kwargs)
    return model, tokenizer


def _load_dataset(kind: str) -> Any:
    import datasets

    files = {split: str(PREPARED_DIR / kind / f"{split}.jsonl") for split in ("train", "eval")}
    for path in files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: missing (run `dvc repro prepare` first)")
    return datasets.load_dataset("json", data_files=files)


def _peft_config(lora: LoraConfig | None, stage: str) -> Any:
    if lora is None:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS" if stage == "reward_model" else "CAUSAL_LM",
    )


@torch.no_grad()
def _score_stats(model: Any, tokenizer: Any, eval_data: Any, out: Path) -> dict[str, float]:
    """Score every eval chosen/rejected response as RewardTrainer does (prompt + response +
    EOS); store the mean/std so PPO can normalise scores."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    model.eval()
    texts = []
    for row in eval_data:
        for key in ("chosen", "rejected"):
            example = {"prompt": row["prompt"], "completion": row[key]}
            eos = "" if is_conversational(example) else tokenizer.eos_token  # template adds it
            example = maybe_apply_chat_template(example, tokenizer)
            texts.append(example["prompt"] + example["completion"] + eos)
    scores = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(
            texts[start : start + 64], return_tensors="pt", padding=True, truncation=True
        ).to(model.device)
        scores.append(model(**batch).logits[:, 0].float().cpu())
    all_scores = torch.cat(scores)
    stats = {"reward_mean": all_scores.mean().item(), "reward_std": all_scores.std().item()}
    if not all(math.isfinite(v) for v in stats.values()):
        raise ValueError(f"reward_model: non-finite eval scores {stats} (lower the learning rate)")
    write_json(out / REWARD_STATS, stats)
    return stats
