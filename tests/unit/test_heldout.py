"""tasks/heldout.py: which steps are judged, which gold a task has (a gold reward model's raw
score on the text it reads, the synthetic ground truth, or none), a bad gold in one line, and
the held-out metrics against the judge and the scorers they stand for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tasks.errors import ParamsError
from tasks.generation import generate, render_prompts
from tasks.heldout import due, evaluate_held_out, gold_scorer, held_out
from tasks.models import load_causal_lm, load_scorer, load_tokenizer, locate
from tasks.params import load_params
from tasks.scoring import TokenScorer
from tasks.synthetic import ground_truth
from tests.unit.conftest import COMPLETIONS, PROMPTS


def test_due_is_the_first_every_nth_and_the_last_step() -> None:
    assert [s for s in range(11) if due(s, 4, 10)] == [0, 4, 8, 10]
    assert [s for s in range(9) if due(s, 4, 8)] == [0, 4, 8]  # the last once, not twice
    assert [s for s in range(4) if due(s, 1, 3)] == [0, 1, 2, 3]


def test_a_gold_reward_model_scores_the_text_it_reads(reward_model, make_params) -> None:
    _, tokenizer = reward_model
    gold_dir = Path("models/reward_model").resolve()  # any model directory, by absolute path
    params = load_params(make_params({"data.gold_reward_model": str(gold_dir)}, name="g.yaml"))
    ended = [True, False, True]
    got = gold_scorer(params)(PROMPTS, COMPLETIONS, ended)

    classifier = load_scorer(gold_dir, params.model, torch.float32, tokenizer.pad_token_id)
    expected = []
    for prompt, completion, end in zip(PROMPTS, COMPLETIONS, ended, strict=True):
        text = prompt + completion + (tokenizer.eos_token if end else "")
        with torch.no_grad():  # the raw score: a gold is not normalised like the proxy
            expected.append(classifier(**tokenizer(text, return_tensors="pt")).logits[0, 0])
    assert_close(torch.tensor(got), torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert len(set(got)) == 3


def test_the_gold_is_the_ground_truth_on_synthetic_data_and_none_elsewhere(
    workdir: Path, make_params
) -> None:
    params = load_params(make_params())
    got = gold_scorer(params)(PROMPTS, COMPLETIONS, [True] * 3)
    assert got == [ground_truth(p, c)["score"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    local = {"data.source": "local", "data.preference.path": "pairs.jsonl"}
    assert gold_scorer(load_params(make_params(local, name="local.yaml"))) is None


@pytest.mark.parametrize(
    ("given", "problem"),
    [("./no-such-model", "does not exist"), (".", "is not a model directory (no config.json)")],
)
def test_a_bad_gold_reward_model_is_one_params_error(
    workdir: Path, make_params, given: str, problem: str
) -> None:
    params = load_params(make_params({"data.gold_reward_model": given}))
    with pytest.raises(ParamsError) as caught:
        gold_scorer(params)
    assert str(caught.value).startswith(f"data.gold_reward_model: '{given}' {problem}")
    assert caught.value.key == "data.gold_reward_model"


def test_a_hub_id_is_located_as_itself() -> None:
    assert locate("org/gold-rm") == ("org/gold-rm", None)


def test_held_out_metrics_are_the_judge_means_of_greedy_responses(
    reward_model, make_params
) -> None:
    """Policy = reference: KL exactly 0; gold = the ground truth of the greedy responses; proxy =
    the reward model read at each response's last token; the policy's train mode is kept."""
    params, _ = reward_model
    prompts_file = Path("data/prepared/prompts/eval.jsonl")
    prompts_file.parent.mkdir(parents=True)
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    tokenizer = load_tokenizer("base", params.model, padding_side="left")
    policy = load_causal_lm("base", params.model, torch.float32).train()
    classifier = load_scorer("reward_model", params.model, torch.float32, tokenizer.pad_token_id)
    reward = TokenScorer(classifier.eval())
    held = held_out(params, 2, 6, tokenizer, policy, reward)  # the first 2 prompts
    assert held.prompts == PROMPTS[:2]

    metrics = evaluate_held_out(policy, tokenizer, held, batch_size=1)

    assert policy.training
    assert set(metrics) == {"heldout/proxy", "heldout/kl", "heldout/gold"}
    assert metrics["heldout/kl"] == 0.0
    policy.eval()
    rendered = render_prompts(PROMPTS[:2], tokenizer)
    (prompt_mask, sequences), *_ = generate(
        policy, tokenizer, rendered, 2, max_new_tokens=6, do_sample=False
    )
    P, eos = prompt_mask.shape[1], tokenizer.eos_token_id
    gold, scores = [], []
    for row, prompt in enumerate(PROMPTS[:2]):  # each row unpadded, cut after its first EOS
        response = sequences[row, P:].tolist()
        n = response.index(eos) + 1 if eos in response else len(response)
        ids = torch.cat([sequences[row, :P][prompt_mask[row].bool()], sequences[row, P : P + n]])
        with torch.no_grad():  # the pooled score of an unpadded row: its last token's
            scores.append(classifier(input_ids=ids.unsqueeze(0)).logits[0, 0].item())
        text = tokenizer.decode(response[:n], skip_special_tokens=True)
        gold.append(ground_truth(prompt, text)["score"])
    assert metrics["heldout/gold"] == pytest.approx(sum(gold) / 2)
    assert metrics["heldout/proxy"] == pytest.approx(sum(scores) / 2, abs=1e-4)
