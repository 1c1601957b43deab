"""`rlhf report sweep`: the over-optimisation picture (tasks/overopt.py) across the DVC
experiments of a sweep, from the project's MLflow store.

An experiment is the finished runs tagged with one `rlhf.dvc_exp` and `rlhf.baseline`
(tasks/tracking.py); its point per policy is the metrics of the child run `evaluate/<policy>`
of its last finished evaluate run. Its params are those of its stage runs and of the training
runs those child runs name (`trained_params`, tasks/catalog.py) — every section, even of the
stages it did not rerun — and its baseline commit. Experiments are labelled by the params that
differ between them, `common.seed` aside: experiments that differ only in the seed are one point,
the mean ± the sample standard deviation (ddof 1) over them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import UserError
from tasks.overopt import GOLD_KEYS, Point, draw, end_point, picture
from tasks.stages import BEST_OF, MODELS_DIR, POLICIES, PREPARED_DIR, REPORTS_DIR, project_root

SEED = "common.seed"
BASELINE = "baseline"  # the pseudo-param of the baseline commit (its first 7 characters)
PARENT = "mlflow.parentRunId"


@dataclass(frozen=True)
class Experiment:
    name: str  # the DVC experiment's
    params: dict[str, str]  # flattened params.yaml keys, and BASELINE
    metrics: dict[str, dict[str, float]]  # policy → its evaluate metrics


@dataclass(frozen=True)
class Aggregate:
    label: str  # the params that differ, `k=v, …`
    policy: str
    seeds: int  # experiments averaged
    point: Point  # means, with their standard deviations as the spread


def command(out: Path, experiment: str | None, params_file: Path) -> int:
    """Read the store named by the params' `tracking` (or $MLFLOW_TRACKING_URI), draw `out`,
    write its table next to it (`.md`) and print the table."""
    import mlflow

    from tasks.params import load_params
    from tasks.tracking import tracking_uri

    _check_out(out)
    params = load_params(params_file, trainers=False)
    uri, name = tracking_uri(params.tracking), experiment or params.tracking.experiment
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"{uri}: no MLflow store; run the pipeline or a sweep first")
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    experiments = read_experiments(client, found.experiment_id) if found else []
    if not experiments:
        raise UserError(
            f"{uri}: experiment '{name}' has no finished evaluate run of a DVC experiment "
            "(tag rlhf.dvc_exp); run a sweep first, e.g. "
            "`dvc exp run --queue -S 'ppo.kl_coef=0.01,0.1,0.3' && dvc queue start`"
        )
    title = f"Gold and proxy against √KL to SFT: {len(experiments)} experiments of '{name}'"
    print("\n".join(write_sweep(experiments, out, title)))
    print(f"rlhf: wrote {out} and {out.with_suffix('.md')} ({len(experiments)} experiments)")
    return 0


def write_sweep(experiments: list[Experiment], out: Path, title: str) -> list[str]:
    """The picture of the experiments' points in `out`, its table (returned) in `out`.md."""
    groups = grouped(experiments)
    gold = next(
        (k for k in GOLD_KEYS if all(k in m for e in experiments for m in e.metrics.values())),
        None,
    )
    rows = [row for label, group in groups.items() for row in aggregate(label, group, gold)]
    series = []
    for label in groups:
        series += picture({r.policy: r.point for r in rows if r.label == label}, group=label)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(series, out, gold, title)
    table = markdown(rows, gold)
    notes = [f"- {label}: " + ", ".join(map(_named, group)) for label, group in groups.items()]
    text = [f"# {title}", "", f"![sweep]({out.name})", "", *table, "", "Experiments:", *notes, ""]
    out.with_suffix(".md").write_text("\n".join(text), encoding="utf-8")
    return table


def read_experiments(client: Any, experiment_id: str) -> list[Experiment]:
    """Every DVC experiment of the MLflow experiment with a finished evaluate run."""
    from tasks.tracking import DVC_EXP_TAGS

    tag, baseline_tag = DVC_EXP_TAGS
    runs = _search(client, experiment_id, f"tags.`{tag}` != '' and attributes.status = 'FINISHED'")
    by_experiment: dict[tuple[str, str], list[Any]] = {}
    for run in sorted(runs, key=lambda run: run.info.start_time):
        tags = run.data.tags
        if tag in tags and PARENT not in tags:
            by_experiment.setdefault((tags[tag], tags.get(baseline_tag, "")), []).append(run)
    found = []
    for (name, baseline), stage_runs in by_experiment.items():
        evaluations = [r for r in stage_runs if r.data.tags.get("rlhf.stage") == "evaluate"]
        if not evaluations:
            continue  # failed, or still running
        evaluate = evaluations[-1]
        children = _search(client, experiment_id, f"tags.`{PARENT}` = '{evaluate.info.run_id}'")
        earlier = [r for r in stage_runs if r.info.start_time <= evaluate.info.start_time]
        params: dict[str, str] = {}
        for run in (*children, *earlier):  # the later wins: evaluate's own params last
            params |= run.data.params
        metrics = {
            run.data.tags["rlhf.policy"]: dict(run.data.metrics)
            for run in children
            if run.info.status == "FINISHED" and "rlhf.policy" in run.data.tags
        }
        if metrics:
            found.append(Experiment(name, params | {BASELINE: baseline[:7]}, metrics))
    return found


