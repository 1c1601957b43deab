"""`dvc repro` on a copy of the repository: every stage runs, then nothing re-runs, then a param
change re-runs exactly what it should. The run is the package's (tests/e2e/conftest.py), at
sizes where every stage learns (test_learning.py reads what it learnt)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from flows.infra.deployment import BIN
from flows.infra.services import free_port, stop_recorded
from flows.infra.testing import (
    Services,
    services,
    upstream,
    wait_http,
    write_params,
)
from tasks.evaluate import base_policy
from tasks.io import md5
from tasks.stages import POLICIES, STAGES

pytestmark = pytest.mark.slow


def _yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def _paths(entries: list[Any] | None) -> list[str]:
    return [p for e in entries or [] for p in (e if isinstance(e, dict) else [e])]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def _mtimes(repo: Path, paths: list[str]) -> dict[str, int]:
    """mtime (ns) of every file and directory at or below `paths`."""
    found = {}
    for rel in paths:
        root = repo / rel
        for path in [root, *(sorted(root.rglob("*")) if root.is_dir() else [])]:
            found[str(path.relative_to(repo))] = path.stat().st_mtime_ns
    return found


def dvc(project: dict[str, Any], *args: str, timeout: float = 900) -> str:
    """Run dvc in the copy; fail the test with its output on a non-zero exit. → stdout+stderr"""
    done = _dvc(project, *args, timeout=timeout)
    return done.stdout + done.stderr


def dvc_json(project: dict[str, Any], *args: str) -> Any:
    """`dvc <args> --json`, parsed from stdout alone (warnings go to stderr)."""
    return json.loads(_dvc(project, *args, "--json").stdout or "{}")


def _dvc(
    project: dict[str, Any], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=project["repo"],
        env=project["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        print(output)
        pytest.fail(f"dvc {' '.join(args)} exited {done.returncode}:\n{output[-6000:]}")
    return done


def mlflow_runs(project: dict[str, Any]) -> list[Any]:
    """The stage runs, oldest first (not evaluate's per-policy child runs)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=project["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("rlhf")
    if experiment is None:
        return []
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [run for run in found if "mlflow.parentRunId" not in run.data.tags]


def outputs(project: dict[str, Any], name: str | None = None) -> list[str]:
    stages = project["stages"] if name is None else {name: project["stages"][name]}
    return [
        path
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for path in _paths(stage.get(key))
    ]


def test_repro_runs_every_stage_then_nothing_then_what_changed(project: dict[str, Any]):
    repo, stages = project["repo"], project["stages"]

    # 1. a fresh copy: every stage ran (tests/e2e/conftest.py: project)
    first = project["output"]
    for name in stages:
        assert f"Running stage '{name}'" in first, first
    for path in outputs(project):
        assert (repo / path).exists(), f"{path} missing after dvc repro"
    for name, stage in stages.items():
        for path in _paths(stage.get("metrics")):
            metrics = json.loads((repo / path).read_text())
            assert metrics, path
            values = [  # evaluate's metrics are per policy: {policy: {metric: value}}
                v for x in metrics.values() for v in (x.values() if isinstance(x, dict) else [x])
            ]
            assert values and all(isinstance(v, (int, float)) for v in values), path
        assert json.loads((repo / "metrics" / f"{name}.json").read_text())
    lock = _yaml(repo / "dvc.lock")["stages"]
    assert set(lock) == set(stages)
    for name in stages:
        locked_outs = {out["path"] for out in lock[name].get("outs", [])}
        assert set(outputs(project, name)) == locked_outs, name
    assert dvc_json(project, "status") == {}

    # MLflow: one finished run per stage, one pipeline id, the copy's commit, upstream hashes
    runs = mlflow_runs(project)
    assert sorted(r.info.run_name for r in runs) == sorted(stages)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["rlhf.pipeline_id"] for r in runs}) == 1
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert {r.data.tags["mlflow.source.git.commit"] for r in runs} == {head}
    produced = {out["path"]: out["md5"] for s in lock.values() for out in s.get("outs", [])}
    for run in runs:
        for dep in _paths(stages[run.info.run_name].get("deps")):
            if dep in produced:
                assert run.data.tags[f"dvc.dep.{dep}"] == produced[dep], (run.info.run_name, dep)

    with services(project["root"] / "server-logs") as started:
        what_users_compare(project, started, lock, runs)

    # 2. nothing changed: nothing runs, no output is touched
    before = _mtimes(repo, outputs(project))
    second = dvc(project, "repro")
    assert "Running stage" not in second, second
    for name in stages:
        assert f"Stage '{name}' didn't change, skipping" in second, second
    assert "Data and pipelines are up to date" in second
    assert _mtimes(repo, outputs(project)) == before
    assert len(mlflow_runs(project)) == len(runs)
    assert dvc_json(project, "status") == {}

    # 3. one prepare param changes: prepare re-runs (as a DVC experiment), with the new value
    old_data = (repo / "data" / "prepared" / "sft" / "train.jsonl").read_text()
    third = dvc(project, "exp", "run", "-S", "data.synthetic.polite_rate=0.5", "prepare")
    assert "Running stage 'prepare'" in third, third
    assert (repo / "data" / "prepared" / "sft" / "train.jsonl").read_text() != old_data
    assert _yaml(repo / "params.yaml")["data"]["synthetic"]["polite_rate"] == 0.5
    locked = _yaml(repo / "dvc.lock")["stages"]["prepare"]["params"]["params.yaml"]
    assert locked["data"]["synthetic"]["polite_rate"] == 0.5
    after = mlflow_runs(project)
    assert len(after) == len(runs) + 1
    rerun = after[-1]
    assert rerun.info.run_name == "prepare"
    assert rerun.info.status == "FINISHED"
    assert rerun.data.params["data.synthetic.polite_rate"] == "0.5"
    assert rerun.data.tags["rlhf.pipeline_id"] != runs[0].data.tags["rlhf.pipeline_id"]
    # prepare is up to date again; only stages downstream of it (if any) are stale
    status = dvc_json(project, "status")
    assert "prepare" not in status
    assert set(status) <= set(stages) - {"prepare"}


