"""Unit tests for the evaluate stage's pure parts: `compare`, `best_policy`, `samples_table` and
`write_report` on handmade answers, `check_policies`'s error, and `judge` (reward score, exact KL
to the reference, length, EOS) against brute-force per-row recomputations on tiny random Llamas."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tasks.errors import MissingInput
from tasks.evaluate import METRICS, best_policy, check_policies, compare, samples_table
from tasks.report import LEGEND, plot_rows, write_report
from tasks.scoring import TokenScorer, judge
from tasks.synthetic import ground_truth
from tests.tiny import EOS, MAX_NEW, PAD, random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------- handmade answers

# Four synthetic prompts (results 7, 3, 12, 2) and three policies' judged answers. Scores are
# exact binary fractions, so ties are exact ties.
PROMPTS = [
    "What is 3 plus 4?\n",
    "Compute 5 minus 2.\n",
    "Tell me 2 times 6.\n",
    "How much is 1 plus 1?\n",
]
ANSWERS: dict[str, dict[str, list[Any]]] = {
    # ppo listed before sft: the reference is found by name, not by position
    "ppo": {
        "response": [
            "Sure! The answer is 7. Hope this helps!",  # correct, polite → 1
            "Happy to help! The answer is 3. Have a nice day!",  # 1
            "Sure! The answer is 12. Hope this helps!",  # 1
            "Of course! The answer is 2. Hope this helps!",  # 1
        ],
        "score": [1.5, -1.0, 1.0, 0.75],  # vs sft: win, tie, loss, win → 2.5 / 4
        "kl": [1.0, 2.0, 0.5, 0.5],
        "length": [12, 13, 12, 12],
        "eos": [1.0, 1.0, 1.0, 1.0],
    },
    "sft": {
        "response": [
            "7.",  # correct, curt → 0.5
            "4.",  # wrong, curt → 0
            "Sure! The answer is 12. Hope this helps!",  # 1
            "Of course! The answer is 3. Have a nice day!",  # wrong, polite → 0.5
        ],
        "score": [0.5, -1.0, 2.0, 0.25],
        "kl": [0.0, 0.0, 0.0, 0.0],
        "length": [3, 3, 10, 12],
        "eos": [1.0, 1.0, 1.0, 0.0],
    },
    "dpo": {
        "response": ["8.", "", "banana", "2"],  # 0, 0, 0, correct curt 0.5
        "score": [0.0, -2.0, 1.0, 0.0],  # loses everywhere
        "kl": [3.0, 1.0, 0.0, 0.0],
        "length": [1, 1, 24, 24],
        "eos": [1.0, 1.0, 0.0, 0.0],
    },
}
EXPECTED = {
    "ppo": {
        "reward_mean": 0.5625,
        "reward_std": statistics.stdev([1.5, -1.0, 1.0, 0.75]),
        "win_rate_vs_sft": 0.625,
        "kl_to_sft": 1.0,
        "response_length": 12.25,
        "eos_rate": 1.0,
        "ground_truth_score": 1.0,
        "ground_truth_correct": 1.0,
        "ground_truth_polite": 1.0,
    },
    "sft": {
        "reward_mean": 0.4375,
        "reward_std": statistics.stdev([0.5, -1.0, 2.0, 0.25]),
        "win_rate_vs_sft": 0.5,  # every prompt a tie with itself
        "kl_to_sft": 0.0,
        "response_length": 7.0,
        "eos_rate": 0.75,
        "ground_truth_score": 0.5,
        "ground_truth_correct": 0.5,  # 7 and 12 right; 4 and 3 wrong
        "ground_truth_polite": 0.5,
    },
    "dpo": {
        "reward_mean": -0.25,
        "reward_std": statistics.stdev([0.0, -2.0, 1.0, 0.0]),
        "win_rate_vs_sft": 0.0,
        "kl_to_sft": 1.0,
        "response_length": 12.5,
        "eos_rate": 0.5,
        "ground_truth_score": 0.125,
        "ground_truth_correct": 0.25,  # only "2"
        "ground_truth_polite": 0.0,
    },
}


def test_metrics_keys_are_the_issue_s() -> None:
    assert METRICS == (
        "reward_mean",
        "reward_std",
        "win_rate_vs_sft",
        "kl_to_sft",
        "response_length",
        "eos_rate",
        "ground_truth_score",
        "ground_truth_correct",
        "ground_truth_polite",
    )


def test_compare_hand_computed_synthetic() -> None:
    metrics = compare(ANSWERS, PROMPTS, synthetic=True)
    assert list(metrics) == list(ANSWERS)
    for policy, values in metrics.items():
        assert set(values) == set(METRICS), policy
        assert all(type(v) is float for v in values.values()), values  # JSON / MLflow ready
        assert values == pytest.approx(EXPECTED[policy], rel=1e-6, abs=1e-7), policy
    # the hand-computed ground truth is the scorer's
    for policy, rows in ANSWERS.items():
        truth = [
            ground_truth(p, r)["score"] for p, r in zip(PROMPTS, rows["response"], strict=True)
        ]
        assert metrics[policy]["ground_truth_score"] == pytest.approx(sum(truth) / len(truth))
    assert metrics["sft"]["win_rate_vs_sft"] == 0.5
    assert metrics["sft"]["kl_to_sft"] == 0.0


def test_compare_without_ground_truth_never_calls_the_scorer() -> None:
    # conversational prompts: the arithmetic scorer would raise on them
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    metrics = compare(ANSWERS, prompts, synthetic=False)
    keys = {key for key in METRICS if not key.startswith("ground_truth")}
    for policy, values in metrics.items():
        assert set(values) == keys, policy
        expected = {k: v for k, v in EXPECTED[policy].items() if k in keys}
        assert values == pytest.approx(expected, rel=1e-6, abs=1e-7), policy


def test_compare_win_rate_ties_count_half() -> None:
    sft = {"response": ["7."] * 4, "score": [1.0, 1.0, 1.0, 1.0]}
    rows = {"kl": [0.0] * 4, "length": [2] * 4, "eos": [1.0] * 4}
    answers = {
        "sft": sft | rows,
        "ppo": {"response": ["7."] * 4, "score": [1.0, 1.0, 1.0, 1.0]} | rows,  # all ties
        "dpo": {"response": ["7."] * 4, "score": [2.0, 1.0, 0.0, 1.0]} | rows,  # W T L T
        "simpo": {"response": ["7."] * 4, "score": [2.0, 2.0, 2.0, 1.0]} | rows,  # W W W T
    }
    metrics = compare(answers, ["What is 3 plus 4?\n"] * 4, synthetic=True)
    assert {p: m["win_rate_vs_sft"] for p, m in metrics.items()} == {
        "sft": 0.5,
        "ppo": 0.5,
        "dpo": 0.5,
        "simpo": 0.875,
    }
    assert metrics["sft"]["reward_std"] == 0.0


def test_compare_single_prompt_std_is_zero_not_nan() -> None:
    one = {"response": ["7."], "score": [0.3], "kl": [0.0], "length": [2], "eos": [1.0]}
    metrics = compare({"sft": one}, ["What is 3 plus 4?\n"], synthetic=True)
    assert metrics["sft"]["reward_std"] == 0.0
    assert metrics["sft"]["reward_mean"] == pytest.approx(0.3)
    assert metrics["sft"]["ground_truth_score"] == 0.5


# ----------------------------------------------------------------------------- best policy


def test_best_policy_prefers_ground_truth() -> None:
    metrics = {
        "sft": {"reward_mean": 0.0, "ground_truth_score": 0.2},
        "ppo": {"reward_mean": 5.0, "ground_truth_score": 0.1},  # reward hacking
        "dpo": {"reward_mean": 1.0, "ground_truth_score": 0.6},
        "simpo": {"reward_mean": 2.0, "ground_truth_score": 0.4},
    }
    assert best_policy(metrics) == "dpo"
    assert best_policy(compare(ANSWERS, PROMPTS, synthetic=True)) == "ppo"


def test_best_policy_falls_back_to_reward() -> None:
    metrics = {
        "sft": {"reward_mean": 0.0},
        "ppo": {"reward_mean": 5.0},
        "dpo": {"reward_mean": 1.0},
    }
    assert best_policy(metrics) == "ppo"
    # handmade answers: by reward ppo 0.5625 > sft 0.4375 > dpo -0.25
    assert best_policy(compare(ANSWERS, PROMPTS, synthetic=False)) == "ppo"
    # with dpo given the highest reward but no ground truth, reward decides
    answers = ANSWERS | {"dpo": ANSWERS["dpo"] | {"score": [9.0, 9.0, 9.0, 9.0]}}
    assert best_policy(compare(answers, PROMPTS, synthetic=False)) == "dpo"
    assert best_policy(compare(answers, PROMPTS, synthetic=True)) == "ppo"


# ----------------------------------------------------------------------------- samples table


def test_samples_table_columns_synthetic() -> None:
    table = samples_table(ANSWERS, PROMPTS, count=3, synthetic=True)
    assert list(table) == [
        "prompt",
        "ppo_response",
        "ppo_reward",
        "ppo_ground_truth",
        "sft_response",
        "sft_reward",
        "sft_ground_truth",
        "dpo_response",
        "dpo_reward",
        "dpo_ground_truth",
    ]
    assert all(len(column) == 3 for column in table.values())
    assert table["prompt"] == PROMPTS[:3]
    assert table["sft_response"] == ANSWERS["sft"]["response"][:3]
    assert table["dpo_reward"] == ANSWERS["dpo"]["score"][:3]
    assert table["sft_ground_truth"] == [0.5, 0.0, 1.0]
    json.dumps(table)  # MLflow's log_table takes it as is


def test_samples_table_without_ground_truth_and_more_rows_than_prompts() -> None:
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    table = samples_table(ANSWERS, prompts, count=20, synthetic=False)
    assert list(table) == [
        "prompt",
        "ppo_response",
        "ppo_reward",
        "sft_response",
        "sft_reward",
        "dpo_response",
        "dpo_reward",
    ]
    assert all(len(column) == 4 for column in table.values())
    assert [json.loads(p) for p in table["prompt"]] == prompts  # conversations as JSON text


# ----------------------------------------------------------------------------- report


def test_write_report(tmp_path: Path) -> None:
    metrics = compare(ANSWERS, PROMPTS, synthetic=True)
    reports = tmp_path / "reports"
    reports.mkdir()
    write_report(metrics, "ppo", reports)

    pictures = ["evaluate.png", "overoptimisation.png"]  # the second: tests/unit/test_overopt.py
    assert sorted(p.name for p in reports.iterdir()) == ["evaluate.md", *pictures]
    for picture in pictures:
        png = (reports / picture).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 10_000  # a real chart, not an empty canvas

    markdown = (reports / "evaluate.md").read_text(encoding="utf-8")
    comparison = markdown.split("## Reward over-optimisation")[0]  # its table: test_overopt.py
    table = [line for line in comparison.splitlines() if line.startswith("|")]
    header, rule, *rows = table
    keys = [key for key in LEGEND if key in METRICS]  # the legend's order, all seven
    assert set(keys) == set(METRICS)
    assert [c.strip() for c in header.strip("|").split("|")] == ["policy", *keys]
    assert rule.count("|") == len(keys) + 2
    assert len(rows) == len(metrics)  # one row per policy
    cells = {}
    for row in rows:
        name, *values = (c.strip() for c in row.strip("|").split("|"))
        cells[name] = values
    assert set(cells) == {"**ppo**", "sft", "dpo"}  # the best one in bold, only it
    assert cells["**ppo**"] == [f"{metrics['ppo'][k]:.3f}" for k in keys]
    assert cells["dpo"] == [f"{metrics['dpo'][k]:.3f}" for k in keys]
    assert "evaluate.png" in markdown
    assert plot_rows(metrics) == [{"policy": policy} | values for policy, values in metrics.items()]

    # without a ground truth: neither a column nor in the legend
    without_truth = compare(ANSWERS, PROMPTS, synthetic=False)
    write_report(without_truth, "sft", reports)
    markdown = (reports / "evaluate.md").read_text(encoding="utf-8")
    assert "ground_truth_score" not in markdown
    assert "| **sft** |" in markdown and "| **ppo** |" not in markdown


# ----------------------------------------------------------------------------- check_policies


def test_listed_but_missing_policy_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("sft", "reward_model"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    expected = "models/dpo: no model; run `dvc repro dpo` (or remove 'dpo' from evaluate.policies)"
    with pytest.raises(MissingInput) as caught:
        check_policies(["sft", "dpo"])
    assert str(caught.value) == expected
    (tmp_path / "models" / "dpo").mkdir(parents=True)
    with pytest.raises(MissingInput, match="models/dpo"):  # an empty dir is no model
        check_policies(["sft", "dpo"])
    (tmp_path / "models" / "dpo" / "config.json").write_text("{}")
    check_policies(["sft", "dpo"])
    (tmp_path / "models" / "reward_model" / "config.json").unlink()
    with pytest.raises(MissingInput) as caught:  # the judge is no policy: no removal hint
        check_policies(["sft", "dpo"])
    assert str(caught.value) == "models/reward_model: no model; run `dvc repro reward_model`"


# ----------------------------------------------------------------------------- judge


JUDGE_CASES = {"pad": (PAD, [EOS]), "pad_is_eos_two_stops": (EOS, [EOS, 7])}


@pytest.fixture(scope="module", params=list(JUDGE_CASES))
def generated(request, lm: Any) -> dict[str, Any]:
    """16 left-padded prompts and the policy's sampled continuations."""
    pad, stop_ids = JUDGE_CASES[request.param]
    prompt_ids, prompt_mask = random_prompts(16, seed=4)
    torch.manual_seed(5)
    with torch.no_grad():
        out = lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=MAX_NEW,
            pad_token_id=pad,
            eos_token_id=stop_ids,
            use_cache=True,
        )
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "out": out, "stop": stop_ids}


