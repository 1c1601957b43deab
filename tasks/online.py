"""The online stages (grpo, rloo): their task, and `<stage>.rewards` as TRL reward functions.

- `reward_model`: models/reward_model on the text it was trained on (prompt + completion + EOS
  through the same chat template; TRL hands reward functions the completion decoded without
  special tokens, so the function rebuilds the training text), normalised with its
  reward_stats.json as PPO normalises its scores;
- `ground_truth`: the synthetic task's scorer (`tasks/synthetic.py`), a verifiable reward.

TRL weighs them with `reward_weights` (set from the same mapping) and logs each one's mean as
`rewards/<name>/mean`. `Completions` keeps the last scored batch and logs it to MLflow as a table
every `sample_every` steps: TRL's own completion logs go to wandb/trackio, not MLflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import TrainerCallback

from tasks.heldout import HeldOut, due, evaluate_held_out, held_out
from tasks.models import dtype, load_causal_lm, load_scorer, load_tokenizer
from tasks.params import Params
from tasks.scoring import TokenScorer, score_stats, text_scorer
from tasks.stages import MODELS_DIR, STAGE
from tasks.synthetic import ground_truth
from tasks.tracking_queue import log_table
from tasks.trainers import run_trainer

RewardFunction = Callable[..., list[float]]


@task(cache_policy=NO_CACHE)
def train_online(stage: str, params: Params) -> dict[str, float]:
    """Train an online stage with its TRL trainer, rewarded by `<stage>.rewards` (the weights
    become TRL's `reward_weights`); write `models/<stage>/`; return summary metrics."""
    section = getattr(params, stage)
    table = Completions(stage, section.sample_every)
    every = section.eval_every
    probe = HeldOutEvaluation(params, every, section.eval_prompts) if every else None
    metrics = run_trainer(
        STAGE[stage],
        params,
        config={"reward_weights": list(section.rewards.values())},
        reward_funcs=reward_functions(stage, params, table),
        callbacks=[table, *([probe] if probe else [])],
    )
    if probe is None:
        return metrics
    final = {key.replace("/", "_"): value for key, value in probe.last.items()}
    return metrics | final | {"heldout_s": probe.seconds}


class HeldOutEvaluation(TrainerCallback):
    """Gold, proxy and KL of the policy on the held-out prompts (tasks/heldout.py) before the
    first step, every `every` steps and after the last: MLflow metrics at the step, and rows
    of the trainer's log history (checkpointed with it, so a resumed run keeps them; export
    writes them to plots/<stage>.json). SFT and the reward model are loaded once, frozen."""

    def __init__(self, params: Params, every: int, count: int) -> None:
        self.params, self.every, self.count = params, every, count
        self.held: HeldOut | None = None
        self.tokenizer: Any = None
        self.logged_until = -1
        self.last: dict[str, float] = {}  # the latest evaluation's heldout/* metrics
        self.seconds = 0.0  # what this process's evaluations took

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import mlflow

        from tasks.tracking import logged_until

        dev = kwargs["model"].device
        frozen = dtype(self.params.model.dtype, dev)
        self.tokenizer = load_tokenizer("sft", self.params.model, padding_side="left")
        reference = load_causal_lm("sft", self.params.model, frozen).requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        reward = TokenScorer(load_scorer("reward_model", self.params.model, frozen, pad))
        self.held = held_out(
            self.params,
            self.count,
            args.max_completion_length,
            self.tokenizer,
            reference.eval().to(dev),
            reward.requires_grad_(False).eval().to(dev),
        )
        if state.is_world_process_zero:
            self.logged_until = logged_until(mlflow.active_run().info.run_id)
        if state.global_step == 0:  # a resumed run has this row in its restored history
            self._evaluate(state, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if due(state.global_step, self.every, state.max_steps):
            self._evaluate(state, kwargs["model"])

    def _evaluate(self, state: Any, model: Any) -> None:
        import mlflow

        assert self.held is not None  # loaded by on_train_begin
        began = time.perf_counter()
        self.last = evaluate_held_out(model, self.tokenizer, self.held)
        seconds = time.perf_counter() - began
        self.seconds += seconds
        row = self.last | {"time/heldout_s": seconds}
        state.log_history.append({"step": state.global_step} | row)
        if state.is_world_process_zero and state.global_step > self.logged_until:
            mlflow.log_metrics(row, step=state.global_step)


class Completions(TrainerCallback):
    """The completions of the last scored batch with each reward, as an MLflow table every
    `every` steps (`<stage>_completions/step_<n>.json`), from the main process."""

    def __init__(self, stage: str, every: int) -> None:
        self.stage, self.every = stage, every
        self.rows: dict[str, list[Any]] = {}

    def record(
        self, name: str, prompts: list[Any], completions: list[Any], rewards: list[float]
    ) -> None:
        """One reward function's rewards; a function seen before, or other prompts, start the
        rows of a new batch."""
        if name in self.rows or self.rows.get("prompt") != list(prompts):
            self.rows = {"prompt": list(prompts), "completion": list(completions)}
        self.rows[name] = list(rewards)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every or not state.is_world_process_zero or not self.rows:
            return

        table = {
            key: [v if isinstance(v, (str, float, int)) else json.dumps(v) for v in values]
            for key, values in self.rows.items()
        }
        table["step"] = [state.global_step] * len(table["prompt"])
        name = f"{self.stage}_completions/step_{state.global_step:05d}.json"
        log_table(table, name)


def reward_functions(stage: str, params: Params, table: Completions) -> list[RewardFunction]:
    """One TRL reward function per entry of `<stage>.rewards`, in its order (the order of
    `reward_weights`), each recording its rewards in `table`."""
    made = []
    for name in getattr(params, stage).rewards:
        score = _reward_model(params) if name == "reward_model" else _ground_truth
        made.append(_recorded(name, score, table))
    return made


def _recorded(name: str, score: RewardFunction, table: Completions) -> RewardFunction:
    # TRL calls reward functions with keyword arguments: prompts=, completions=, …
    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = score(prompts, completions, **kwargs)
        table.record(name, prompts, completions, rewards)
        return rewards

    reward.__name__ = name  # TRL names the reward in its logs after the function
    return reward


def _reward_model(params: Params) -> RewardFunction:
    """models/reward_model, frozen, on the text RewardTrainer trained it on (with its own
    tokenizer), normalised."""
    score = text_scorer("reward_model", params)
    mean, std = score_stats(MODELS_DIR / "reward_model")
    stop = {load_tokenizer("reward_model", params.model).eos_token_id}

    def reward_model(
        prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        ended = [bool(ids) and ids[-1] in stop for ids in completion_ids]
        return ((score(prompts, completions, ended) - mean) / max(std, 1e-6)).tolist()

    return reward_model


def _ground_truth(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The synthetic task's score of each completion: 0 to 1 (correct and polite). Params
    refuse it with data that has no ground truth (tasks/params.py)."""
    return [ground_truth(p, c)["score"] for p, c in zip(prompts, completions, strict=True)]
