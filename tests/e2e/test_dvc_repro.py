"""`dvc repro` on a copy of the repository: every stage runs, then nothing re-runs, then a param
change re-runs exactly what it should. Small params keep it to a few minutes on a CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import write_params
from tests.sizes import SMALL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
# Small sizes for every stage; a key is only set when its section is in params.yaml (stages come
# and go). `<stage>.trainer` keys are TRL config fields, so max_steps may be added there.
E2E: dict[str, Any] = {
    **SMALL,
    **{
        f"{stage}.trainer.{key}": value
        for stage in ("sft", "reward_model", "dpo", "simpo")
        for key, value in {"num_train_epochs": 1, "max_steps": 3, "logging_steps": 1}.items()
    },
    "ppo.num_iterations": 2,
    "ppo.rollout_batch_size": 16,
    "ppo.mini_batch_size": 8,
    "ppo.ppo_epochs": 1,
    "ppo.max_new_tokens": 8,
    "ppo.checkpoint_every": 1,
    "ppo.sample_every": 1,
    "evaluate.max_prompts": 16,
    "evaluate.max_new_tokens": 8,
    "evaluate.num_samples_logged": 4,
}


def _yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def _paths(entries: list[Any] | None) -> list[str]:
    return [p for e in entries or [] for p in (e if isinstance(e, dict) else [e])]


def _settable(tree: dict[str, Any], dotted: str) -> bool:
    """`dotted` exists in `tree`, or is a new key of a `trainer:` mapping that exists."""
    parts = dotted.split(".")
    if len(parts) > 1 and parts[-2] == "trainer":
        parts = parts[:-1]
    for key in parts:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def _files(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=repo, check=True, capture_output=True
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def _mtimes(repo: Path, paths: list[str]) -> dict[str, int]:
    """mtime (ns) of every file and directory at or below `paths`."""
    found = {}
    for rel in paths:
        root = repo / rel
        for path in [root, *(sorted(root.rglob("*")) if root.is_dir() else [])]:
            found[str(path.relative_to(repo))] = path.stat().st_mtime_ns
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> dict[str, Any]:
    """A git + DVC copy of the repository (committed and uncommitted-but-not-ignored files),
    minus any stage output and dvc.lock, with small params and its own MLflow store.

    Stages report to the session's Prefect test server: an ephemeral server per `rlhf stage`
    process costs ~20 s of start-up each, which would dominate this test."""
    import prefect.settings

    root = tmp_path_factory.mktemp("e2e")
    repo = root / "repo"
    stages = _yaml(REPO / "dvc.yaml")["stages"]
    generated = {"dvc.lock"} | {
        out
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for out in _paths(stage.get(key))
    }
    names = set(_files(REPO)) | set(_files(REPO, "--others", "--exclude-standard"))
    for name in sorted(names):
        source = REPO / name
        if not source.is_file() or any(name == g or name.startswith(g + "/") for g in generated):
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, repo / name)

    params = _yaml(REPO / "params.yaml")
    write_params(repo / "params.yaml", {k: v for k, v in E2E.items() if _settable(params, k)})

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "MLFLOW_", "RLHF_", "DVC_", "GIT_"))
    }
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(repo),  # the copy's flows/ and tasks/, not the editable install's
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
        "HF_HUB_OFFLINE": "1",
        "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=env, check=True)
    return {"repo": repo, "root": root, "env": env, "stages": stages}


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

    # 1. a fresh copy: every stage runs
    first = dvc(project, "repro")
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


def _downstream(project: dict[str, Any], name: str) -> set[str]:
    """`name` and every stage that depends, directly or not, on its outputs."""
    found = {name}
    grew = True
    while grew:
        grew = False
        made = [out for stage in found for out in outputs(project, stage)]
        for other, stage in project["stages"].items():
            deps = _paths(stage.get("deps"))
            if other not in found and any(
                dep == out or dep.startswith(f"{out}/") or out.startswith(f"{dep}/")
                for dep in deps
                for out in made
            ):
                found.add(other)
                grew = True
    return found


def test_a_dpo_param_change_reruns_only_dpo(project: dict[str, Any]):
    repo, stages = project["repo"], project["stages"]

    # every stage up to date with the committed small params; after the test above (which left
    # a prepare experiment in the workspace) DVC's run cache restores the outputs, no training
    _git(repo, "checkout", "--", "params.yaml")
    dvc(project, "repro")
    assert dvc_json(project, "status") == {}

    rerun = _downstream(project, "dpo")
    kept = sorted(set(stages) - rerun)
    assert {"prepare", "sft", "reward_model", "simpo"} <= set(kept)
    kept_outputs = [path for name in kept for path in outputs(project, name)]
    lock_before = _yaml(repo / "dvc.lock")["stages"]
    mtimes_before = _mtimes(repo, kept_outputs)
    dpo_metrics_before = json.loads((repo / "metrics" / "dpo.json").read_text())
    runs_before = len(mlflow_runs(project))

    yaml = YAML()
    tree = yaml.load(repo / "params.yaml")
    beta = tree["dpo"]["trainer"]["beta"] * 2
    tree["dpo"]["trainer"]["beta"] = beta
    with (repo / "params.yaml").open("w") as out:
        yaml.dump(tree, out)
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