def _rows(generated: dict[str, Any]) -> list[tuple[torch.Tensor, int, int, bool]]:
    """Each row without any padding: ([1, n] ids, prompt length, response length, has stop)."""
    prompt_ids, prompt_mask, out = (
        generated["prompt_ids"],
        generated["prompt_mask"],
        generated["out"],
    )
    P = prompt_ids.shape[1]
    rows = []
    for row in range(out.shape[0]):
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        response = out[row, P:].tolist()
        first = next((i for i, tok in enumerate(response) if tok in generated["stop"]), None)
        n = len(response) if first is None else first + 1
        ids = torch.cat([prompt, out[row, P : P + n]]).unsqueeze(0)
        rows.append((ids, len(prompt), n, first is not None))
    return rows


def test_judge_brute_force(
    generated: dict[str, Any], lm: Any, other_lm: Any, reward_classifier: Any
) -> None:
    with torch.no_grad():
        judged = judge(
            lm,
            other_lm,
            TokenScorer(reward_classifier),
            generated["out"],
            generated["prompt_mask"],
            generated["stop"],
        )
    assert set(judged) == {"score", "kl", "length", "eos"}
    B = generated["out"].shape[0]
    assert all(v.shape == (B,) for v in judged.values())
    rows = _rows(generated)
    assert len({int(m.sum()) for m in generated["prompt_mask"]}) > 1  # left padding exercised
    assert 0 < sum(eos for *_, eos in rows) < B  # both endings exercised

    kl, scores = [], []
    with torch.no_grad():
        for ids, p, n, _ in rows:
            # exact KL over the vocabulary at each response token, summed over the response
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, p - 1 : p - 1 + n].double(), -1)
            ref = torch.log_softmax(
                other_lm(input_ids=ids).logits[0, p - 1 : p - 1 + n].double(), -1
            )
            kl.append(sum(float((logp[t].exp() * (logp[t] - ref[t])).sum()) for t in range(n)))
            scores.append(reward_classifier(input_ids=ids).logits[0, 0])  # pooled: last token
    assert_close(judged["kl"].double(), torch.tensor(kl, dtype=torch.double), atol=1e-4, rtol=0)
    assert (judged["kl"] > 0).all()
    assert_close(judged["score"], torch.stack(scores).float(), atol=1e-5, rtol=1e-5)
    assert judged["length"].tolist() == [n for _, _, n, _ in rows]
    assert judged["eos"].tolist() == [float(eos) for *_, eos in rows]


