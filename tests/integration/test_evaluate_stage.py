"""The `evaluate` stage on tiny models: its DVC outputs (metrics, report, plots), its MLflow runs
(stage run, one child run per policy, artifacts, the registered best policy), a listed but
missing policy as a clear error, determinism, and `rlhf generate`.

Inputs are built once: `prepare` with the small sizes, models/sft = the random base model,
models/reward_model = a 1-label classifier on it (as in test_ppo_stage), models/ppo = an exact
copy of sft (so its metrics must equal sft's), models/dpo and models/simpo = re-initialised copies
(so that they answer differently and drift from sft)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect.artifacts import Artifact

from flows.infra.testing import SMALL, write_params
from tasks.errors import MissingInput
from tasks.evaluate import METRICS, best_policy
from tasks.params import load_params
from tasks.stages import POLICIES
from tests.conftest import leftovers, mlflow_client, prepare_small, stage_dir, stage_runs
from tests.integration.test_ppo_stage import build_models

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
REGISTERED = "tiny-evaluate-policy"  # not the default name: it must come from params
OVERRIDES = SMALL | {
    "evaluate.max_prompts": 4,
    "evaluate.max_new_tokens": 8,
    "evaluate.num_samples_logged": 3,
    "evaluate.best_of_n": [2],
    "tracking.registered_model": REGISTERED,
}
# DVC's md5 of each upstream output, as dvc.lock would record it (fake, but distinct)
MD5 = {name: f"{index:032x}.dir" for index, name in enumerate(("reward_model", *POLICIES), start=1)}
EVALUATED = (*POLICIES, "bon@2")
PNG = b"\x89PNG\r\n\x1a\n"
EVALUATE_DIRS = (".", "reports", "plots", "metrics")  # where a write may leave temp entries
QUESTION = "What is 3 plus 4?"


# ---------------------------------------------------------------- helpers


def runs(root: Path, name: str = "evaluate") -> list[Any]:
    return stage_runs(root, name)


def children(root: Path, parent: Any) -> dict[str, Any]:
    """{run name: run} of the runs nested under `parent`."""
    found = mlflow_client(root).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    return {run.info.run_name: run for run in found}


def perturb(model_dir: Path, seed: int, std: float) -> None:
    """Re-initialise every non-norm weight: another policy with the same tokenizer."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: value if "norm" in name else torch.randn(value.shape, generator=generator) * std
        for name, value in weights.items()
    }
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def install(inputs: Path, root: Path) -> None:
    """Copy the inputs into `root`, with the repo's dvc.yaml and a dvc.lock of fake hashes."""
    shutil.copytree(inputs / "data" / "prepared", root / "data" / "prepared")
    for name in ("reward_model", *POLICIES):
        shutil.copytree(inputs / "models" / name, root / "models" / name)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    lock = {
        "schema": "2.0",
        "stages": {
            name: {"cmd": f"rlhf stage {name}", "outs": [{"path": f"models/{name}", "md5": md5}]}
            for name, md5 in MD5.items()
        },
    }
    (root / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML


def written(root: Path) -> dict[str, dict[str, float]]:
    return json.loads((root / "metrics" / "evaluate.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> Path:
    """data/prepared and models/{base,sft,reward_model,ppo,dpo,simpo}."""
    root = tmp_path_factory.mktemp("evaluate-inputs")
    prepare_small(root)
    build_models(root)
    models = root / "models"
    for name in POLICIES[1:]:  # every policy but the reference, sft
        shutil.copytree(models / "sft", models / name)
    perturb(models / "dpo", seed=7, std=0.3)
    perturb(models / "simpo", seed=8, std=0.1)
    return root


@pytest.fixture(scope="module")
def cli(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`rlhf generate` started in the background, in a workspace of its own without models/dpo
    (most of each process is importing; `evaluated` starts these first so that the imports
    overlap the in-process stage runs) → {name: Popen}."""
    root = tmp_path_factory.mktemp("evaluate-cli")
    install(inputs, root)
    shutil.rmtree(root / "models" / "dpo")
    write_params(root / "params.yaml", OVERRIDES)  # read for the device
    rlhf = REPO / ".venv" / "bin" / "rlhf"
    command = [str(rlhf)] if rlhf.is_file() else [sys.executable, "-m", "flows.infra.cli"]
    calls = {
        "compare": ["generate", "--compare", "--max-new-tokens", "8", QUESTION],
        "sft": ["generate", "--model", "models/sft", "--max-new-tokens", "8", QUESTION],
        "nope": ["generate", "--model", "models/nope", QUESTION],
    }
    started = {
        name: subprocess.Popen(
            [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root
        )
        for name, args in calls.items()
    }
    yield started
    for process in started.values():  # only if a test failed before collecting them
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def generate_runs(cli: dict[str, Any]) -> dict[str, tuple[int, str, str]]:
    """{name: (exit code, stdout, stderr)} of the `cli` processes."""
    done = {}
    for name, process in cli.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = (process.returncode, stdout, stderr)
    return done


@pytest.fixture(scope="module")
def evaluated(
    inputs: Path, cli: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """The stage run once with every policy → (directory, returned metrics)."""
    from flows.evaluate import evaluate

    root = tmp_path_factory.mktemp("evaluate-run")
    install(inputs, root)
    with stage_dir(root, OVERRIDES) as params:
        return root, evaluate(params)


# ---------------------------------------------------------------- DVC outputs


def test_metrics_report_and_plots(evaluated) -> None:
    root, returned = evaluated
    metrics = written(root)

    assert set(metrics) == set(EVALUATED)
    for policy, values in metrics.items():
        assert set(values) == set(METRICS), policy
        assert all(math.isfinite(v) for v in values.values()), (policy, values)
        assert 1 <= values["response_length"] <= 8, policy  # EOS included, max_new_tokens 8
        for key in ("win_rate_vs_sft", "eos_rate", "ground_truth_score"):
            assert 0 <= values[key] <= 1, (policy, key)
        assert values["kl_to_sft"] >= 0, policy
        assert values["reward_std"] >= 0, policy
    assert metrics["sft"]["win_rate_vs_sft"] == 0.5
    assert metrics["sft"]["kl_to_sft"] == 0.0
    assert metrics["bon@2"]["kl_to_sft"] == pytest.approx(math.log(2) - 1 / 2)
    assert metrics["ppo"] == metrics["sft"]  # the same weights: the same answers and judgement
    for policy in ("dpo", "simpo"):  # other weights: other answers, away from sft
        assert metrics[policy]["kl_to_sft"] > 0.1, policy
        assert metrics[policy]["reward_mean"] != metrics["sft"]["reward_mean"], policy
    assert returned == {
        f"{p}.ground_truth_score": metrics[p]["ground_truth_score"] for p in EVALUATED
    }

    # reports/: the Markdown table (one row per policy, the best in bold) and the PNG chart
    best = best_policy({p: metrics[p] for p in POLICIES})  # in evaluate.policies' order
    pictures = ["evaluate.png", "overoptimisation.png"]
    assert sorted(p.name for p in (root / "reports").iterdir()) == ["evaluate.md", *pictures]
    for picture in pictures:
        png = (root / "reports" / picture).read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000
    markdown = (root / "reports" / "evaluate.md").read_text(encoding="utf-8")
    comparison, overoptimisation = markdown.split("## Reward over-optimisation")
    rows = [line for line in comparison.splitlines() if line.startswith("| ")][1:]  # no header
    names = [row.strip("|").split("|")[0].strip() for row in rows]
    assert names == [f"**{p}**" if p == best else p for p in EVALUATED]
    # its points: every policy's √kl_to_sft, reward_mean, ground_truth_score (no plots here:
    # no trajectories)
    rows = [line for line in overoptimisation.splitlines() if line.startswith("| ")][1:]
    assert [[c.strip() for c in row.strip("|").split("|")] for row in rows] == [
        [
            p,
            f"{math.sqrt(metrics[p]['kl_to_sft']):.3f}",
            f"{metrics[p]['reward_mean']:.3f}",
            f"{metrics[p]['ground_truth_score']:.3f}",
        ]
        for p in EVALUATED
    ]
    assert Artifact.get("evaluate-report").data == markdown  # in the Prefect UI too

    # plots/evaluate.json: one row per policy, {policy, ...metrics}
    plots = json.loads((root / "plots" / "evaluate.json").read_text())
    assert plots == [{"policy": p} | metrics[p] for p in EVALUATED]
    assert leftovers(root, *EVALUATE_DIRS) == []


# ---------------------------------------------------------------- MLflow


def test_mlflow_runs_artifacts_and_registry(evaluated, tmp_path: Path) -> None:
    root, _ = evaluated
    metrics = written(root)
    store = mlflow_client(root)

    (stage,) = runs(root)
    assert stage.info.status == "FINISHED"
    assert stage.data.tags["rlhf.stage"] == "evaluate"
    assert stage.data.tags["dvc.dep.models/dpo"] == MD5["dpo"]  # lineage from dvc.lock
    assert stage.data.params["evaluate.max_prompts"] == "4"

    # one child run per policy, identical metric keys, the values of metrics/evaluate.json
    nested = children(root, stage)
    assert set(nested) == {f"evaluate/{p}" for p in EVALUATED}
    for policy in EVALUATED:
        run = nested[f"evaluate/{policy}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == stage.info.run_id
        assert run.data.tags["rlhf.policy"] == policy
        assert set(run.data.metrics) == set(METRICS), policy
        assert run.data.metrics == pytest.approx(metrics[policy], rel=1e-6, abs=1e-9), policy

    # the stage run holds the report, the chart and the samples table
    artifacts = {a.path for a in store.list_artifacts(stage.info.run_id)}
    assert {"evaluate.md", "evaluate.png", "evaluate_samples.json"} <= artifacts
    assert "overoptimisation.png" in artifacts
    local = store.download_artifacts(stage.info.run_id, "evaluate_samples.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    columns = ["prompt"] + [
        f"{p}_{c}" for p in EVALUATED for c in ("response", "reward", "ground_truth")
    ]
    assert table["columns"] == columns
    assert len(table["data"]) == 3  # num_samples_logged
    png = Path(store.download_artifacts(stage.info.run_id, "evaluate.png", str(tmp_path)))
    assert png.read_bytes() == (root / "reports" / "evaluate.png").read_bytes()

    # the best policy, registered under the name from params, with its metrics and DVC hash
    best = best_policy({p: metrics[p] for p in POLICIES})  # in evaluate.policies' order
    (version,) = store.search_model_versions(f"name = '{REGISTERED}'")
    assert version.tags["rlhf.policy"] == best
    assert version.tags["dvc.md5"] == MD5[best]
    assert {k: v for k, v in version.tags.items() if k.startswith("metric.")} == {
        f"metric.{key}": f"{metrics[best][key]:.4f}" for key in METRICS
    }
    best_run = nested[f"evaluate/{best}"]
    assert version.run_id == best_run.info.run_id
    source = version.source.removeprefix("file://")
    assert source.endswith(f"{best_run.info.run_id}/artifacts/model"), source
    assert (Path(source) / "config.json").is_file()
    logged = {a.path for a in store.list_artifacts(best_run.info.run_id, "model")}
    assert "model/config.json" in logged and "model/model.safetensors" in logged
    for policy in set(EVALUATED) - {best}:  # only the best one's weights are copied
        assert store.list_artifacts(nested[f"evaluate/{policy}"].info.run_id) == []


# ---------------------------------------------------------------- determinism


def test_rerun_gives_identical_metrics(
    evaluated, inputs: Path, workdir: Path, make_params, prefect_server
) -> None:
    from flows.evaluate import evaluate

    root, _ = evaluated
    install(inputs, workdir)
    evaluate(load_params(make_params(OVERRIDES)))
    assert (workdir / "metrics" / "evaluate.json").read_bytes() == (
        root / "metrics" / "evaluate.json"
    ).read_bytes()
    assert (workdir / "plots" / "evaluate.json").read_bytes() == (
        root / "plots" / "evaluate.json"
    ).read_bytes()


def test_seeded_sampling_is_reproducible(inputs: Path, monkeypatch) -> None:
    """evaluate.do_sample: the same seed gives the same samples, which differ from greedy."""
    from tasks.evaluate import answer

    monkeypatch.chdir(inputs)
    params = load_params(write_params(inputs / "sampling.yaml", OVERRIDES))
    sampling = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"do_sample": True})}
    )
    first, second = answer.fn("dpo", sampling), answer.fn("dpo", sampling)
    assert first == second
    assert first["response"] != answer.fn("dpo", params)["response"]


# ---------------------------------------------------------------- a missing policy


def test_missing_policy_is_an_error_unless_unlisted(
    evaluated, inputs: Path, workdir: Path, make_params, prefect_server
) -> None:
    from flows.evaluate import evaluate

    install(inputs, workdir)
    shutil.rmtree(workdir / "models" / "dpo")

    with pytest.raises(MissingInput, match=r"models/dpo.*evaluate\.policies"):
        evaluate(load_params(make_params(OVERRIDES)))
    (failed,) = runs(workdir)
    assert failed.info.status == "FAILED"
    assert children(workdir, failed) == {}
    for output in ("metrics/evaluate.json", "plots/evaluate.json", "reports"):
        assert not (workdir / output).exists(), output
    assert mlflow_client(workdir).search_registered_models(f"name = '{REGISTERED}'") == []
    assert leftovers(workdir, *EVALUATE_DIRS) == []

    policies = ["sft", "ppo", "simpo"]
    judged = [*policies, "bon@2"]  # best-of-n comes with sft
    evaluate(load_params(make_params(OVERRIDES | {"evaluate.policies": policies})))
    metrics = written(workdir)
    assert list(metrics) == sorted(judged)  # write_json sorts keys
    root, _ = evaluated
    assert metrics == {p: written(root)[p] for p in judged}  # each policy judged alone
    failed, finished = runs(workdir)
    assert (failed.info.status, finished.info.status) == ("FAILED", "FINISHED")
    assert set(children(workdir, finished)) == {f"evaluate/{p}" for p in judged}
    markdown = (workdir / "reports" / "evaluate.md").read_text(encoding="utf-8")
    assert "dpo" not in markdown


# ---------------------------------------------------------------- rlhf generate


def test_cli_generate(generate_runs: dict[str, tuple[int, str, str]]) -> None:
    """`rlhf generate` in a workspace without models/dpo: --compare answers with every policy
    that exists, --model with one, a missing model is one error line."""
    code, stdout, stderr = generate_runs["compare"]
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    existing = [policy for policy in POLICIES if policy != "dpo"]  # no models/dpo here
    assert lines[0] == QUESTION
    assert len(lines) == 1 + len(existing), stdout
    for line, name in zip(lines[1:], existing, strict=True):
        assert line.startswith(f"  {name:<5}  "), line
    compared = {
        name: line[len("  simpo  ") :] for line, name in zip(lines[1:], existing, strict=True)
    }
    assert compared["ppo"] == compared["sft"]  # the same weights, greedy

    code, stdout, stderr = generate_runs["sft"]
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    assert lines[0] == QUESTION
    assert lines[1].startswith("  sft  ")
    assert lines[1][len("  sft  ") :] == compared["sft"]  # --compare decodes the same way

    code, stdout, stderr = generate_runs["nope"]
    assert code == 1, stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(errors) == 1, stderr
    assert "models/nope" in errors[0]
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