def grouped(experiments: list[Experiment]) -> dict[str, list[Experiment]]:
    """Experiments by label: the params that differ between them but `common.seed`, in the
    order of their values (numbers as numbers). Only params.yaml's keys that every experiment
    logged count: the TRL trainers' own flat params (`learning_rate`, ...) collide between
    stages, and a stage that an experiment did not rerun has no run of its own to log them."""
    from tasks.params import Params

    sections = set(Params.model_fields)
    logged = set.intersection(*(set(e.params) for e in experiments)) - {SEED}
    keys = sorted(key for key in logged if key == BASELINE or key.split(".")[0] in sections)
    differ = [key for key in keys if len({e.params.get(key) for e in experiments}) > 1]
    groups: dict[str, list[Experiment]] = {}
    for one in sorted(experiments, key=lambda e: [_order(e.params.get(k)) for k in differ]):
        label = ", ".join(f"{key}={one.params.get(key, '–')}" for key in differ)
        groups.setdefault(label or "same params", []).append(one)
    return groups


def aggregate(label: str, group: list[Experiment], gold: str | None) -> list[Aggregate]:
    """Per policy of the group: the mean point over its experiments, each coordinate's sample
    standard deviation as the spread (0 for one experiment)."""
    import numpy as np

    policies = sorted({p for e in group for p in e.metrics}, key=_policy_order)
    rows = []
    for policy in policies:
        points = [end_point(e.metrics[policy], gold) for e in group if policy in e.metrics]
        columns = [[p.sqrt_kl for p in points], [p.proxy for p in points]]
        columns += [[p.gold for p in points]] if gold else []
        means = [float(np.mean(column)) for column in columns]
        spread = [float(np.std(column, ddof=1)) if len(points) > 1 else 0.0 for column in columns]
        point = Point(
            means[0],
            means[1],
            means[2] if gold else None,
            (spread[0], spread[1], spread[2] if gold else 0.0),
        )
        rows.append(Aggregate(label, policy, len(points), point))
    return rows


def markdown(rows: Iterable[Aggregate], gold: str | None) -> list[str]:
    """The table: label, policy, n seeds, √KL, proxy, gold (mean ± std when n > 1)."""
    header = ["label", "policy", "n seeds", "√KL", "proxy (reward_mean)"]
    header += [f"gold ({gold})"] if gold else []
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for row in rows:
        values = [row.point.sqrt_kl, row.point.proxy] + ([row.point.gold] if gold else [])
        spread = row.point.spread or (0.0, 0.0, 0.0)
        cells = [_cell(value, std, row.seeds) for value, std in zip(values, spread, strict=False)]
        lines.append(f"| {row.label} | {row.policy} | {row.seeds} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: float | None, std: float, seeds: int) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.3f} ± {std:.3f}" if seeds > 1 else f"{value:.3f}"


def _check_out(out: Path) -> None:
    """`out` is not inside what DVC owns: `dvc repro` would see the stage's output changed,
    rerun it and delete the picture (reports/ is evaluate's)."""
    root = project_root().resolve()
    for owned in (REPORTS_DIR, MODELS_DIR, PREPARED_DIR):
        if out.resolve().is_relative_to(root / owned):
            raise UserError(
                f"--out {out}: inside {owned}/, a DVC output; the next `dvc repro` would rerun "
                "its stage and delete it (write it elsewhere, e.g. sweep/overoptimisation.png)"
            )


def _search(client: Any, experiment_id: str, query: str) -> list[Any]:
    """Every run the query finds, page after page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        if not (token := page.token):
            return runs


def _order(value: str | None) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _policy_order(policy: str) -> tuple[int, int]:
    """The registry's order, then best-of-n by n."""
    if policy in POLICIES:
        return (POLICIES.index(policy), 0)
    return (len(POLICIES), int(policy.removeprefix(BEST_OF)) if policy.startswith(BEST_OF) else 0)


def _named(experiment: Experiment) -> str:
    seed = experiment.params.get(SEED)
    return f"{experiment.name} (seed {seed})" if seed is not None else experiment.name
