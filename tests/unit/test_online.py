"""tasks/online.py: the online stages' reward functions. The reward-model reward is the reward
model's score on the text RewardTrainer trains on (recomputed here row by row, unpadded),
normalised like PPO's; the ground-truth reward is the task's scorer; the completions table
records each batch and reaches MLflow every `sample_every` steps."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
from torch.testing import assert_close

from tasks.models import load_scorer
from tasks.online import Completions, reward_functions
from tasks.params import load_params
from tasks.synthetic import ground_truth
from tests.unit.conftest import COMPLETIONS, PROMPTS, STATS


def test_reward_model_reward_is_its_score_on_the_training_text(reward_model) -> None:
    params, tokenizer = reward_model
    table = Completions("grpo", every=1)
    (reward,) = reward_functions("grpo", params, table)
    assert reward.__name__ == "reward_model"  # what TRL logs it as: rewards/reward_model/mean
    eos = tokenizer.eos_token_id
    ids = [tokenizer(c)["input_ids"] for c in COMPLETIONS]
    ended = [True, True, False]  # the last one was cut at the length limit: no EOS
    ids = [[*row, eos] if end else row for row, end in zip(ids, ended, strict=True)]

    got = reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids, trainer_state=None)

    classifier = load_scorer("reward_model", params.model, torch.float32, tokenizer.pad_token_id)
    expected = []
    for prompt, completion, end in zip(PROMPTS, COMPLETIONS, ended, strict=True):
        text = prompt + completion + (tokenizer.eos_token if end else "")
        with torch.no_grad():
            score = classifier(**tokenizer(text, return_tensors="pt")).logits[0, 0]
        expected.append((score.item() - STATS["reward_mean"]) / STATS["reward_std"])
    assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert len(set(got)) == 3  # the head is random: the scores tell the texts apart
    assert table.rows == {"prompt": PROMPTS, "completion": COMPLETIONS, "reward_model": got}


def test_ground_truth_reward_is_the_task_scorer(workdir: Path, make_params) -> None:
    params = load_params(make_params({"grpo.rewards": {"ground_truth": 1.0}}))
    table = Completions("grpo", every=1)
    (reward,) = reward_functions("grpo", params, table)
    assert reward.__name__ == "ground_truth"
    got = reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3)
    assert got == [ground_truth(p, c)["score"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert got == [1.0, 0.5, 0.5]  # right and polite; right and curt; wrong and polite


def test_completions_table_reaches_mlflow_every_sample_every_steps(
    workdir: Path, tmp_path: Path
) -> None:
    from transformers import TrainerControl, TrainerState

    table = Completions("rloo", every=2)
    table.record("reward_model", PROMPTS, COMPLETIONS, [0.1, 0.2, 0.3])
    table.record("ground_truth", PROMPTS, COMPLETIONS, [1.0, 0.5, 0.5])  # the same batch
    with mlflow.start_run() as run:
        for step in (1, 2, 3):
            state = TrainerState(global_step=step, is_world_process_zero=True)
            table.on_step_end(None, state, TrainerControl())
    client = mlflow.MlflowClient()
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "rloo_completions")]
    assert logged == ["rloo_completions/step_00002.json"]
    path = client.download_artifacts(run.info.run_id, logged[0], str(tmp_path))
    saved = json.loads(Path(path).read_text())
    assert saved["columns"] == ["prompt", "completion", "reward_model", "ground_truth", "step"]
    assert saved["data"][0] == [PROMPTS[0], COMPLETIONS[0], 0.1, 1.0, 2]
    table.record("reward_model", PROMPTS[:1], COMPLETIONS[:1], [0.7])  # a new batch
    assert table.rows == {
        "prompt": PROMPTS[:1],
        "completion": COMPLETIONS[:1],
        "reward_model": [0.7],
    }
