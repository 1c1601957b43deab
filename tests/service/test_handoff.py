"""A worker that shares no disk with the laptop (flows/infra/handoff.py), on one machine
(flows/infra/testing_handoff.py): the two share a bare git repository, a local-directory DVC
remote and the services — a real Prefect server, a real MLflow server, a process worker started
in the worker's own clone, each side with its own state and environment.
`RLHF_ORCHESTRATION=deployment dvc repro` in the laptop's directory runs prepare → sft → dpo on
the worker; the outputs come back through the remote."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from flows.infra.deployment import BIN
from flows.infra.testing import Services, write_params
from flows.infra.testing_handoff import Hosts, laptop_and_worker
from flows.infra.transfer import stage_outputs

pytestmark = [pytest.mark.service, pytest.mark.slow]

POOL = "handoff"
STAGES = ("prepare", "sft", "dpo")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, module_processes: Services) -> Iterator[Hosts]:
    with laptop_and_worker(module_processes, tmp_path_factory.mktemp("handoff"), POOL) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def repro(hosts: Hosts) -> subprocess.CompletedProcess:
    """`dvc repro dpo` (prepare → sft → dpo), every stage on the worker."""
    return hosts.run(str(BIN / "dvc"), "repro", "dpo", RLHF_ORCHESTRATION="deployment")


def _lock(root: Path) -> dict[str, Any]:
    return YAML(typ="safe").load((root / "dvc.lock").read_text())["stages"]


def _objects(remote: Path, md5: str) -> list[Path]:
    """The remote's files of object `md5` (a directory's listing, and every file it lists)."""
    path = remote / "files" / "md5" / md5[:2] / md5[2:]
    if not md5.endswith(".dir"):
        return [path]
    listing = json.loads(path.read_text())
    return [path, *(p for entry in listing for p in _objects(remote, entry["md5"]))]


def _flow_runs(hosts: Hosts, stage: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with hosts.client() as client:
        deployment = client.read_deployment_by_name(f"{stage}/{POOL}")
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])
            )
        )


def test_dvc_repro_hands_each_stage_to_the_worker(
    hosts: Hosts, repro: subprocess.CompletedProcess
) -> None:
    output = repro.stdout + repro.stderr
    assert repro.returncode == 0, output
    for stage in STAGES:
        assert f"rlhf: {stage}: sent" in output and f"rlhf: {stage}: received" in output
        assert f"rlhf: {stage} done on the worker" in output
    lock = _lock(hosts.laptop)
    for stage in STAGES:
        outs = {out["path"]: out["md5"] for out in lock[stage]["outs"]}
        assert set(outs) == set(stage_outputs(stage, hosts.laptop / "dvc.yaml"))
        for path, md5 in outs.items():  # what the laptop recorded is what the worker pushed
            assert all(p.is_file() for p in _objects(hosts.remote, md5)), path
            assert (hosts.laptop / path).exists() and (hosts.checkout / path).exists(), path
    status = hosts.run(str(BIN / "dvc"), "status", "--with-deps", "dpo", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout

    # the runs: the worker's checkout at the laptop's commit, one pipeline, the same MLflow
    import mlflow

    commit = hosts.git("rev-parse", "HEAD")
    client = mlflow.MlflowClient(tracking_uri=hosts.mlflow)
    experiment = client.get_experiment_by_name("rlhf")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["rlhf.workdir"] == str(hosts.checkout), stage
        assert run.data.tags["mlflow.source.git.commit"] == commit, stage
        assert "rlhf.host" in run.data.tags
        if stage != "prepare":  # the model says which run trained it, there as here
            recorded = hosts.laptop / "models" / stage / "mlflow_run.json"
            assert json.loads(recorded.read_text())["run_id"] == run.info.run_id
    assert len({run.data.tags["rlhf.pipeline_id"] for run in runs.values()}) == 1
    for stage in STAGES:
        (flow_run,) = _flow_runs(hosts, stage)
        assert flow_run.state.is_completed(), (stage, flow_run.state)
    assert not list(hosts.laptop.glob(".rlhf-handoff-*"))
    assert not list(hosts.checkout.glob(".rlhf-handoff-*"))

    # a second `dvc repro` is a no-op: nothing is sent to the worker
    again = hosts.run(str(BIN / "dvc"), "repro", "dpo", RLHF_ORCHESTRATION="deployment")
    assert again.returncode == 0 and "rlhf:" not in again.stdout + again.stderr, again.stderr
    assert all(len(_flow_runs(hosts, stage)) == 1 for stage in STAGES)


def test_a_third_machine_gets_every_output_from_git_and_the_remote(
    hosts: Hosts, repro: subprocess.CompletedProcess
) -> None:
    assert repro.returncode == 0
    hosts.git("add", "dvc.lock", "metrics", "plots")
    hosts.git("commit", "-qm", "pipeline run on the worker")
    hosts.git("push", "-q", "origin", "HEAD:main")
    third = hosts.root / "third"
    hosts.git("clone", "-q", str(hosts.origin), str(third), cwd=hosts.root)
    pulled = hosts.run(str(BIN / "dvc"), "pull", "dpo", "--with-deps", cwd=third)
    assert pulled.returncode == 0, pulled.stderr
    status = hosts.run(str(BIN / "dvc"), "status", "--with-deps", "dpo", "--json", cwd=third)
    assert json.loads(status.stdout) == {}, status.stdout
    for stage in STAGES:
        for path in stage_outputs(stage, third / "dvc.yaml"):
            assert (third / path).exists(), path


def test_the_laptop_refuses_what_the_worker_could_not_run(
    hosts: Hosts, repro: subprocess.CompletedProcess
) -> None:
    """Each problem is one line and a non-zero exit before anything runs on the worker."""
    assert repro.returncode == 0
    laptop = hosts.laptop
    before = len(_flow_runs(hosts, "sft"))

    def refused(expected: str) -> None:
        done = hosts.run(str(BIN / "rlhf"), "stage", "sft", RLHF_ORCHESTRATION="deployment")
        errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf: error:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr
        assert expected in errors[0], errors[0]
        assert "Traceback" not in done.stderr
        assert not list(laptop.glob(".rlhf-handoff-*"))

    code = laptop / "tasks" / "synthetic.py"
    with _restored(code):
        code.write_text(code.read_text() + "# an edit\n")
        refused("tasks/synthetic.py: not committed")

    hosts.git("commit", "-q", "--allow-empty", "-m", "not pushed")
    try:
        refused("is not on git remote 'origin'")
    finally:
        hosts.git("reset", "-q", "--hard", "HEAD~1")

    local = laptop / ".dvc" / "config.local"
    with _restored(local), _restored(laptop / "a-file"):
        (laptop / "a-file").write_text("")  # a remote below a file: nothing can be written
        local.write_text(f"['remote \"storage\"']\n    url = {laptop / 'a-file' / 'remote'}\n")
        refused("pushing data/prepared, models/base failed: ")

    config = laptop / ".dvc" / "config"
    with _restored(config):
        lines = config.read_text().splitlines()
        config.write_text("\n".join(line for line in lines if "remote =" not in line))
        refused("no default DVC remote")

    assert len(_flow_runs(hosts, "sft")) == before


@contextlib.contextmanager
def _restored(path: Path) -> Iterator[None]:
    """`path` as it was before the block (absent, if it was)."""
    original = path.read_bytes() if path.exists() else None
    try:
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


def test_an_output_that_does_not_match_its_hash_changes_nothing(
    hosts: Hosts, repro: subprocess.CompletedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The laptop checks what it pulled against the hashes itself, not DVC's records: a damaged
    object (here in its own cache, which a pull reuses) is refused and nothing moves."""
    from flows.infra import handoff
    from tasks.errors import HandoffFailed

    assert repro.returncode == 0
    monkeypatch.chdir(hosts.laptop)
    hashes = {out["path"]: out["md5"] for out in _lock(hosts.laptop)["sft"]["outs"]}
    model = hosts.laptop / "models" / "sft"
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    # one file of the model, damaged in the laptop's cache and in the remote alike
    damaged = [
        store / "files" / "md5" / objects[1].parent.name / objects[1].name
        for objects in [_objects(hosts.remote, hashes["models/sft"])]
        for store in (hosts.remote, hosts.laptop / ".dvc" / "cache")
    ]
    originals = [path.read_bytes() for path in damaged]
    for path in damaged:
        path.chmod(0o644)
        path.write_bytes(b"not what was pushed")
    try:
        with pytest.raises(HandoffFailed, match=r"models/sft from the DVC remote does not match"):
            handoff.receive("sft", hashes)
    finally:
        for path, original in zip(damaged, originals, strict=True):
            path.write_bytes(original)
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    assert not list(hosts.laptop.glob(".rlhf-handoff-*"))


