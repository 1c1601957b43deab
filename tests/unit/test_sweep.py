"""`rlhf report sweep` (tasks/sweep.py) on a real SQLite MLflow store made here, with runs logged
as the stages log them: per DVC experiment a stage run (tags rlhf.stage, rlhf.dvc_exp,
rlhf.baseline; its flattened params) and an evaluate run whose child runs `evaluate/<policy>`
carry the policy's metrics and the params of the run that trained it. The picture gets one point
per experiment and policy, labelled by the param that differs; experiments that differ only in
`common.seed` are one point, numpy's mean and sample standard deviation over them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.infra.cli import main
from tasks import sweep
from tasks.errors import UserError
from tasks.overopt import Point, Series
from tests.unit.test_overopt import record_draws

BASELINE = "0123456789abcdef0123456789abcdef01234567"
POLICIES = ("sft", "ppo", "dpo", "bon@4")
EXPERIMENT = "rlhf"  # params.yaml's tracking.experiment


def _metrics(kl_coef: float, seed: int) -> dict[str, dict[str, float]]:
    """Made-up evaluate metrics of each policy that depend on the experiment's params."""
    shift = seed / 16
    return {
        "sft": {"kl_to_sft": 0.0, "reward_mean": -1.0 + shift, "ground_truth_score": 0.5},
        "ppo": {
            "kl_to_sft": 0.5 / kl_coef + shift,
            "reward_mean": 5.0 - kl_coef + shift,
            "ground_truth_score": 0.6 + kl_coef - shift / 4,
        },
        "dpo": {"kl_to_sft": 2.0 + shift, "reward_mean": 4.0, "ground_truth_score": 0.8 + shift},
        "bon@4": {"kl_to_sft": 0.636, "reward_mean": 2.5 + shift, "ground_truth_score": 0.55},
    }


def log_experiment(
    name: str, kl_coef: float, seed: int, status: str = "FINISHED", dvc_exp: bool = True
) -> dict[str, dict[str, float]]:
    """The runs of one `dvc exp run -S ppo.kl_coef=… -S common.seed=…`: ppo and evaluate
    (with its child runs) as the stages log them; the metrics logged."""
    import mlflow

    mlflow.set_experiment(EXPERIMENT)
    tags = {"rlhf.dvc_exp": name, "rlhf.baseline": BASELINE} if dvc_exp else {}
    common = {"common.seed": seed, "model.dtype": "float32"}
    trained = common | {"ppo.kl_coef": kl_coef, "ppo.num_iterations": 40}
    with mlflow.start_run(run_name="ppo", tags=tags | {"rlhf.stage": "ppo"}):
        mlflow.log_params(trained)
    metrics = _metrics(kl_coef, seed)
    with mlflow.start_run(run_name="evaluate", tags=tags | {"rlhf.stage": "evaluate"}):
        mlflow.log_params(common | {"evaluate.max_prompts": 64})
        for policy, values in metrics.items():
            child = {"rlhf.stage": "evaluate", "rlhf.policy": policy}
            with mlflow.start_run(run_name=f"evaluate/{policy}", nested=True, tags=child):
                mlflow.log_params(trained if policy == "ppo" else common)
                mlflow.log_metrics(values)
        if status != "FINISHED":
            mlflow.end_run(status)
    return metrics


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    return record_draws(monkeypatch, sweep)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite MLflow store with its tables and no runs, made once (seconds of migrations)."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def params_file(workdir: Path, make_params) -> Path:
    """Default params: the store is $MLFLOW_TRACKING_URI, workdir's SQLite file."""
    return make_params()


@pytest.fixture
def store(workdir: Path, empty_store: Path) -> Path:
    shutil.copy(empty_store, workdir / "mlflow.db")
    return workdir / "mlflow.db"


def _points(series: list[Series], policy: str) -> dict[str, Point]:
    """{group label: the policy's end point}."""
    return {s.group: s.points[0] for s in series if s.kind == "end" and s.policy == policy}


def _expected(values: dict[str, float]) -> Point:
    return Point(
        math.sqrt(values["kl_to_sft"]),
        values["reward_mean"],
        values["ground_truth_score"],
        (0.0, 0.0, 0.0),
    )