def what_users_compare(
    project: dict[str, Any], processes: Services, lock: dict[str, Any], runs: list[Any]
) -> None:
    """The pipeline's store served by a real `mlflow server`, read through the REST client:
    what the UI needs for comparing runs (issue [5/5])."""
    import mlflow
    from prefect.artifacts import Artifact

    repo, port = project["repo"], free_port()
    env = {k: v for k, v in project["env"].items() if not k.startswith("MLFLOW_")}
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri"]
    command += [project["env"]["MLFLOW_TRACKING_URI"], "--host", "127.0.0.1"]
    server = processes.start(
        "mlflow-server",
        [*command, "--port", str(port), "--workers", "1"],
        cwd=project["root"],
        env=env | {"MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", server)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rlhf")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    by_name = {run.info.run_name: client.get_run(run.info.run_id) for run in runs}
    outs = {out["path"]: out["md5"] for s in lock.values() for out in s.get("outs", [])}
    for spec in STAGES:
        run = by_name[spec.name]
        inputs = {i.tags[0].value if i.tags else "": i.dataset for i in run.inputs.dataset_inputs}
        if spec.kind in ("trl", "ppo"):  # its data, digest = DVC's md5 of the file
            for split in ("train", "eval"):
                path = repo / "data" / "prepared" / str(spec.dataset) / f"{split}.jsonl"
                assert inputs[split].digest == md5(path), (spec.name, split)
            models = client.search_logged_models(
                [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
            )
            assert [m.tags["dvc.md5"] for m in models] == [outs[f"models/{spec.name}"]], spec.name
            system = [k for k in run.data.metrics if k.startswith("system/")]
            assert "system/cpu_utilization_percentage" in system, spec.name
    children = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{by_name['evaluate'].info.run_id}'",
    )
    assert len(children) == len(POLICIES) + 1  # and bon@2, best of 2 samples of SFT
    for child in children:
        policy = base_policy(child.data.tags["rlhf.policy"])
        trained = by_name[policy]
        assert child.data.params == trained.data.params, policy  # what produced it
        assert child.data.tags["rlhf.trained_by_run"] == trained.info.run_id
        assert child.data.tags["dvc.md5"] == outs[f"models/{policy}"]
        assert child.data.tags["rlhf.pipeline_id"] == trained.data.tags["rlhf.pipeline_id"]
    report = Artifact.get("evaluate-report")  # the table, in the Prefect UI too
    assert report is not None and report.data == (repo / "reports" / "evaluate.md").read_text()


def test_a_dpo_param_change_reruns_only_dpo(project: dict[str, Any]):
    repo, stages = project["repo"], project["stages"]

    # every stage up to date with the committed small params; after the test above (which left
    # a prepare experiment in the workspace) DVC's run cache restores the outputs, no training
    _git(repo, "checkout", "--", "params.yaml")
    dvc(project, "repro")
    assert dvc_json(project, "status") == {}

    rerun = {"dpo"} | {spec.name for spec in STAGES if "dpo" in upstream(spec.name)}
    kept = sorted(set(stages) - rerun)
    assert {"prepare", "sft", "reward_model", "simpo"} <= set(kept)
    kept_outputs = [path for name in kept for path in outputs(project, name)]
    lock_before = _yaml(repo / "dvc.lock")["stages"]
    mtimes_before = _mtimes(repo, kept_outputs)
    dpo_metrics_before = json.loads((repo / "metrics" / "dpo.json").read_text())
    runs_before = len(mlflow_runs(project))

    beta = _yaml(repo / "params.yaml")["dpo"]["trainer"]["beta"] * 2
    write_params(repo / "params.yaml", {"dpo.trainer.beta": beta}, base=repo / "params.yaml")
    assert set(dvc_json(project, "status")) == {"dpo"}

    output = dvc(project, "repro")
    assert set(re.findall(r"Running stage '([^']+)'", output)) == rerun, output
    for name in kept:
        assert f"Stage '{name}' didn't change, skipping" in output, output
    assert _mtimes(repo, kept_outputs) == mtimes_before
    lock = _yaml(repo / "dvc.lock")["stages"]
    assert {name: lock[name] for name in kept} == {name: lock_before[name] for name in kept}
    assert lock["dpo"]["params"]["params.yaml"]["dpo"]["trainer"]["beta"] == beta
    assert json.loads((repo / "metrics" / "dpo.json").read_text()) != dpo_metrics_before
    assert dvc_json(project, "status") == {}

    new_runs = mlflow_runs(project)[runs_before:]
    assert sorted(r.info.run_name for r in new_runs) == sorted(rerun)
    assert {r.info.status for r in new_runs} == {"FINISHED"}
    (dpo_run,) = [r for r in new_runs if r.info.run_name == "dpo"]
    assert float(dpo_run.data.params["dpo.trainer.beta"]) == beta


def test_code_edits_make_stale_only_the_stages_that_run_that_code(project: dict[str, Any]):
    """dvc.yaml's code deps follow the imports: an edit of PPO's losses makes only `ppo` stale
    (evaluate imports nothing of tasks/ppo/; it reruns only if models/ppo changes), and an edit
    of the registry or the params reader makes nothing stale."""
    repo = project["repo"]
    _git(repo, "checkout", "--", "params.yaml")
    dvc(project, "repro")
    assert dvc_json(project, "status") == {}
    edits = {"tasks/ppo/losses.py": {"ppo"}, "tasks/stages.py": set(), "tasks/params.py": set()}
    for path, stale in edits.items():
        original = (repo / path).read_text()
        (repo / path).write_text(original + "\n# an edit\n")
        try:
            assert set(dvc_json(project, "status")) == stale, path
        finally:
            (repo / path).write_text(original)
    assert dvc_json(project, "status") == {}


def test_queued_experiments_log_to_the_project(project: dict[str, Any]):
    """`dvc exp run --queue` twice and `dvc queue start -j 2`, with the defaults a user has (no
    MLFLOW_TRACKING_URI, no PREFECT_API_URL): each experiment runs in a copy under
    `.dvc/tmp/exps/` that DVC deletes, yet every stage run lands in the project's `mlflow.db`
    tagged with its experiment and baseline, its artifacts under the project's `mlruns/`, its
    flow runs in the project's one shared Prefect server; nothing of theirs outlives the queue."""
    import mlflow

    repo = project["repo"]
    _git(repo, "checkout", "--", "params.yaml")
    dvc(project, "repro")
    _git(repo, "add", "dvc.lock", "params.yaml")
    _git(repo, "commit", "-qm", "baseline", "--allow-empty")
    baseline = _git(repo, "rev-parse", "HEAD").strip()
    stop_recorded(repo / ".rlhf")  # the earlier tests' warm process: the queue starts its own
    user = {
        k: v
        for k, v in project["env"].items()
        if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    }
    user |= {"RLHF_PREFECT_IDLE_S": "3", "RLHF_WARM_IDLE_S": "3"}
    queue = {**project, "env": user}
    for name, beta in (("beta-a", 0.15), ("beta-b", 0.3)):
        short = "+dpo.trainer.max_steps=8"  # a new trainer key (+): the queue is the point here
        dvc(
            queue,
            "exp",
            "run",
            "--queue",
            "-n",
            name,
            "-S",
            f"dpo.trainer.beta={beta}",
            "-S",
            short,
        )
    dvc(queue, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", status := dvc(queue, "queue", "status")):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    logs = "".join(dvc(queue, "queue", "logs", name) for name in ("beta-a", "beta-b"))
    assert status.count("Success") == 2, status + logs
    assert "database is locked" not in logs and "Traceback" not in logs, logs

    store = repo / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("rlhf")
    assert Path(experiment.artifact_location.removeprefix("file://")) == repo / "mlruns"
    runs = client.search_runs([experiment.experiment_id], "tags.`rlhf.dvc_exp` != ''")
    rerun = {"dpo"} | {spec.name for spec in STAGES if "dpo" in upstream(spec.name)}
    for name in ("beta-a", "beta-b"):
        ours = [r for r in runs if r.data.tags["rlhf.dvc_exp"] == name]
        stage_runs = [r for r in ours if "mlflow.parentRunId" not in r.data.tags]
        assert sorted(r.info.run_name for r in stage_runs) == sorted(rerun), name
        assert {r.info.status for r in ours} == {"FINISHED"}
        assert {r.data.tags["rlhf.baseline"] for r in ours} == {baseline}
        assert ".dvc/tmp/exps/" in stage_runs[0].data.tags["rlhf.workdir"]
    # One shared Prefect server for both experiments, its database in the project's .rlhf/.
    with sqlite3.connect(repo / ".rlhf" / "prefect-server.db") as db:
        flow_runs = {
            name
            for (name,) in db.execute(
                "select flow.name from flow_run join flow on flow.id = flow_run.flow_id"
            )
        }
    assert rerun <= flow_runs
    # nothing keeps running: the shared server and the warm process stop once idle
    gone = time.monotonic() + 60
    for pid_file in ("prefect-server.pid", "warm.pid"):
        while (repo / ".rlhf" / pid_file).exists():
            assert time.monotonic() < gone, f"{pid_file}: still running after the queue"
            time.sleep(1)