def test_an_experiment_reaches_the_worker_with_its_params(
    hosts: Hosts, repro: subprocess.CompletedProcess
) -> None:
    import mlflow

    assert repro.returncode == 0
    done = hosts.run(
        str(BIN / "dvc"),
        "exp",
        "run",
        "-S",
        "dpo.trainer.beta=0.25",
        "dpo",
        RLHF_ORCHESTRATION="deployment",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "rlhf: dpo done on the worker" in output
    assert "rlhf: sft" not in output  # only what changed
    newest = max(_flow_runs(hosts, "dpo"), key=lambda run: run.expected_start_time)
    assert newest.parameters["params"]["dpo"]["trainer"]["beta"] == 0.25
    client = mlflow.MlflowClient(tracking_uri=hosts.mlflow)
    experiment = client.get_experiment_by_name("rlhf")
    (run,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'dpo'", max_results=1
    )
    assert run.data.params["dpo.trainer.beta"] == "0.25"
    assert run.data.tags["rlhf.workdir"] == str(hosts.checkout)


def test_a_killed_repro_cancels_the_worker_run_and_the_rerun_resumes_there(
    hosts: Hosts, repro: subprocess.CompletedProcess
) -> None:
    """SIGTERM to `dvc repro` once the worker's checkout holds a checkpoint of dpo: the
    worker's flow run is cancelled (its stage stops, its MLflow run KILLED), the checkpoint
    stays in the worker's checkout, and the next `dvc repro` resumes it there, in the same
    MLflow run: every step once."""
    import mlflow

    assert repro.returncode == 0
    slow = {"dpo.trainer.max_steps": 90, "dpo.trainer.save_steps": 30}
    params = hosts.laptop / "params.yaml"
    write_params(params, slow | {"dpo.trainer.logging_steps": 1}, base=params)
    checkpoint = hosts.checkout / "checkpoints" / "dpo" / "checkpoint-30" / "trainer_state.json"
    env = hosts.env | {"RLHF_ORCHESTRATION": "deployment"}
    dvc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "dpo"],
        cwd=hosts.laptop,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert dvc.poll() is None and time.monotonic() < deadline, dvc.communicate()[0]
        time.sleep(0.2)
    dvc.send_signal(signal.SIGTERM)
    killed = dvc.communicate(timeout=120)[0]
    assert dvc.returncode != 0, killed
    newest = max(_flow_runs(hosts, "dpo"), key=lambda run: run.expected_start_time)
    with hosts.client() as client:
        while (state := client.read_flow_run(newest.id).state).type.value != "CANCELLED":
            assert time.monotonic() < deadline + 120, f"the worker's run is {state.name}"
            time.sleep(0.5)
    client = mlflow.MlflowClient(tracking_uri=hosts.mlflow)
    experiment = client.get_experiment_by_name("rlhf")
    (run,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'dpo'", max_results=1
    )
    assert run.info.status == "KILLED" and checkpoint.exists()

    done = hosts.run(str(BIN / "dvc"), "repro", "dpo", RLHF_ORCHESTRATION="deployment")
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 91))  # resumed at 30, not started over: each step once
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=hosts.laptop, check=True)
