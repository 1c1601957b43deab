"""What the online stages (grpo, rloo) add to the TRL stages of test_trl_stages.py: the
verifiable reward trains end to end, a bad setting stops `rlhf stage` in one line before anything
starts, and an interrupted run resumes from its checkpoint in the next.

Inputs are built once: `prepare` with the small sizes, models/sft = the random base model,
models/reward_model = a 1-label classifier on it (tests/integration/test_ppo_stage.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.infra.cli import stage_flow
from flows.infra.testing import SMALL
from tasks.params import load_params
from tasks.synthetic import ground_truth
from tests.conftest import leftovers, mlflow_client, prepare_small, run_cli, stage_runs, tasks_log
from tests.integration.test_ppo_stage import build_models
from tests.integration.test_trl_stages import (
    Interrupted,
    artifact_json,
    checkpoint_saves,
    steps,
    unchanged,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

INPUTS = ("data/prepared", "models/base", "models/sft", "models/reward_model")
FEW = {  # 2 prompts × 4 completions per step, a checkpoint every 2 of 4 steps
    "max_steps": 4,
    "logging_steps": 1,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "save_strategy": "steps",
    "save_steps": 2,
}


def overrides(stage: str, **extra: Any) -> dict[str, Any]:
    return SMALL | {f"{stage}.trainer.{k}": v for k, v in FEW.items()} | extra


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> Path:
    root = tmp_path_factory.mktemp("online-inputs")
    prepare_small(root)
    build_models(root)
    return root


def copy_inputs(src: Path, dst: Path, *extra: str) -> None:
    for rel in (*INPUTS, *extra):
        shutil.copytree(src / rel, dst / rel)


def test_grpo_trains_on_the_ground_truth_alone(
    inputs: Path, workdir: Path, make_params, tmp_path: Path
):
    """`rewards: {ground_truth: 1.0}` (RLVR): the only reward TRL logs is the task's scorer —
    each logged completion's reward is `ground_truth(prompt, completion)` and each step's logged
    mean is theirs — and the policy's weights moved from SFT's."""
    copy_inputs(inputs, workdir)
    sft = weights(workdir / "models" / "sft")
    rewards = {"grpo.rewards": {"ground_truth": 1.0}, "grpo.sample_every": 2}
    params = load_params(make_params(overrides("grpo", **rewards)))
    metrics = stage_flow("grpo")(params)
    assert 0.0 <= metrics["eval_rewards/ground_truth"] <= 1.0
    assert "eval_rewards/reward_model" not in metrics
    (run,) = stage_runs(workdir, "grpo")
    assert steps(workdir, run, "rewards/ground_truth/mean") == [1, 2, 3, 4]
    assert not steps(workdir, run, "rewards/reward_model/mean")
    client = mlflow_client(workdir)
    logged = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("rewards/ground_truth/mean", "reward")
    }
    for step in (2, 4):  # the steps with a completions table (sample_every)
        table = artifact_json(workdir, run, f"grpo_completions/step_0000{step}.json", tmp_path)
        assert table["columns"] == ["prompt", "completion", "ground_truth", "step"]
        given = [row[2] for row in table["data"]]
        assert given == [ground_truth(row[0], row[1])["score"] for row in table["data"]]
        mean = sum(given) / len(given)
        assert logged["rewards/ground_truth/mean"][step] == pytest.approx(mean, abs=1e-6)
        assert logged["reward"][step] == pytest.approx(mean, abs=1e-6)  # its weight is 1
        assert 0 < mean < 1  # the random SFT model hits a few sums: a signal to learn from
    still = unchanged(sft, weights(workdir / "models" / "grpo"))
    assert not still, f"GRPO did not move {still}"


@pytest.mark.parametrize(
    ("stage", "setting", "key"),
    [
        ("grpo", {"grpo.trainer.num_generations": 1}, "grpo.trainer.num_generations"),
        ("rloo", {"rloo.trainer.generation_batch_size": 12}, "rloo.trainer.generation_batch_size"),
        ("rloo", {"rloo.trainer.num_generations": 3}, "rloo.trainer.num_generations"),
        ("grpo", {"grpo.rewards": {"reward_modle": 1.0}}, "grpo.rewards.reward_modle"),
        ("rloo", {"rloo.rewards": {"reward_model": -1.0}}, "rloo.rewards.reward_model"),
    ],
)
def test_bad_setting_is_one_line_and_leaves_nothing(
    inputs: Path, workdir: Path, make_params, stage: str, setting: dict, key: str
):
    copy_inputs(inputs, workdir)
    bad = make_params(overrides(stage) | setting)
    done = run_cli("stage", stage, "--params", str(bad), cwd=workdir)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"rlhf: error: {bad}:") and f" {key}: " in lines[0], lines[0]
    for path in (f"models/{stage}", f"checkpoints/{stage}", f"metrics/{stage}.json"):
        assert not (workdir / path).exists(), path
    assert stage_runs(workdir) == []


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_interrupted_run_resumes_from_its_checkpoint(
    inputs: Path, workdir: Path, make_params, stage: str
):
    held_out = {f"{stage}.eval_every": 2, f"{stage}.eval_prompts": 8}  # after 0, 2 and 4 steps
    params = load_params(make_params(overrides(stage, **held_out)))
    copy_inputs(inputs, workdir)
    with checkpoint_saves(interrupt=True) as saved, pytest.raises(Interrupted):
        stage_flow(stage)(params)
    assert saved == [2]
    assert (workdir / "checkpoints" / stage / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (workdir / "models" / stage).exists()

    with checkpoint_saves() as saved, tasks_log() as log:
        metrics = stage_flow(stage)(params)
    assert any(f"resuming from checkpoints/{stage}/checkpoint-2" in m for m in log), log
    assert saved == [4]
    (run,) = stage_runs(workdir, stage)  # the interrupted run, continued
    assert run.info.status == "FINISHED"
    assert steps(workdir, run, "reward") == [1, 2, 3, 4]  # whole, no step twice
    # held-out gold, proxy and KL: 0 and 2 before the kill (kept in the checkpoint), 4 after
    rows = json.loads((workdir / "plots" / f"{stage}.json").read_text())
    judged = [r for r in rows if "heldout/kl" in r]
    assert [r["step"] for r in judged] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert judged[0]["heldout/kl"] == pytest.approx(0.0, abs=1e-5)  # SFT, before any step
    assert all(0.0 <= r["heldout/gold"] <= 1.0 for r in judged)
    client = mlflow_client(workdir)
    for key in ("heldout/proxy", "heldout/gold", "heldout/kl"):
        assert steps(workdir, run, key) == [0, 2, 4], key
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert [logged[r["step"]] for r in judged] == pytest.approx([r[key] for r in judged])
        assert metrics[key.replace("/", "_")] == pytest.approx(judged[-1][key])
    assert (workdir / "models" / stage / "model.safetensors").is_file()
    assert not (workdir / "checkpoints" / stage).exists()
    assert leftovers(workdir, "models", "metrics") == []
