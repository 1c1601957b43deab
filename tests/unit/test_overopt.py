"""evaluate's over-optimisation picture (tasks/overopt.py, through tasks/report.py): what the
drawing receives is the metrics it comes from — every policy's end point (√kl_to_sft,
reward_mean, the gold), the best-of-n curve from SFT by increasing n, the training trajectories
of plots/<stage>.json's held-out rows in step order — and a stage without held-out rows, or
data without a gold, draws less, not wrongly. Handmade metrics; no models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tasks import report
from tasks.overopt import BEST_OF_N, Point, Series, read_trajectories
from tasks.stages import POLICIES

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(gold: str | None = "ground_truth_score") -> dict[str, dict[str, float]]:
    """evaluate's metrics of every policy, best-of-n listed out of order (16 before 4)."""
    values = {
        "sft": (0.0, -1.25, 0.5),
        "ppo": (2.25, 5.5, 0.75),
        "dpo": (4.0, 5.0, 0.875),
        "simpo": (1.0, 3.5, 0.625),
        "grpo": (1.5625, 4.75, 0.8125),
        "rloo": (2.56, 5.25, 0.6875),
        "bon@16": (1.835, 4.5, 0.6),
        "bon@4": (0.636, 2.75, 0.55),
    }
    metrics = {}
    for policy, (kl, proxy, truth) in values.items():
        metrics[policy] = {"kl_to_sft": kl, "reward_mean": proxy, "eos_rate": 1.0}
        if gold:
            metrics[policy][gold] = truth
    return metrics


PPO_ROWS = [  # as tasks/ppo/train.py writes them: training rows, held-out rows every 2 and last
    {
        "iteration": 4,
        "objective/kl": 0.3,
        "heldout/proxy": 5.0,
        "heldout/kl": 2.25,
        "heldout/gold": 0.7,
    },
    {
        "iteration": 0,
        "objective/kl": 0.0,
        "heldout/proxy": -1.0,
        "heldout/kl": 0.0,
        "heldout/gold": 0.5,
    },
    {"iteration": 1, "objective/kl": 0.1},
    {
        "iteration": 2,
        "objective/kl": 0.2,
        "heldout/proxy": 3.0,
        "heldout/kl": 1.0,
        "heldout/gold": 0.8,
    },
]
GRPO_ROWS = [  # as tasks/trainers.py writes them: loss rows and held-out rows, keyed step
    {"step": 0, "heldout/proxy": -1.0, "heldout/kl": 0.0, "heldout/gold": 0.5},
    {"step": 5, "loss": 0.1, "reward": 0.2},
    {"step": 10, "heldout/proxy": 4.0, "heldout/kl": 0.81, "heldout/gold": 0.9},
]


