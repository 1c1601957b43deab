"""The TRL stages (kind `trl` in tasks/stages.py) as one task: build the trainer, fit, export.

TRL does the training; this module wires it to the pipeline from the stage's spec: the start
model with its head, the prepared dataset, the stage's `trainer:` params as the TRL config (plus
what the pipeline owns: output dir, run name, seed, precision, MLflow). The trainer's own MLflow
callback logs per-step metrics into the run the flow opened; intermediate checkpoints live in
`checkpoints/<stage>/` (outside DVC's outs) so a killed stage resumes; the final model is
written atomically to `models/<stage>/` in safetensors.
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
from transformers import TrainerCallback

from tasks.catalog import record_run
from tasks.errors import MissingInput, ParamsError, TrainingDiverged, stop_if_signalled
from tasks.io import atomic_dir, damaged, resumable_dir, write_json
from tasks.models import device, dtype, load_causal_lm, load_scorer, load_tokenizer, lora_config
from tasks.params import Params, trl_config_class
from tasks.scoring import REWARD_STATS, reward_texts, score_texts
from tasks.stages import CHECKPOINTS_DIR, MODELS_DIR, PLOTS_DIR, PREPARED_DIR, STAGE, StageSpec
from tasks.tracking import logged_until
from tasks.tracking_queue import log_dict

log = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE)
def train(stage: str, params: Params) -> dict[str, float]:
    """Train `stage` with its TRL trainer; write `models/<stage>/`; return summary metrics."""
    return run_trainer(STAGE[stage], params)


def run_trainer(
    spec: StageSpec, params: Params, config: dict[str, Any] | None = None, **trainer_kwargs: Any
) -> dict[str, float]:
    """Build, fit, export; `config`: TRL config fields and `trainer_kwargs`: trainer arguments
    the caller owns (the online stages' reward weights and reward functions)."""
    trainer = build(spec, params, config or {}, trainer_kwargs)
    metrics = fit(spec, trainer)
    if trainer.is_world_process_zero():  # under `accelerate launch`, rank 0 tracks and writes
        metrics |= export(spec, trainer)
    return metrics


def build(
    spec: StageSpec, params: Params, config: dict[str, Any], trainer_kwargs: dict[str, Any]
) -> Any:
    """The stage's TRL trainer on its start model and dataset, its checkpoints directory kept
    only if it was written with the same params and inputs."""
    from transformers import set_seed

    section = getattr(params, spec.name)
    set_seed(params.common.seed)
    dev = device(params.common.device)
    model_dtype = dtype(params.model.dtype, dev)
    start = str(spec.start)
    tokenizer = load_tokenizer(start, params.model)
    if spec.head == "scorer":
        model = load_scorer(start, params.model, model_dtype, tokenizer.pad_token_id)
    else:
        model = load_causal_lm(start, params.model, model_dtype)
    checkpoints = CHECKPOINTS_DIR / spec.name
    owned = {"output_dir": str(checkpoints), "run_name": spec.name, "seed": params.common.seed}
    args = _trl_config(spec, section.trainer | owned | config, model_dtype, dev)
    resumable_dir(checkpoints, params, spec.name, [Path(p) for p in spec.inputs])
    data = _load_dataset(str(spec.dataset))
    module, name = str(spec.trainer).split(":")
    trainer = getattr(importlib.import_module(module), name)(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        peft_config=lora_config(section.lora, spec.head),
        **trainer_kwargs,
    )
    trainer.add_callback(_StopWhenSignalled())
    if trainer.is_world_process_zero():
        log_dict(args.to_dict(), f"{spec.name}_trl_config.json")
        if (until := logged_until(mlflow.active_run().info.run_id)) >= 0:  # a resumed run
            trainer.callback_handler.callbacks.insert(0, _SkipLogged(until))
    return trainer


class _StopWhenSignalled(TrainerCallback):
    """A SIGTERM stops training even if code the handler interrupted swallowed its exception."""

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        stop_if_signalled()


class _SkipLogged(TrainerCallback):
    """First in line, it empties the logs of the steps a resumed run logged before its kill, so
    the MLflow callback after it does not log them twice (the trainer's history keeps them).
    The end-of-training summary is left alone: it is the dict `train()` returns."""

    def __init__(self, until: int) -> None:
        self.until = until

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and state.global_step <= self.until and "train_runtime" not in logs:
            logs.clear()


def fit(spec: StageSpec, trainer: Any) -> dict[str, float]:
    """Train (resuming from the newest complete checkpoint), evaluate; the summary metrics."""
    resume = _newest_checkpoint(spec.name, Path(trainer.args.output_dir))
    if resume:
        log.info("%s: resuming from %s", spec.name, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    evaluation = trainer.evaluate()
    runtime = result.metrics["train_runtime"]
    tokens = max((entry.get("num_tokens", 0) for entry in trainer.state.log_history), default=0)
    metrics = {"train_loss": result.training_loss, "train_runtime_s": runtime}
    if tokens and runtime:  # trainers that count tokens (SFT, DPO, reward) give throughput
        metrics["train_tokens_per_second"] = tokens / runtime
    metrics |= {name: evaluation[key] for name, key in spec.summary.items()}
    for key, value in evaluation.items():  # an online stage's rewards, each on its own
        if key.startswith("eval_rewards/") and key.endswith("/mean"):
            metrics[key.removesuffix("/mean")] = value
    if "eval_loss" in spec.summary:  # a language-modelling loss: its perplexity too
        metrics["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    return metrics


def _newest_checkpoint(stage: str, checkpoints: Path) -> str | None:
    """The newest whole `checkpoint-N`; newer damaged ones (a kill mid-save, a truncated file)
    are deleted with a warning, so the trainer never starts loading what it cannot finish."""
    steps = sorted(checkpoints.glob("checkpoint-*"), key=lambda d: -int(d.name.rsplit("-", 1)[1]))
    for candidate in steps:
        problem = damaged(candidate, ("trainer_state.json", "optimizer.pt", "*.safetensors"))
        if problem is None:
            return str(candidate)
        log.warning("%s: discarding damaged checkpoint %s (%s)", stage, candidate, problem)
        shutil.rmtree(candidate, ignore_errors=True)
    return None


def export(spec: StageSpec, trainer: Any) -> dict[str, float]:
    """`models/<stage>/` (LoRA merged, with the tokenizer; a scorer also with its score
    statistics), `plots/<stage>.json`; the checkpoints go. Metrics of the export."""
    metrics: dict[str, float] = {}
    with atomic_dir(MODELS_DIR / spec.name) as out:
        final = trainer.model
        if hasattr(final, "merge_and_unload"):  # trained with LoRA
            final = final.merge_and_unload()
        final.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        record_run(out)
        if spec.head == "scorer":
            eval_data = _load_dataset(str(spec.dataset))["eval"]
            metrics = _score_stats(final, trainer.processing_class, eval_data)
            write_json(out / REWARD_STATS, metrics)
    write_json(PLOTS_DIR / f"{spec.name}.json", _curve(trainer.state.log_history))
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # finished: nothing to resume
    return metrics


def _trl_config(
    spec: StageSpec, fields: dict[str, Any], model_dtype: torch.dtype, dev: torch.device
) -> Any:
    """The stage's TRL config: its `trainer:` params and the fields the pipeline owns (output
    dir, run name, seed, reward weights), MLflow reporting and the precision of the device."""
    try:
        return trl_config_class(spec.name)(
            **fields,
            report_to=["mlflow"],
            use_cpu=dev.type == "cpu",
            bf16=model_dtype == torch.bfloat16,
            fp16=model_dtype == torch.float16,
        )
    except ValueError as exc:  # the TRL config's own cross-field checks
        key = f"{spec.name}.trainer"
        raise ParamsError(f"{key}: {str(exc).strip().splitlines()[0]}", key=key) from None


def _curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The trainer's per-step training logs (loss, learning rate, DPO/SimPO reward margins and
    accuracies, ...) and the online stages' held-out rows (tasks/heldout.py) for `dvc plots
    show`; evaluation and summary entries are left out."""
    return [
        {key: value for key, value in entry.items() if isinstance(value, (int, float))}
        for entry in log_history
        if ("loss" in entry or "heldout/kl" in entry) and "train_runtime" not in entry
    ]


def _load_dataset(kind: str) -> Any:
    """data/prepared/<kind>/{train,eval}.jsonl as a DatasetDict."""
    import datasets

    files = {split: str(PREPARED_DIR / kind / f"{split}.jsonl") for split in ("train", "eval")}
    for path in files.values():
        if not Path(path).is_file():
            raise MissingInput(f"{path}: missing; run `dvc repro prepare`")
    return datasets.load_dataset("json", data_files=files)


def _score_stats(model: Any, tokenizer: Any, eval_data: Any) -> dict[str, float]:
    """Mean/std of the scores of every eval chosen and rejected response, scored on the text
    RewardTrainer trains on, so PPO and the online stages can normalise scores."""
    model.eval()
    prompts = [row["prompt"] for row in eval_data for _ in range(2)]
    responses = [row[key] for row in eval_data for key in ("chosen", "rejected")]
    scores = score_texts(model, tokenizer, reward_texts(prompts, responses, tokenizer))
    stats = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item()}
    if not all(math.isfinite(v) for v in stats.values()):
        raise TrainingDiverged(
            f"reward_model: non-finite eval scores {stats} (lower the learning rate)"
        )
    return stats
