"""The comparison a person reads: a Markdown table and a bar chart per metric, gold and proxy
against √KL (reports/), and the rows `dvc plots show` draws (plots/evaluate.json)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tasks.overopt import Point, draw, end_point, gold_key, picture

# What each metric is, for the report's legend (docs/metrics.md has the full glossary).
LEGEND = {
    "ground_truth_score": "the task's own scorer, 0–1 (synthetic: the mean of the next two)",
    "ground_truth_correct": "fraction of responses whose answer is right",
    "ground_truth_polite": "fraction of responses that open and close politely",
    "gold_reward": "mean score of the gold reward model (data.gold_reward_model)",
    "reward_mean": "mean reward-model score of the responses",
    "reward_std": "spread of those scores",
    "win_rate_vs_sft": "fraction of prompts where the reward model prefers this policy to SFT",
    "kl_to_sft": "nats per response the policy moved from SFT",
    "response_length": "tokens per response, EOS included",
    "eos_rate": "fraction of responses that ended by themselves",
}


def write_report(
    metrics: dict[str, dict[str, float]],
    best: str,
    out: Path,
    trajectories: Mapping[str, tuple[Point, ...]] | None = None,
) -> None:
    """`out`/evaluate.md (the tables), `out`/evaluate.png (bar charts) and
    `out`/overoptimisation.png: gold and proxy against √KL, with the training `trajectories`
    (tasks/overopt.py: read_trajectories) of the stages that have them."""
    keys = [key for key in LEGEND if key in metrics["sft"]]
    _chart(metrics, keys, out / "evaluate.png")
    gold = gold_key(metrics["sft"])
    points = {policy: end_point(values, gold) for policy, values in metrics.items()}
    title = "Reward over-optimisation: gold and proxy against √KL to SFT"
    draw(picture(points, trajectories), out / "overoptimisation.png", gold, title)
    markdown = _markdown(metrics, keys, best) + _overoptimisation(points, gold)
    (out / "evaluate.md").write_text(markdown, encoding="utf-8")


def plot_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """plots/evaluate.json: one row per policy, for `dvc plots show`'s bar charts."""
    return [{"policy": policy} | values for policy, values in metrics.items()]


def _markdown(metrics: dict[str, dict[str, float]], keys: list[str], best: str) -> str:
    lines = [
        "# Evaluation: every policy on the held-out prompts",
        "",
        f"Best policy: **{best}** (registered in the MLflow model registry).",
        "",
        "| policy | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for policy, values in metrics.items():
        cells = [f"{values[key]:.3f}" for key in keys]
        name = f"**{policy}**" if policy == best else policy
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![comparison](evaluate.png)", ""]
    lines += [f"- `{key}`: {LEGEND[key]}" for key in keys]
    lines += ["", "Reward rising without ground truth rising is reward hacking.", ""]
    return "\n".join(lines)


def _overoptimisation(points: dict[str, Point], gold: str | None) -> str:
    """The section of the picture: its end points as a table (policy, √KL, proxy, gold)."""
    lines = [
        "",
        "## Reward over-optimisation: gold and proxy against √KL",
        "",
        "![over-optimisation](overoptimisation.png)",
        "",
        f"Proxy: `reward_mean`; gold: `{gold}`; √KL: √`kl_to_sft`. Lines: the held-out "
        "evaluations during training (`<stage>.eval_every`); best-of-n: SFT, then `bon@<n>`."
        if gold
        else "Proxy: `reward_mean`; √KL: √`kl_to_sft`; no gold (no ground truth, no "
        "`data.gold_reward_model`).",
        "",
        "| policy | √KL | proxy |" + (" gold |" if gold else ""),
        "|---|---:|---:|" + ("---:|" if gold else ""),
    ]
    for policy, point in points.items():
        cells = [f"{point.sqrt_kl:.3f}", f"{point.proxy:.3f}"]
        cells += [f"{point.gold:.3f}" if point.gold is not None else "–"] if gold else []
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def _chart(metrics: dict[str, dict[str, float]], keys: list[str], path: Path) -> None:
    """One small bar chart per metric, policies side by side in the same colours."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    policies = list(metrics)
    colours = [f"C{i}" for i in range(len(policies))]
    columns = 4
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        values = [metrics[policy][key] for policy in policies]
        ax.bar(policies, values, color=colours)
        ax.set_title(key, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)  # room for the value labels
        for x, value in enumerate(values):
            ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