def record_draws(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[dict[str, Any]]:
    """What `module.draw` is called with, call by call (and it still draws)."""
    calls: list[dict[str, Any]] = []
    real = module.draw

    def record(series: list[Series], path: Path, gold: str | None, title: str) -> None:
        calls.append({"series": series, "path": path, "gold": gold})
        real(series, path, gold, title)

    monkeypatch.setattr(module, "draw", record)
    return calls


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    return record_draws(monkeypatch, report)


def _write_plots(root: Path, **rows: list[dict[str, float]]) -> None:
    (root / "plots").mkdir(exist_ok=True)
    for stage, content in rows.items():
        (root / "plots" / f"{stage}.json").write_text(json.dumps(content))


def _by_kind(series: list[Series], kind: str) -> dict[str, Series]:
    found = {s.policy: s for s in series if s.kind == kind}
    assert len(found) == len([s for s in series if s.kind == kind]), "a policy twice"
    return found


def _table(markdown: str) -> dict[str, list[str]]:
    """The over-optimisation section's table: {policy: cells}."""
    section = markdown.split("## Reward over-optimisation", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return {
        r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
        for r in rows
    }


def test_points_are_the_metrics_they_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawn: list[dict[str, Any]]
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_plots(tmp_path, ppo=PPO_ROWS, grpo=GRPO_ROWS)  # rloo: no plots file at all
    metrics = _metrics()
    (tmp_path / "reports").mkdir()
    report.write_report(metrics, "dpo", tmp_path / "reports", read_trajectories(POLICIES))

    (call,) = drawn
    assert call["path"] == tmp_path / "reports" / "overoptimisation.png"
    assert call["gold"] == "ground_truth_score"
    assert call["path"].read_bytes().startswith(PNG)
    series = call["series"]
    ends = _by_kind(series, "end")
    assert list(ends) == [p for p in metrics if not p.startswith("bon@")]
    for policy, one in ends.items():
        values = metrics[policy]
        (point,) = one.points
        assert point == Point(
            math.sqrt(values["kl_to_sft"]), values["reward_mean"], values["ground_truth_score"]
        )

    (curve,) = _by_kind(series, "curve").values()
    assert curve.policy == BEST_OF_N
    assert curve.names == ("sft", "4", "16")  # SFT at KL 0, then n increasing
    assert curve.points == tuple(
        Point(
            math.sqrt(metrics[p]["kl_to_sft"]),
            metrics[p]["reward_mean"],
            metrics[p]["ground_truth_score"],
        )
        for p in ("sft", "bon@4", "bon@16")
    )
    assert [p.sqrt_kl for p in curve.points] == sorted(p.sqrt_kl for p in curve.points)

    trajectories = _by_kind(series, "trajectory")
    assert set(trajectories) == {"ppo", "grpo"}  # rloo has none: an end point only
    held_out = sorted((r for r in PPO_ROWS if "heldout/kl" in r), key=lambda r: r["iteration"])
    assert trajectories["ppo"].points == tuple(
        Point(math.sqrt(r["heldout/kl"]), r["heldout/proxy"], r["heldout/gold"]) for r in held_out
    )
    assert [p.proxy for p in trajectories["grpo"].points] == [-1.0, 4.0]
    assert [p.sqrt_kl for p in trajectories["grpo"].points] == [0.0, 0.9]

    # the table in evaluate.md: the same end points
    table = _table((tmp_path / "reports" / "evaluate.md").read_text(encoding="utf-8"))
    assert list(table) == list(metrics)
    for policy, cells in table.items():
        values = metrics[policy]
        assert cells == [
            f"{math.sqrt(values['kl_to_sft']):.3f}",
            f"{values['reward_mean']:.3f}",
            f"{values['ground_truth_score']:.3f}",
        ]


def test_a_stage_without_held_out_rows_is_an_end_point_only(tmp_path: Path, monkeypatch) -> None:
    """`ppo.eval_every: null`: plots/ppo.json has training rows only."""
    monkeypatch.chdir(tmp_path)
    _write_plots(
        tmp_path, ppo=[{k: v for k, v in r.items() if "heldout" not in k} for r in PPO_ROWS]
    )
    _write_plots(tmp_path, grpo=GRPO_ROWS, rloo=[])
    assert list(read_trajectories(POLICIES)) == ["grpo"]
    assert list(read_trajectories(["sft", "ppo", "dpo"])) == []  # grpo is not evaluated


def test_without_gold_the_proxy_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawn: list[dict[str, Any]]
) -> None:
    """No ground truth and no gold reward model: one panel, the proxy; no gold column."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (figures.append(figure), close(figure)))
    monkeypatch.chdir(tmp_path)
    rows = [{k: v for k, v in r.items() if k != "heldout/gold"} for r in GRPO_ROWS]
    _write_plots(tmp_path, grpo=rows)
    metrics = _metrics(gold=None)
    report.write_report(metrics, "ppo", tmp_path, read_trajectories(POLICIES))

    (call,) = drawn
    assert call["gold"] is None
    assert all(p.gold is None for s in call["series"] for p in s.points)
    (figure,) = [f for f in figures if f.axes and f.axes[0].get_xlabel().startswith("√KL")]
    assert [ax.get_ylabel() for ax in figure.axes] == ["proxy (reward_mean)"]
    table = _table((tmp_path / "evaluate.md").read_text(encoding="utf-8"))
    assert all(len(cells) == 2 for cells in table.values())


def test_a_gold_reward_model_is_the_gold(tmp_path: Path, drawn: list[dict[str, Any]]) -> None:
    """With `data.gold_reward_model` on synthetic data both golds exist; the named model's is
    the one the stages' heldout/gold measures, and so the one drawn."""
    metrics = _metrics()
    for index, values in enumerate(metrics.values()):
        values["gold_reward"] = index / 4
    report.write_report(metrics, "ppo", tmp_path)
    (call,) = drawn
    assert call["gold"] == "gold_reward"
    ends = _by_kind(call["series"], "end")
    assert ends["dpo"].points[0].gold == metrics["dpo"]["gold_reward"]
    assert not _by_kind(call["series"], "trajectory")
