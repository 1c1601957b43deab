"""The `ppo` stage on a tiny model: one update trains only actor and critic, PPO-ptx changes the
actor's update, the stage writes its outputs and MLflow run, a rerun resumes to the same result as
an uninterrupted run, and a NaN reward stops the run (in-process and through the CLI).

Inputs are built once: `prepare` with the small sizes, then models/sft = a copy of the random base
model and models/reward_model = a 1-label classifier on it (no SFT / reward training)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from flows.infra.testing import SMALL, write_params
from tasks.errors import TrainingDiverged
from tasks.params import load_params
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

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 4
PPO = {
    "ppo.num_iterations": ITERATIONS,
    "ppo.rollout_batch_size": 8,
    "ppo.mini_batch_size": 4,
    "ppo.max_new_tokens": 8,
    "ppo.checkpoint_every": 2,
    "ppo.sample_every": 2,
    "ppo.ptx_batch_size": 4,
    "ppo.eval_every": 3,  # held-out evaluations after 0, 3 and 4 (the last) iterations
    "ppo.eval_prompts": 8,
}
HELDOUT_STEPS = [0, 3, 4]
HELDOUT = ("heldout/proxy", "heldout/gold", "heldout/kl")
OVERRIDES = SMALL | PPO
INPUTS = ("data/prepared", "models/base", "models/sft", "models/reward_model")
PPO_DIRS = ("models", "metrics", "checkpoints/ppo")  # where a write may leave temp entries
# SPEC §5: logged once per iteration (ptx/loss only with ptx_coef > 0)
ITERATION_METRICS = (
    "objective/kl",
    "objective/scores",
    "objective/rlhf_reward",
    "policy/clipfrac",
    "policy/approx_kl",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "val/explained_variance",
    "val/eos_rate",
    "time/rollout_tokens_per_s",
    "time/update_tokens_per_s",
    "time/episodes_per_s",
)
SUMMARY = {
    "score_first_quarter",
    "score_last_quarter",
    "kl_last_quarter",
    "kl_final",
    "eos_rate_final",
    "rollout_tokens_per_second",
    "update_tokens_per_second",
    "episodes_per_second",
    "peak_rss_mb",
    "train_runtime_s",
    "heldout_proxy",
    "heldout_gold",
    "heldout_kl",
    "heldout_s",
}
# Summary values that depend only on the trajectory, not on timing or memory.
TRAJECTORY = (
    "score_first_quarter",
    "score_last_quarter",
    "kl_last_quarter",
    "kl_final",
    "heldout_proxy",
    "heldout_gold",
    "heldout_kl",
)


# ---------------------------------------------------------------- helpers


def runs(root: Path, name: str = "ppo") -> list[Any]:
    return stage_runs(root, name)


def history(root: Path, run: Any, key: str) -> dict[int, float]:
    """{step: value} of a metric logged per iteration."""
    return {m.step: m.value for m in mlflow_client(root).get_metric_history(run.info.run_id, key)}


def copy_inputs(src: Path, dst: Path) -> None:
    for rel in INPUTS:
        shutil.copytree(src / rel, dst / rel)


def build_models(root: Path, nan_reward: bool = False) -> None:
    """models/sft = the base causal LM; models/reward_model = a 1-label classifier on it with a
    random (seeded, large enough to spread the scores) head, its tokenizer and score stats."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, models = root / "models" / "base", root / "models"
    if not nan_reward:
        shutil.copytree(base, models / "sft", dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    reward = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        reward.score.weight.copy_(torch.randn(reward.score.weight.shape, generator=generator))
        if nan_reward:
            reward.score.weight.fill_(float("nan"))
    out = models / "reward_model"
    shutil.rmtree(out, ignore_errors=True)
    reward.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"reward_mean": 0.0, "reward_std": 1.0}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> Path:
    """A directory with data/prepared and models/{base,sft,reward_model}."""
    root = tmp_path_factory.mktemp("ppo-inputs")
    prepare_small(root)
    build_models(root)
    return root