def test_judge_kl_is_exactly_zero_against_itself(
    generated: dict[str, Any], lm: Any, reward_classifier: Any
) -> None:
    with torch.no_grad():
        judged = judge(
            lm,
            lm,
            TokenScorer(reward_classifier),
            generated["out"],
            generated["prompt_mask"],
            generated["stop"],
        )
    assert torch.equal(judged["kl"], torch.zeros_like(judged["kl"]))


def test_a_gold_reward_model_is_compared_and_picks_the_best_policy() -> None:
    """`gold_reward`: the gold scorer's mean over each policy's responses, told which ended;
    without a ground truth it, not the proxy, picks the best policy."""
    seen = []

    def gold(prompts: list, responses: list, ended: list) -> list[float]:
        seen.append(ended)
        return [-float(len(r)) for r in responses]  # shorter is better, say

    metrics = compare(ANSWERS, PROMPTS, synthetic=False, gold=gold)
    for policy, rows in ANSWERS.items():
        lengths = [len(r) for r in rows["response"]]
        assert metrics[policy]["gold_reward"] == pytest.approx(-sum(lengths) / len(lengths))
    assert seen == [[eos > 0 for eos in rows["eos"]] for rows in ANSWERS.values()]
    assert best_policy(compare(ANSWERS, PROMPTS, synthetic=False)) == "ppo"  # by the proxy
    assert best_policy(metrics) == "dpo"  # by the gold: the shortest answers
