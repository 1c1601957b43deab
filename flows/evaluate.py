"""`evaluate`: every policy on the held-out prompts, side by side (DVC metrics, report, MLflow)."""

from __future__ import annotations

from flows.infra.handoff import stage
from tasks.evaluate import (
    answer,
    best_policy,
    check_policies,
    compare,
    publish,
    samples_table,
)
from tasks.generation import eval_prompts
from tasks.heldout import gold_scorer
from tasks.io import atomic_dir, write_json
from tasks.overopt import read_trajectories
from tasks.params import Params
from tasks.report import plot_rows, write_report
from tasks.stages import BEST_OF, METRICS_DIR, PLOTS_DIR, REPORTS_DIR
from tasks.tracking import prefect_markdown, stage_run


@stage("evaluate")
def evaluate(params: Params) -> dict[str, float]:
    """Generate and judge per policy, compare, report (with the training stages' held-out
    trajectories), register the best policy."""
    cfg = params.evaluate
    with stage_run("evaluate", params):
        check_policies(cfg.policies)
        prompts = eval_prompts(cfg.max_prompts)
        policies = [*cfg.policies, *(f"{BEST_OF}{n}" for n in cfg.best_of_n)]
        answers = {policy: answer(policy, params) for policy in policies}
        synthetic = params.data.source == "synthetic"
        gold = gold_scorer(params) if params.data.gold_reward_model else None  # a second RM
        metrics = compare(answers, prompts, synthetic, gold)
        best = best_policy(metrics)
        samples = samples_table(answers, prompts, cfg.num_samples_logged, synthetic)
        with atomic_dir(REPORTS_DIR) as reports:  # renamed into place only if publishing worked
            write_report(metrics, best, reports, read_trajectories(cfg.policies))
            publish(metrics, best, reports, samples, params)
        prefect_markdown("evaluate-report", (REPORTS_DIR / "evaluate.md").read_text())
        write_json(PLOTS_DIR / "evaluate.json", plot_rows(metrics))
        write_json(METRICS_DIR / "evaluate.json", metrics)
        key = "ground_truth_score" if synthetic else "reward_mean"
        return {f"{policy}.{key}": values[key] for policy, values in metrics.items()}