@pytest.fixture(scope="module")
def uninterrupted(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The stage run once, start to end, in its own directory → (directory, returned metrics)."""
    from flows.ppo import ppo

    root = tmp_path_factory.mktemp("ppo-uninterrupted")
    copy_inputs(inputs, root)
    with stage_dir(root, OVERRIDES) as params:
        return root, ppo(params)


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def trainer_state(root: Path) -> dict[str, Any]:
    from tasks.ppo.checkpoint import STATE_FILE

    state = root / "checkpoints" / "ppo" / "state" / STATE_FILE
    return torch.load(state, map_location="cpu", weights_only=True)


def curve(root: Path) -> list[dict[str, float]]:
    """The per-iteration rows of the plots file dvc.yaml declares for `ppo` (CSV or JSON)."""
    from ruamel.yaml import YAML

    stage = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]["ppo"]
    (entry,) = stage["plots"]
    path = root / (entry if isinstance(entry, str) else next(iter(entry)))
    if path.suffix == ".csv":
        with path.open() as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return json.loads(path.read_text())


class Interrupted(RuntimeError):
    """Raised by the patched update task to simulate a killed run."""


# ---------------------------------------------------------------- one update


def test_one_update_trains_actor_and_critic_only(inputs: Path, workdir: Path, make_params):
    from tasks.ppo.run import setup
    from tasks.ppo.train import rollout, update

    copy_inputs(inputs, workdir)
    run = setup(load_params(make_params(OVERRIDES)))
    unwrap = run.accelerator.unwrap_model
    actor, critic = unwrap(run.actor), unwrap(run.critic)
    models = {"actor": actor, "critic": critic, "reference": run.reference, "reward": run.reward}
    before = {name: snapshot(model) for name, model in models.items()}

    # four distinct models; the frozen ones have no gradients and are in no optimizer
    ids = {name: {id(p) for p in model.parameters()} for name, model in models.items()}
    for a in ids:
        for b in ids:
            assert a == b or not ids[a] & ids[b], (a, b)
    optimized = {
        name: {id(p) for group in opt.param_groups for p in group["params"]}
        for name, opt in (("actor", run.actor_optimizer), ("critic", run.critic_optimizer))
    }
    assert optimized["actor"] == ids["actor"]
    assert optimized["critic"] == ids["critic"]
    for frozen in ("reference", "reward"):
        model = models[frozen]
        assert not any(p.requires_grad for p in model.parameters()), frozen
        assert not (ids[frozen] & (optimized["actor"] | optimized["critic"])), frozen
    assert not run.reference.training
    assert not run.reward.classifier.training
    assert all(p.requires_grad for p in actor.parameters())
    assert all(p.requires_grad for p in critic.parameters())

    experience, rollout_stats = rollout.fn(run, 0)
    # the actor starts as the reference (same weights): no KL yet
    assert torch.equal(experience.logprobs, experience.ref_logprobs)
    assert rollout_stats["objective/kl"] == 0.0
    update_stats = update.fn(run, experience, 0)

    stats = rollout_stats | update_stats
    for key in ITERATION_METRICS:
        if key == "time/episodes_per_s":  # added by the loop around the two tasks
            continue
        assert key in stats, key
        assert math.isfinite(stats[key]), key
    assert "ptx/loss" not in update_stats
    # every parameter tensor of the trained models moved (all of them get a gradient: the
    # tied embedding through the LM head, the critic's score head through the value loss) ...
    for name in ("actor", "critic"):
        after = snapshot(models[name])
        assert len(after) > 5
        unchanged = [k for k in after if torch.equal(before[name][k], after[k])]
        assert unchanged == [], (name, unchanged)
    # ... and nothing of the frozen ones: bit-identical, no gradient, no optimizer state
    for name in ("reference", "reward"):
        after = snapshot(models[name])
        assert set(after) == set(before[name])
        assert all(torch.equal(before[name][k], after[k]) for k in after), name
        assert all(p.grad is None for p in models[name].parameters()), name
    optimizer_state = set(run.actor_optimizer.state) | set(run.critic_optimizer.state)
    assert {id(p) for p in optimizer_state} == ids["actor"] | ids["critic"]


# ---------------------------------------------------------------- PPO-ptx


def test_ptx_changes_only_the_actor_update(inputs: Path, workdir: Path, make_params):
    from tasks.ppo.run import setup
    from tasks.ppo.train import _ptx_batch, rollout, update

    copy_inputs(inputs, workdir)
    plain = setup(load_params(make_params(OVERRIDES | {"ppo.ptx_coef": 0.0}, name="plain.yaml")))
    experience, _ = rollout.fn(plain, 0)
    ptx = setup(load_params(make_params(OVERRIDES | {"ppo.ptx_coef": 0.5}, name="ptx.yaml")))
    assert plain.ptx_examples == []
    assert len(ptx.ptx_examples) > 0
    assert all(completion.endswith(ptx.tokenizer.eos_token) for _, completion in ptx.ptx_examples)
    # the LM loss is on SFT completions only: labelled tokens = completion, the rest = prompt
    batch = _ptx_batch(ptx, 0, 0)
    assert batch["input_ids"].shape[0] == 4  # ptx_batch_size
    examples = set(ptx.ptx_examples)
    for ids, attention, labels in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
    ):
        real = attention.bool()
        assert torch.equal(labels[labels != -100], ids[labels != -100])
        prompt = ptx.tokenizer.decode(ids[real & (labels == -100)])
        completion = ptx.tokenizer.decode(ids[labels != -100])
        assert (prompt, completion) in examples, (prompt, completion)

    actors = [ptx.accelerator.unwrap_model(r.actor) for r in (plain, ptx)]
    critics = [ptx.accelerator.unwrap_model(r.critic) for r in (plain, ptx)]
    start = [snapshot(a) for a in actors]
    assert all(torch.equal(start[0][k], start[1][k]) for k in start[0])  # identical start

    stats_plain = update.fn(plain, experience, 0)  # the same experience for both
    stats_ptx = update.fn(ptx, experience, 0)

    assert "ptx/loss" not in stats_plain
    assert math.isfinite(stats_ptx["ptx/loss"])
    assert stats_ptx["ptx/loss"] > 0
    trained = [snapshot(a) for a in actors]
    # the LM loss moved every actor tensor elsewhere
    same = [k for k in trained[0] if torch.allclose(trained[0][k], trained[1][k])]
    assert same == []
    # the critic's update does not see the ptx term: same experience, same critic result
    values = [snapshot(c) for c in critics]
    assert all(torch.allclose(values[0][k], values[1][k], atol=1e-6) for k in values[0])
    assert stats_plain["loss/value"] == pytest.approx(stats_ptx["loss/value"], abs=1e-6)


# ---------------------------------------------------------------- the stage end to end


def test_stage_writes_outputs_and_logs_every_iteration(uninterrupted, tmp_path: Path):
    root, metrics = uninterrupted

    # models/ppo: a causal LM in safetensors with the SFT tokenizer, trained away from SFT
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / "models" / "ppo"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == AutoTokenizer.from_pretrained(root / "models" / "sft").eos_token
    batch = tokenizer(["What is 1 plus 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    sft, ppo = saved_weights(root / "models" / "sft"), saved_weights(out)
    assert set(ppo) == set(sft)
    assert all(not torch.equal(sft[k], ppo[k]) for k in sft)

    # metrics/ppo.json: the summary the flow returned, finite
    written = json.loads((root / "metrics" / "ppo.json").read_text())
    assert set(written) == SUMMARY
    assert written == pytest.approx(metrics)
    assert all(math.isfinite(v) for v in written.values()), written

    # the plots file dvc.yaml declares: one row per iteration, consistent with the summary,
    # held-out gold/proxy/KL in the rows of 0 and 3 iterations done and a row for the last
    everything = curve(root)
    rows = [r for r in everything if "objective/scores" in r]
    assert [int(r["iteration"]) for r in rows] == list(range(ITERATIONS))
    judged = [r for r in everything if "heldout/kl" in r]
    assert [int(r["iteration"]) for r in judged] == HELDOUT_STEPS
    assert all(set(HELDOUT) <= set(r) for r in judged)
    assert all(0.0 <= r["heldout/gold"] <= 1.0 and r["heldout/kl"] >= 0.0 for r in judged)
    assert judged[0]["heldout/kl"] == pytest.approx(0.0, abs=1e-5)  # SFT itself, before training
    assert judged[-1]["heldout/kl"] > 0.0
    for key in HELDOUT:
        assert written[key.replace("/", "_")] == pytest.approx(judged[-1][key], rel=1e-5, abs=1e-6)
    assert set(ITERATION_METRICS) <= set(rows[0])
    assert written["score_first_quarter"] == pytest.approx(
        float(rows[0]["objective/scores"]), rel=1e-5, abs=1e-6
    )
    assert written["kl_final"] == pytest.approx(float(rows[-1]["objective/kl"]), rel=1e-5, abs=1e-6)

    # nothing to resume, no temp dirs
    assert not (root / "checkpoints" / "ppo").exists()
    assert leftovers(root, *PPO_DIRS) == []

    # MLflow: one finished run with every per-iteration metric at steps 0..N-1 and the summary
    (run,) = runs(root)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rlhf.stage"] == "ppo"
    assert run.data.params["ppo.num_iterations"] == str(ITERATIONS)
    for key in ITERATION_METRICS:
        logged = history(root, run, key)
        assert sorted(logged) == list(range(ITERATIONS)), key
        assert all(math.isfinite(v) for v in logged.values()), key
        for step, row in enumerate(rows):
            assert logged[step] == pytest.approx(float(row[key]), rel=1e-5, abs=1e-6), key
    assert {k: run.data.metrics[k] for k in written} == pytest.approx(written)
    for key in HELDOUT:
        logged = history(root, run, key)
        assert sorted(logged) == HELDOUT_STEPS, key
        assert [logged[s] for s in HELDOUT_STEPS] == pytest.approx([r[key] for r in judged]), key

    # sample tables: every sample_every iterations (indices 1 and 3), and the final policy's
    store = mlflow_client(root)
    top = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert "ppo_samples.json" in top
    tables = sorted(a.path for a in store.list_artifacts(run.info.run_id, "ppo_samples"))
    assert tables == ["ppo_samples/iteration_00001.json", "ppo_samples/iteration_00003.json"]
    scores = history(root, run, "objective/scores")
    for path, step in zip(tables, (1, 3), strict=True):
        local = store.download_artifacts(run.info.run_id, path, str(tmp_path))
        table = json.loads(Path(local).read_text())
        assert table["columns"] == ["iteration", "prompt", "response", "score"]
        assert len(table["data"]) == 8  # the whole rollout (8 episodes)
        assert {row[0] for row in table["data"]} == {step}
        # the table holds the rollout's episodes: their mean score is the logged metric
        mean = sum(row[3] for row in table["data"]) / len(table["data"])
        assert mean == pytest.approx(scores[step], rel=1e-5, abs=1e-6)


def test_the_last_held_out_evaluation_judges_the_written_policy(
    uninterrupted, monkeypatch: pytest.MonkeyPatch
):
    """The last held-out row is models/ppo judged afresh against models/sft and the reward
    model: the stage evaluated the policy it wrote, greedy, at its own response length."""
    from tasks.generation import load_policy
    from tasks.heldout import evaluate_held_out, held_out
    from tasks.models import load_scorer
    from tasks.scoring import TokenScorer

    root, metrics = uninterrupted
    monkeypatch.chdir(root)
    params = load_params(write_params(root / "params.yaml", OVERRIDES))
    policy, tokenizer = load_policy("ppo", params)
    reference = load_policy("sft", params)[0]
    reward = load_scorer("reward_model", params.model, torch.float32, tokenizer.pad_token_id)
    held = held_out(params, 8, PPO["ppo.max_new_tokens"], tokenizer, reference, TokenScorer(reward))
    again = evaluate_held_out(policy, tokenizer, held)
    for key in HELDOUT:
        assert again[key] == pytest.approx(metrics[key.replace("/", "_")], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- interrupt and resume


def test_resumed_run_ends_where_an_uninterrupted_run_ends(
    uninterrupted, inputs: Path, workdir: Path, make_params, prefect_server, monkeypatch
):
    import tasks.ppo.train as train
    from flows.ppo import ppo

    reference_root, reference_metrics = uninterrupted
    copy_inputs(inputs, workdir)
    params = load_params(make_params(OVERRIDES))
    real_update = train.update

    def interrupting_update(run: Any, experience: Any, iteration: int) -> dict[str, float]:
        if iteration == 3:
            raise Interrupted("killed during iteration 3")
        return real_update(run, experience, iteration)

    monkeypatch.setattr(train, "update", interrupting_update)
    with pytest.raises(Interrupted):
        ppo(params)
    monkeypatch.setattr(train, "update", real_update)

    # the killed run: the checkpoint of iteration 2, no outputs, a FAILED run
    assert trainer_state(workdir)["iteration"] == 2
    assert len(trainer_state(workdir)["history"]) == 2
    assert not (workdir / "models" / "ppo").exists()
    assert not (workdir / "metrics" / "ppo.json").exists()
    assert leftovers(workdir, *PPO_DIRS) == []
    (failed,) = runs(workdir)
    assert failed.info.status == "FAILED"
    assert sorted(history(workdir, failed, "objective/scores")) == [0, 1, 2]

    with tasks_log() as log:
        metrics = ppo(params)

    assert any("ppo: resuming at iteration 2" in m for m in log), log
    assert not any("discarding" in m for m in log), log
    (resumed,) = runs(workdir)  # the killed run, continued
    assert resumed.info.status == "FINISHED"
    client = mlflow_client(workdir)
    for key in ITERATION_METRICS:  # whole, and iteration 2 (replayed) logged once
        logged = client.get_metric_history(resumed.info.run_id, key)
        assert sorted(m.step for m in logged) == [0, 1, 2, 3], key
    reference_run = runs(reference_root)[0]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value"):
        expected = history(reference_root, reference_run, key)
        got = history(workdir, resumed, key)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), key

    # the same final policy and trajectory as the uninterrupted run
    expected_weights = saved_weights(reference_root / "models" / "ppo")
    got_weights = saved_weights(workdir / "models" / "ppo")
    assert set(got_weights) == set(expected_weights)
    for name, tensor in expected_weights.items():
        assert torch.allclose(got_weights[name], tensor, atol=1e-5), name
    written = json.loads((workdir / "metrics" / "ppo.json").read_text())
    assert written == pytest.approx(metrics)
    assert set(written) == SUMMARY
    for key in TRAJECTORY:
        assert written[key] == pytest.approx(reference_metrics[key], rel=1e-4, abs=1e-5), key
    rows, reference = curve(workdir), curve(reference_root)  # the killed run's history survived
    assert [int(r["iteration"]) for r in rows] == [*range(ITERATIONS), ITERATIONS]
    for key in ("objective/scores", *HELDOUT):
        got, expected = ({r["iteration"]: r[key] for r in c if key in r} for c in (rows, reference))
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), key
    for key in HELDOUT:  # the evaluation at 0 before the kill, 3 and 4 after it, each once
        logged = client.get_metric_history(resumed.info.run_id, key)
        assert sorted(m.step for m in logged) == HELDOUT_STEPS, key
    assert not (workdir / "checkpoints" / "ppo").exists()


# ---------------------------------------------------------------- NaN guard


def test_nan_reward_stops_the_run_and_keeps_the_checkpoint(
    inputs: Path, workdir: Path, make_params, prefect_server, monkeypatch
):
    from flows.ppo import ppo
    from tasks.scoring import TokenScorer

    copy_inputs(inputs, workdir)
    real_forward = TokenScorer.forward
    reward_calls: list[int] = []

    def forward(self: TokenScorer, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_forward(self, *args, **kwargs)
        if self.classifier.training:  # the critic
            return out
        reward_calls.append(1)  # the frozen reward model: one call per rollout
        return torch.full_like(out, float("nan")) if len(reward_calls) == 4 else out

    monkeypatch.setattr(TokenScorer, "forward", forward)
    # without held-out evaluations, whose proxy scores are reward-model calls too
    with pytest.raises(TrainingDiverged, match=r"^ppo: iteration 3: .*reward") as caught:
        ppo(load_params(make_params(OVERRIDES | {"ppo.eval_every": None})))
    assert "checkpoints/ppo" in str(caught.value)
    assert len(reward_calls) == 4

    assert trainer_state(workdir)["iteration"] == 2  # the last good checkpoint stays
    assert (workdir / "checkpoints" / "ppo" / "state" / "model.safetensors").is_file()  # actor
    assert not (workdir / "models" / "ppo").exists()
    assert not (workdir / "metrics" / "ppo.json").exists()
    assert leftovers(workdir, *PPO_DIRS) == []
    (run,) = runs(workdir)
    assert run.info.status == "FAILED"
    assert sorted(history(workdir, run, "objective/scores")) == [0, 1, 2]


@pytest.mark.parametrize(
    ("loss", "what", "guarded"),
    [("policy_loss", "actor loss", "actor"), ("value_loss", "critic loss", "critic")],
)
def test_nan_loss_stops_before_the_optimizer_step(
    inputs: Path, workdir: Path, make_params, monkeypatch, loss: str, what: str, guarded: str
):
    import tasks.ppo.train as train
    from tasks.ppo.run import setup

    copy_inputs(inputs, workdir)
    run = setup(load_params(make_params(OVERRIDES)))
    experience, _ = train.rollout.fn(run, 1)
    model = run.accelerator.unwrap_model(getattr(run, guarded))
    before = snapshot(model)
    real_loss = getattr(train, loss)

    def nan_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value, stats = real_loss(*args, **kwargs)
        return value * float("nan"), stats

    monkeypatch.setattr(train, loss, nan_loss)
    with pytest.raises(
        TrainingDiverged,
        match=rf"^ppo: iteration 1: non-finite {what}; no checkpoint was written yet",
    ):
        train.update.fn(run, experience, 1)
    after = snapshot(model)  # the guard fired before the first step: the weights are untouched
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert all(torch.isfinite(p).all() for p in after.values())


def test_cli_nan_reward_model_is_one_error_line(
    inputs: Path, workdir: Path, make_params, prefect_server
):
    """`rlhf stage ppo` (what dvc runs) with NaN reward weights: exit 1, one line, no traceback."""
    copy_inputs(inputs, workdir)
    build_models(workdir, nan_reward=True)
    params = make_params(OVERRIDES)
    done = run_cli("stage", "ppo", "--params", str(params), cwd=workdir)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("rlhf: error: ppo: iteration 0: "), errors[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (workdir / "models" / "ppo").exists()
    assert not (workdir / "metrics" / "ppo.json").exists()
    (run,) = runs(workdir)
    assert run.info.status == "FAILED"
