"""Reward over-optimisation as Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization",
Fig. 1) draw it: gold and proxy reward against √KL from the start policy (SFT).

The proxy is the reward model's raw score (evaluate's `reward_mean`, the stages' `heldout/proxy`);
the gold is what it stands for: a gold reward model's score when `data.gold_reward_model` names
one (`gold_reward`), else the task's ground truth (`ground_truth_score`) — the same choice as the
stages' `heldout/gold` (tasks/heldout.py). One picture, two uses: `evaluate` draws one pipeline
(reports/overoptimisation.png: the training trajectories, the best-of-n curve, every policy's end
point), `rlhf report sweep` many experiments (tasks/sweep.py: end points, mean ± std over seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks.stages import BEST_OF, HELD_OUT, PLOTS_DIR, POLICIES

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GOLD_KEYS = ("gold_reward", "ground_truth_score")
"""evaluate's gold metrics, by preference (a named gold reward model wins, as in heldout/gold)."""
BEST_OF_N = "best-of-n"
"""The series of SFT and its `bon@<n>` policies, joined by increasing n."""
MARKERS = "osD^v<>pP*Xh"  # one per group of a sweep
Kind = Literal["trajectory", "curve", "end"]


@dataclass(frozen=True)
class Point:
    sqrt_kl: float
    proxy: float
    gold: float | None = None
    spread: tuple[float, float, float] | None = None
    """Standard deviations of (√KL, proxy, gold) over the seeds a sweep's point averages."""


@dataclass(frozen=True)
class Series:
    """What the picture draws in one colour (its policy's) and marker (its group's)."""

    policy: str  # a policy, or BEST_OF_N
    kind: Kind  # trajectory: a line of held-out evaluations; curve: SFT → bon@n; end: a marker
    points: tuple[Point, ...]
    names: tuple[str, ...] = ()  # a note beside each point (the curve's sft, n)
    group: str = ""  # a sweep's label (the params that differ); "" for one pipeline


def gold_key(metrics: Mapping[str, float]) -> str | None:
    """The gold metric among a policy's evaluate metrics, None without one."""
    return next((key for key in GOLD_KEYS if key in metrics), None)


def end_point(metrics: Mapping[str, float], gold: str | None) -> Point:
    """A policy's point from its evaluate metrics: √kl_to_sft, reward_mean, the gold."""
    value = metrics.get(gold) if gold else None
    return Point(math.sqrt(metrics["kl_to_sft"]), metrics["reward_mean"], value)


def read_trajectories(policies: Sequence[str]) -> dict[str, tuple[Point, ...]]:
    """The held-out evaluations (heldout/kl, heldout/proxy, heldout/gold) in plots/<stage>.json
    of each listed stage that makes them, in step order. A stage without any (`eval_every:
    null`, or no file) has none: the picture shows its end point only."""
    found = {}
    for stage in (name for name in HELD_OUT if name in policies):
        path = PLOTS_DIR / f"{stage}.json"
        rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        rows = sorted(
            (row for row in rows if "heldout/kl" in row),
            key=lambda row: row.get("step", row.get("iteration", 0)),
        )
        if rows:
            found[stage] = tuple(
                Point(math.sqrt(row["heldout/kl"]), row["heldout/proxy"], row.get("heldout/gold"))
                for row in rows
            )
    return found


def picture(
    points: Mapping[str, Point],
    trajectories: Mapping[str, tuple[Point, ...]] | None = None,
    group: str = "",
) -> list[Series]:
    """The series of one pipeline (or one group of a sweep): each trajectory, the best-of-n
    curve (SFT, then bon@n by increasing n), and every policy but best-of-n as an end point."""
    drawn = [Series(p, "trajectory", t, group=group) for p, t in (trajectories or {}).items()]
    ns = sorted(int(p.removeprefix(BEST_OF)) for p in points if p.startswith(BEST_OF))
    if ns and "sft" in points:
        curve = ("sft", *(f"{BEST_OF}{n}" for n in ns))
        names = ("sft", *(str(n) for n in ns))
        drawn.append(Series(BEST_OF_N, "curve", tuple(points[p] for p in curve), names, group))
    drawn += [
        Series(p, "end", (point,), group=group)
        for p, point in points.items()
        if not p.startswith(BEST_OF)
    ]
    return drawn


def _rank(policy: str) -> int:
    """A policy's place in legends, and its colour: the registry's order, then best-of-n."""
    order = (*POLICIES, BEST_OF_N)
    return order.index(policy) if policy in order else len(order)


def colour(policy: str) -> str:
    """The same colour for a policy in every picture (matplotlib's default cycle)."""
    return f"C{_rank(policy) % 10}"


def draw(series: Sequence[Series], path: Path, gold: str | None, title: str) -> None:
    """Gold | proxy against √KL, side by side on one x axis (proxy alone without a gold):
    trajectories as thin lines, the best-of-n curve as a line through its points, end points
    as large markers, error bars where a point has a spread; colour = policy, marker = group."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [("gold", f"gold ({gold})")] if gold else []
    panels.append(("proxy", "proxy (reward_mean)"))
    groups = list(dict.fromkeys(s.group for s in series))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.6, 4.4))
    for ax, (field, label) in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
        for one in series:
            _plot(ax, one, field, MARKERS[groups.index(one.group) % len(MARKERS)])
        ax.set_xlabel("√KL to SFT (√nats per response)")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
    present = {s.policy for s in series}
    handles = [
        Line2D([], [], color=colour(p), marker="o", mec="black", mew=0.5, ls="", label=p)
        for p in sorted(present, key=_rank)
    ]
    if any(s.kind == "trajectory" for s in series):  # then end points need telling apart
        handles += [
            Line2D([], [], color="grey", marker="o", ls="", label="evaluate (end point)"),
            Line2D([], [], color="grey", lw=1.2, label="training (held-out evaluations)"),
        ]
    if len(groups) > 1:
        handles += [
            Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], ls="", label=name)
            for i, name in enumerate(groups)
        ]
    figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1 - 2.4 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot(ax: Axes, series: Series, field: str, marker: str) -> None:
    """One series on one panel; points without a gold are left out of the gold panel."""
    names = series.names or ("",) * len(series.points)
    shown = [
        (p, name)
        for p, name in zip(series.points, names, strict=True)
        if getattr(p, field) is not None
    ]
    if not shown:
        return
    xs = [p.sqrt_kl for p, _ in shown]
    ys = [getattr(p, field) for p, _ in shown]
    if series.kind == "trajectory":
        ax.plot(xs, ys, "-", color=colour(series.policy), lw=1.2, alpha=0.7, marker=".", ms=3)
        return
    errors = {}
    if all(p.spread for p, _ in shown):
        column = 2 if field == "gold" else 1
        errors = {
            "xerr": [p.spread[0] for p, _ in shown],
            "yerr": [p.spread[column] for p, _ in shown],
        }
    ax.errorbar(
        xs,
        ys,
        fmt="-" if series.kind == "curve" else "",
        color=colour(series.policy),
        marker=marker,
        ms=5 if series.kind == "curve" else 8,
        mec="black",
        mew=0.5,
        capsize=2,
        **errors,
    )
    for (point, name), y in zip(shown, ys, strict=True):
        if name:
            ax.annotate(
                name, (point.sqrt_kl, y), xytext=(4, -10), textcoords="offset points", fontsize=7
            )