def test_two_experiments_draw_a_point_each(
    workdir: Path, store: Path, params_file: Path, drawn: list[dict[str, Any]], capsys
) -> None:
    log_experiment("before", 0.05, 42, dvc_exp=False)  # a plain `dvc repro`: not in the sweep
    low = log_experiment("exp-low", 0.01, 42)
    high = log_experiment("exp-high", 0.3, 42)
    log_experiment("exp-broken", 0.1, 42, status="FAILED")
    out = workdir / "sweep" / "overoptimisation.png"
    assert sweep.command(out, None, params_file) == 0

    (call,) = drawn
    assert call["path"] == out and call["gold"] == "ground_truth_score"
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    labels = ["ppo.kl_coef=0.01", "ppo.kl_coef=0.3"]  # the one param that differs, in order
    for policy in ("sft", "ppo", "dpo"):
        assert _points(call["series"], policy) == {
            labels[0]: _expected(low[policy]),
            labels[1]: _expected(high[policy]),
        }
    curves = [s for s in call["series"] if s.kind == "curve"]
    assert [s.group for s in curves] == labels
    assert curves[0].points == (_expected(low["sft"]), _expected(low["bon@4"]))

    table = (out.with_suffix(".md")).read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ppo.kl_coef")]
    assert len(rows) == 2 * len(POLICIES)
    assert f"| {labels[0]} | ppo | 1 | {math.sqrt(low['ppo']['kl_to_sft']):.3f} |" in table
    assert "exp-low (seed 42)" in table and "before" not in table and "broken" not in table
    assert rows[0] in capsys.readouterr().out  # printed too


def test_seeds_are_one_point_with_numpys_mean_and_std(
    workdir: Path, store: Path, params_file: Path, drawn: list[dict[str, Any]]
) -> None:
    seeds = (1, 2, 3)
    logged = [log_experiment(f"seed-{seed}", 0.1, seed) for seed in seeds]
    alone = log_experiment("other", 0.3, 1)
    sweep.command(workdir / "sweep.png", None, params_file)

    (call,) = drawn
    for policy in POLICIES:
        points = _points(call["series"], policy) if policy != "bon@4" else {}
        if not points:
            continue  # best-of-n is on the curves
        assert set(points) == {"ppo.kl_coef=0.1", "ppo.kl_coef=0.3"}
        assert points["ppo.kl_coef=0.3"] == _expected(alone[policy])
        point = points["ppo.kl_coef=0.1"]
        columns = [
            [math.sqrt(m[policy]["kl_to_sft"]) for m in logged],
            [m[policy]["reward_mean"] for m in logged],
            [m[policy]["ground_truth_score"] for m in logged],
        ]
        means = [float(np.mean(column)) for column in columns]
        stds = [float(np.std(column, ddof=1)) for column in columns]
        assert [point.sqrt_kl, point.proxy, point.gold] == pytest.approx(means, abs=1e-12)
        assert list(point.spread) == pytest.approx(stds, abs=1e-12)
    table = (workdir / "sweep.md").read_text(encoding="utf-8")
    row = next(line for line in table.splitlines() if line.startswith("| ppo.kl_coef=0.1 | ppo |"))
    assert row.split("|")[3].strip() == "3"  # n seeds
    assert " ± " in row
    assert "seed-1 (seed 1), seed-2 (seed 2), seed-3 (seed 3)" in table


def test_only_params_yaml_keys_every_experiment_logged_label_a_point(
    workdir: Path, store: Path, params_file: Path, drawn: list[dict[str, Any]]
) -> None:
    """A TRL trainer logs its config's flat fields (`learning_rate`, shared by every TRL
    stage); a stage one experiment reran and the other restored from DVC's cache logged them
    in one only. Neither splits the label, which stays the swept param."""
    import mlflow

    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(
        run_name="dpo",
        tags={"rlhf.stage": "dpo", "rlhf.dvc_exp": "exp-low", "rlhf.baseline": BASELINE},
    ):
        mlflow.log_params({"learning_rate": 5e-5, "dpo.trainer.beta": 0.1})
    low = log_experiment("exp-low", 0.01, 42)
    high = log_experiment("exp-high", 0.3, 42)
    sweep.command(workdir / "sweep.png", None, params_file)

    (call,) = drawn
    assert _points(call["series"], "ppo") == {
        "ppo.kl_coef=0.01": _expected(low["ppo"]),
        "ppo.kl_coef=0.3": _expected(high["ppo"]),
    }


def test_no_experiments_is_one_error_line(
    workdir: Path, empty_store: Path, params_file: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["report", "sweep", "--params", str(params_file)]
    assert main(args) == 1  # no store yet
    assert capsys.readouterr().err.startswith("rlhf: error: sqlite:///")
    shutil.copy(empty_store, workdir / "mlflow.db")
    log_experiment("before", 0.05, 42, dvc_exp=False)
    log_experiment("exp-broken", 0.1, 42, status="FAILED")
    capsys.readouterr()  # MLflow's own log lines while the store was made
    assert main([*args, "--experiment", EXPERIMENT]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and "no finished evaluate run of a DVC experiment" in errors[0]
    with pytest.raises(UserError, match="reports/, a DVC output"):
        sweep.command(workdir / "reports" / "sweep.png", None, params_file)
