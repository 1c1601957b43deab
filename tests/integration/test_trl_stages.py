"""The TRL stages (the registry's TRL_STAGES) end to end on a tiny model: weights move, the
MLflow run holds the trainer's per-step metrics, outputs reload, checkpoints resume or go.

One module-scoped `prepare` and one run of each stage are shared by the stage tests; the resume
tests copy the prepared data into their own directory."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.infra.cli import stage_flow
from flows.infra.testing import SMALL
from tasks.params import load_params
from tasks.scoring import REWARD_STATS
from tasks.stages import STAGE, TRL_STAGES
from tests.conftest import (
    leftovers,
    mlflow_client,
    prepare_small,
    run_cli,
    stage_dir,
    stage_runs,
    tasks_log,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

POLICIES = tuple(name for name in TRL_STAGES if STAGE[name].policy)  # these log samples
STEPS = 4
TRAINER = {
    "max_steps": STEPS,
    "logging_steps": 1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
}
ONLINE = tuple(name for name in TRL_STAGES if STAGE[name].online)
TRAIN = (
    SMALL
    | {f"{s}.trainer.{k}": v for s in TRL_STAGES for k, v in TRAINER.items()}
    # 2 prompts × 4 completions per step; a completions table every 2 steps
    | {f"{s}.trainer.num_generations": 4 for s in ONLINE}
    | {f"{s}.sample_every": 2 for s in ONLINE}
)
# Expected keys of metrics/<stage>.json besides the spec's summary: what `train` adds per stage
# (test_every_trl_stage_has_expectations: one entry per TRL stage).
# The last held-out evaluation (tasks/heldout.py, on by default) and what they all took.
HELDOUT_KEYS = ("heldout_proxy", "heldout_gold", "heldout_kl", "heldout_s")
EXTRA_KEYS = {
    "sft": {"eval_perplexity", "train_tokens_per_second"},
    "reward_model": {"reward_mean", "reward_std", "train_tokens_per_second"},
    "dpo": {"train_tokens_per_second"},
    "simpo": set(),  # CPOTrainer counts no tokens: no throughput
    "grpo": {"train_tokens_per_second", "eval_rewards/reward_model", *HELDOUT_KEYS},
    "rloo": {"train_tokens_per_second", "eval_rewards/reward_model", *HELDOUT_KEYS},
}
ONLINE_STEP_KEYS = {"loss", "learning_rate", "grad_norm", "reward", "reward_std", "kl"}
# Per-step metrics the trainer's MLflow callback logs (at steps 1..STEPS into the stage's run).
STEP_KEYS = {
    "sft": {"loss", "learning_rate", "grad_norm"},
    "reward_model": {"loss", "learning_rate", "grad_norm"},
    "dpo": {"loss", "learning_rate", "grad_norm", "rewards/margins"},
    "simpo": {"loss", "learning_rate", "grad_norm", "rewards/margins"},
    "grpo": ONLINE_STEP_KEYS | {"rewards/reward_model/mean", "completions/mean_length"},
    "rloo": ONLINE_STEP_KEYS | {"rewards/reward_model/mean", "completions/mean_length"},
}
# Resume: a checkpoint every 2 steps out of 6.
RESUME = SMALL | {
    "sft.trainer.max_steps": 6,
    "sft.trainer.save_strategy": "steps",
    "sft.trainer.save_steps": 2,
    "sft.trainer.logging_steps": 1,
    "sft.trainer.per_device_train_batch_size": 8,
    "sft.trainer.per_device_eval_batch_size": 32,
}


# ---------------------------------------------------------------- helpers


def runs(root: Path, name: str | None = None) -> list[Any]:
    return stage_runs(root, name)


def steps(root: Path, run: Any, key: str = "loss") -> list[int]:
    """Steps at which `key` was logged in `run`, ascending."""
    return sorted(m.step for m in mlflow_client(root).get_metric_history(run.info.run_id, key))


def artifact_json(root: Path, run: Any, name: str, dst: Path) -> Any:
    path = mlflow_client(root).download_artifacts(run.info.run_id, name, str(dst))
    return json.loads(Path(path).read_text())


def weights(path: Path, head: bool = False) -> dict[str, Any]:
    """Trainable parameters of the model saved at `path` (a 1-label classifier when `head`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def unchanged(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    import torch

    return [name for name in before if torch.equal(before[name], after[name])]


def copy_inputs(src: Path, dst: Path, *paths: str) -> None:
    for rel in paths:
        shutil.copytree(src / rel, dst / rel)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> Path:
    """A directory where `prepare` ran with the small sizes (its own MLflow store)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare_small(root)
    return root


@pytest.fixture(scope="module")
def trained(
    prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Every TRL stage in pipeline order (sft, then those that start from it), each for a few
    steps, in one directory. → (directory, {stage: returned metrics})"""
    root = tmp_path_factory.mktemp("trained")
    copy_inputs(prepared, root, "data/prepared", "models/base")
    with stage_dir(root, TRAIN) as params:
        return root, {stage: stage_flow(stage)(params) for stage in TRL_STAGES}


class Interrupted(RuntimeError):
    """Raised by the patched trainer right after its first checkpoint."""


@contextlib.contextmanager
def checkpoint_saves(interrupt: bool = False) -> Iterator[list[int]]:
    """Record the global step of every checkpoint the trainers save; with `interrupt`, raise
    `Interrupted` right after the first one is complete (model, optimizer, trainer state)."""
    from transformers import Trainer

    original = Trainer._save_checkpoint
    saved: list[int] = []

    def save(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        saved.append(self.state.global_step)
        if interrupt:
            raise Interrupted(f"interrupted after checkpoint-{self.state.global_step}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save)
        yield saved


# ---------------------------------------------------------------- each stage end to end


def test_every_trl_stage_has_expectations():
    assert set(EXTRA_KEYS) == set(STEP_KEYS) == set(TRL_STAGES)


@pytest.mark.parametrize("stage", TRL_STAGES)
def test_stage_trains_saves_and_logs(trained, stage: str, tmp_path: Path):
    root, results = trained
    out = root / "models" / stage
    is_reward = STAGE[stage].head == "scorer"

    # every trainable parameter moved away from the starting model
    start = root / "models" / STAGE[stage].start
    before, after = weights(start), weights(out, head=is_reward)
    if is_reward:  # a new 1-output score head on the SFT backbone (the LM head is dropped)
        assert after["score.weight"].shape == (1, before["model.embed_tokens.weight"].shape[1])
        before = {name: w for name, w in before.items() if name.startswith("model.")}
        assert set(before) == {name for name in after if name != "score.weight"}
    else:
        assert set(after) == set(before)
    assert len(before) > 5
    assert unchanged(before, after) == []

    # the saved model: safetensors, reloads with its tokenizer and runs
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("pytorch_model*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is not None
    texts = ["What is 1 plus 2?", "What is 3 minus 1? Please answer."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    if is_reward:
        model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
        assert model.config.num_labels == 1
        assert model.config.pad_token_id == tokenizer.pad_token_id
        expected_shape: tuple[int, ...] = (2, 1)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
        expected_shape = (*batch["input_ids"].shape, model.config.vocab_size)
    with torch.no_grad():
        logits = model(**batch).logits
    assert tuple(logits.shape) == expected_shape
    assert torch.isfinite(logits).all()
    if is_reward:  # score statistics for PPO's normalisation
        stats = json.loads((out / REWARD_STATS).read_text())
        assert set(stats) == {"reward_mean", "reward_std"}
        assert all(math.isfinite(v) for v in stats.values())
        assert stats["reward_std"] > 0
        assert stats == pytest.approx({k: results[stage][k] for k in stats})

    # metrics/<stage>.json: what the flow returned, the expected keys, finite numbers
    metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
    assert metrics == pytest.approx(results[stage])
    assert (
        set(metrics)
        == {"train_loss", "train_runtime_s"} | set(STAGE[stage].summary) | EXTRA_KEYS[stage]
    )
    assert all(math.isfinite(v) for v in metrics.values()), metrics

    # nothing left to resume, no temp dirs
    assert not (root / "checkpoints" / stage).exists()
    assert leftovers(root, "models", "metrics") == []

    # MLflow: one finished run named after the stage (the trainer opened none of its own),
    # holding the trainer's per-step metrics and the summary
    assert sorted(r.info.run_name for r in runs(root)) == sorted(TRL_STAGES)
    (run,) = runs(root, stage)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rlhf.stage"] == stage
    assert run.data.params[f"{stage}.trainer.max_steps"] == str(STEPS)
    for key in STEP_KEYS[stage]:
        assert steps(root, run, key) == list(range(1, STEPS + 1)), key
    logged = run.data.metrics
    assert {k: logged[k] for k in metrics} == pytest.approx(metrics)
    for key in STAGE[
        stage
    ].summary.values():  # the trainer's own final evaluation, at its last step
        assert steps(root, run, key)[-1] == STEPS, key

    # artifacts: the resolved TRL config; a samples table for a policy
    artifacts = {a.path for a in mlflow_client(root).list_artifacts(run.info.run_id)}
    assert f"{stage}_trl_config.json" in artifacts
    config = artifact_json(root, run, f"{stage}_trl_config.json", tmp_path)
    assert config["output_dir"] == f"checkpoints/{stage}"
    assert config["run_name"] == stage
    assert config["max_steps"] == STEPS
    assert config["report_to"] == ["mlflow"]
    assert config["seed"] == 42
    if stage == "simpo":
        assert (config["loss_type"], config["cpo_alpha"]) == ("simpo", 0.0)
    if stage in ONLINE:  # the weights of `rewards`, a completions table every sample_every
        assert config["reward_weights"] == [1.0]
        assert config["num_generations"] == 4
        tables = [
            a.path
            for a in mlflow_client(root).list_artifacts(run.info.run_id, f"{stage}_completions")
        ]
        assert tables == [f"{stage}_completions/step_0000{n}.json" for n in (2, 4)]
        table = artifact_json(root, run, tables[-1], tmp_path)
        assert table["columns"] == ["prompt", "completion", "reward_model", "step"]
        assert len(table["data"]) == 8  # the step's 2 prompts × 4 completions
        assert {row[-1] for row in table["data"]} == {STEPS}
    if stage in POLICIES:
        assert f"{stage}_samples.json" in artifacts
        table = artifact_json(root, run, f"{stage}_samples.json", tmp_path)
        assert table["columns"] == ["prompt", "response"]
        prompts = (root / "data" / "prepared" / "prompts" / "eval.jsonl").read_text().splitlines()
        assert len(table["data"]) == min(8, len(prompts)) > 0
        assert all(isinstance(response, str) for _, response in table["data"])
    else:
        assert not any(name.endswith("_samples.json") for name in artifacts)


# ---------------------------------------------------------------- SimPO config validation


def test_simpo_stage_rejects_cpo_alpha_before_training(
    trained, workdir: Path, make_params, prefect_server
):
    """`rlhf stage simpo` with cpo_alpha ≠ 0 (CPO-SimPO) stops at load time in one line."""

    root, _ = trained
    copy_inputs(root, workdir, "data/prepared", "models/base", "models/sft")
    params = make_params(TRAIN | {"simpo.trainer.cpo_alpha": 0.5})
    done = run_cli("stage", "simpo", "--params", str(params), cwd=workdir)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"rlhf: error: {params}:"), lines[0]
    assert "simpo.trainer.cpo_alpha" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    for path in ("models/simpo", "checkpoints/simpo", "metrics/simpo.json"):
        assert not (workdir / path).exists(), path
    assert runs(workdir, "simpo") == []


# ---------------------------------------------------------------- interrupt and resume


@pytest.fixture(scope="module")
def interrupted(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `sft` (6 steps, a checkpoint every 2) was interrupted right after
    saving checkpoint-2."""
    root = tmp_path_factory.mktemp("interrupted")
    copy_inputs(prepared, root, "data/prepared", "models/base")
    with (
        stage_dir(root, RESUME) as params,
        checkpoint_saves(interrupt=True) as saved,
        pytest.raises(Interrupted),
    ):
        stage_flow("sft")(params)
    assert saved == [2]
    return root


def resume_in(workdir: Path, interrupted: Path) -> None:
    """Put the interrupted directory's inputs and checkpoints into `workdir`."""
    copy_inputs(interrupted, workdir, "data/prepared", "models/base", "checkpoints/sft")


def test_interrupted_stage_leaves_a_checkpoint_and_a_failed_run(interrupted: Path):
    checkpoints = interrupted / "checkpoints" / "sft"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (checkpoints / "checkpoint-2" / "model.safetensors").is_file()
    assert (checkpoints / "params.json").is_file()
    assert not (interrupted / "models" / "sft").exists()
    assert not (interrupted / "metrics" / "sft.json").exists()
    assert leftovers(interrupted, "models", "metrics") == []
    (run,) = runs(interrupted, "sft")
    assert run.info.status == "FAILED"
    assert steps(interrupted, run) == [1, 2]


def test_rerun_resumes_from_the_checkpoint(
    interrupted: Path, workdir: Path, make_params, prefect_server
):
    resume_in(workdir, interrupted)
    params = load_params(make_params(RESUME))
    with checkpoint_saves() as saved, tasks_log() as log:
        metrics = stage_flow("sft")(params)

    assert any("resuming from checkpoints/sft/checkpoint-2" in m for m in log), log
    assert not any("discarding" in m for m in log), log
    assert saved == [4, 6]  # continued from step 2 up to max_steps
    (run,) = runs(workdir, "sft")
    assert run.info.status == "FINISHED"
    assert steps(workdir, run) == [3, 4, 5, 6]  # no step of the interrupted run is redone
    assert steps(workdir, run, "train_loss")[-1] == 6
    assert (workdir / "models" / "sft" / "model.safetensors").is_file()
    assert json.loads((workdir / "metrics" / "sft.json").read_text()) == pytest.approx(metrics)
    assert not (workdir / "checkpoints" / "sft").exists()


def test_checkpoint_of_other_params_is_discarded(
    interrupted: Path, workdir: Path, make_params, prefect_server
):
    resume_in(workdir, interrupted)
    params = load_params(make_params(RESUME | {"sft.trainer.learning_rate": 1.0e-3}))
    with checkpoint_saves() as saved, tasks_log() as log:
        stage_flow("sft")(params)

    assert any("discarding checkpoints of other params or inputs" in m for m in log), log
    assert not any("resuming" in m for m in log), log
    assert saved == [2, 4, 6]  # trained from step 0
    (run,) = runs(workdir, "sft")
    assert run.info.status == "FINISHED"
    assert steps(workdir, run) == [1, 2, 3, 4, 5, 6]
    assert (workdir / "models" / "sft" / "model.safetensors").is_file()
    assert not (workdir / "checkpoints" / "sft").exists()
