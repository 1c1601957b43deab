"""PPO with `ppo.lora` holds two base models, not four: the reference is the actor with its
adapter disabled, the reward model the critic with its adapter disabled. Compared on the tiny
model with the two-copy path (separate frozen copies of models/sft and models/reward_model, as
full fine-tuning loads them): the same experience (log-probs, reference log-probs, values,
scores) and the same update, also after the adapters have moved away from their bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tasks.params import load_params
from tests.integration.test_ppo_stage import OVERRIDES, copy_inputs, inputs  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

LORA = {"ppo.lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}
EXPERIENCE = ("sequences", "logprobs", "ref_logprobs", "values", "raw_scores", "scores")
EXPERIENCE += ("rewards", "advantages", "returns")
TOL = {"atol": 1e-6, "rtol": 1e-6}


def held(*models: Any) -> int:
    """Elements of the distinct parameter tensors `models` hold between them."""
    tensors = {p.data_ptr(): p.numel() for model in models for p in model.parameters()}
    return sum(tensors.values())


def frozen_modules(run: Any) -> tuple[Any, Any]:
    """The modules behind the reference and the reward model (a copy, or a trained model)."""
    return tuple(getattr(model, "model", model) for model in (run.reference, run.reward))


def trainable(run: Any, name: str) -> dict[str, torch.Tensor]:
    model = run.accelerator.unwrap_model(getattr(run, name))
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same_experience(a: Any, b: Any) -> None:
    for field in EXPERIENCE:
        assert_close(getattr(a, field), getattr(b, field), **TOL, msg=field)


def test_lora_shares_the_bases_and_equals_the_two_copy_path(
    inputs: Path,  # noqa: F811
    workdir: Path,
    make_params,
):
    from tasks.ppo.run import AdapterDisabled, frozen_copies, setup
    from tasks.ppo.train import rollout, update

    copy_inputs(inputs, workdir)
    params = load_params(make_params(OVERRIDES | LORA))
    shared = setup(params)
    assert isinstance(shared.reference, AdapterDisabled)
    assert isinstance(shared.reward, AdapterDisabled)
    two_copy = setup(params)  # the same seed: the same adapters
    pad = two_copy.tokenizer.pad_token_id
    two_copy.reference, two_copy.reward = frozen_copies(params, torch.float32, pad, lambda m: m)

    # Two base models instead of four: the frozen ones are the trained ones, nothing more.
    actor, critic = (shared.accelerator.unwrap_model(m) for m in (shared.actor, shared.critic))
    assert frozen_modules(shared) == (actor, critic)
    copies = frozen_modules(two_copy)
    assert held(actor, critic, *frozen_modules(shared)) == held(actor, critic)
    bases = sum(p.numel() for m in (actor, critic) for p in m.parameters() if not p.requires_grad)
    assert held(*copies) == bases  # the copies duplicate exactly the frozen bases
    assert not any(p.requires_grad for model in copies for p in model.parameters())

    # Iteration 0: the adapters start at zero (LoRA's B = 0), actor = reference.
    experience = [rollout.fn(run, 0)[0] for run in (shared, two_copy)]
    assert_same_experience(*experience)
    stats = [
        update.fn(run, exp, 0) for run, exp in zip((shared, two_copy), experience, strict=True)
    ]
    losses = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in stats]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for name in ("actor", "critic"):
        after = [trainable(run, name) for run in (shared, two_copy)]
        assert set(after[0]) == set(after[1]) and len(after[0]) > 4
        for key in after[0]:
            assert_close(after[0][key], after[1][key], **TOL, msg=f"{name} {key}")

    # Iteration 1: the adapters moved. The shared reference and reward are still the frozen
    # models (equal to the copies), and they are not the trained models with their adapters.
    experience = [rollout.fn(run, 1)[0] for run in (shared, two_copy)]
    assert_same_experience(*experience)
    exp = experience[0]
    assert (exp.logprobs - exp.ref_logprobs).abs().max() > 1e-4  # KL ≠ 0: a real reference
    with torch.no_grad():
        own = critic(exp.sequences, exp.attention_mask, exp.position_ids)
        last = exp.prompt_length + exp.mask.sum(dim=1) - 1
        own_scores = own.gather(1, last.unsqueeze(1)).squeeze(1)
    assert (own_scores - exp.raw_scores).abs().max() > 1e-4  # the reward is not the critic
    # ... and the bases did not move: the reference still scores like models/sft does
    assert not any(
        p.grad is not None for m in (actor, critic) for p in m.parameters() if not p.requires_grad
    )


def test_the_export_holds_the_actor_alone(
    inputs: Path,  # noqa: F811
    workdir: Path,
    make_params,
    prefect_server,
    monkeypatch: pytest.MonkeyPatch,
):
    """Writing models/ppo/ holds the merged actor: the critic (and, under LoRA, the reward model
    it carries) and both optimizers are freed before it, or the export is the run's memory peak
    (docs/performance.md, PPO memory). Checked with weak references at the moment of saving."""
    import gc
    import weakref

    import tasks.ppo.train as train
    from flows.ppo import ppo

    copy_inputs(inputs, workdir)
    params = load_params(make_params(OVERRIDES | LORA))
    watched: list[weakref.ref] = []
    setup, save_policy = train.setup, train._save_policy

    def watching_setup(params: Any) -> Any:
        run = setup(params)
        unwrap = run.accelerator.unwrap_model
        watched.extend(weakref.ref(x) for x in (unwrap(run.critic), run.critic_optimizer))
        watched.append(weakref.ref(run.actor_optimizer))
        return run

    def saving(run: Any, policy: Any) -> None:
        gc.collect()
        assert [ref() is None for ref in watched] == [True, True, True]
        save_policy(run, policy)

    monkeypatch.setattr(train, "setup", watching_setup)
    monkeypatch.setattr(train, "_save_policy", saving)
    ppo(params)
    assert (workdir / "models" / "ppo" / "config.json").is_file()
