"""Faults of real `rlhf stage` processes in a copy of the repository (FAST sizes): `kill -9`
of a stage under `dvc repro`, then `dvc repro` again; SIGTERM; a damaged checkpoint. Nothing
is lost (the rerun resumes, in the same MLflow run, with a whole curve), nothing is left RUNNING
(MLflow runs, Prefect flow runs) and no process outlives its stage."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from flows.infra.deployment import BIN
from flows.infra.testing import write_params
from tasks.params import load_params
from tests.service.nan_on_one_rank import poison_one_prompt

pytestmark = [pytest.mark.service, pytest.mark.slow]


def environment(repo: Path) -> dict[str, str]:
    lines = repo.joinpath(".env-faults").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def start(repo: Path, *command: str) -> subprocess.Popen[bytes]:
    """`command` in the background, its output in a file (a pipe nobody reads would fill)."""
    log = repo / f"{Path(command[0]).name}-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        list(command),
        cwd=repo,
        env=environment(repo),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def output_of(process: subprocess.Popen[bytes]) -> str:
    return process.log.read_text()  # type: ignore[attr-defined]


def wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, output_of(process)[-3000:]
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.1)


def stage_process(stage: str, launcher: subprocess.Popen[bytes]) -> psutil.Process:
    """The `rlhf stage <stage>` process `launcher` (a `dvc repro`) started: among its
    descendants, not a machine-wide match (other suites may run the same stage)."""
    for _ in range(600):
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(launcher.pid).children(recursive=True):
                if process.cmdline()[-2:] == ["stage", stage]:
                    return process
        time.sleep(0.1)
    raise AssertionError(f"no rlhf stage {stage}")


def runs(repo: Path, stage: str | None = None) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=environment(repo)["MLFLOW_TRACKING_URI"])
    query = f"tags.`rlhf.stage` = '{stage}'" if stage else ""
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()], query, max_results=1000
    )


def steps(repo: Path, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(tracking_uri=environment(repo)["MLFLOW_TRACKING_URI"])
    return sorted(point.step for point in client.get_metric_history(run_id, key))


def flow_run_state(flow_run_id: str) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def running_flow_runs(stage: str) -> list[str]:
    """Names of the stage's Prefect flow runs in state Running (the session's server)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"]))
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[stage])),
            flow_run_filter=FlowRunFilter(state=running),
        )
    return [run.name for run in found]


def wait_for_step(repo: Path, stage: str, key: str, step: int, process: subprocess.Popen) -> None:
    """Until the stage's RUNNING MLflow run has logged `key` at `step` or later: a point of its
    training, not of the clock (a fast machine runs a tiny stage to its end in a second)."""
    db = environment(repo)["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    for _ in range(6000):
        with sqlite3.connect(db) as con:
            (logged,) = con.execute(
                "select max(m.step) from metrics m join runs r on m.run_uuid = r.run_uuid "
                "join tags t on t.run_uuid = r.run_uuid where r.status = 'RUNNING' "
                "and t.key = 'rlhf.stage' and t.value = ? and m.key = ?",
                (stage, key),
            ).fetchone()
        if logged is not None and logged >= step:
            return
        assert process.poll() is None, output_of(process)[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{stage} never logged {key} at step {step}")


def running_tag(repo: Path, stage: str) -> str:
    """The Prefect flow run id of the stage's RUNNING MLflow run, read while it runs."""
    db = environment(repo)["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    for _ in range(300):
        with sqlite3.connect(db) as con:
            row = con.execute(
                "select t2.value from runs r join tags t on t.run_uuid = r.run_uuid "
                "join tags t2 on t2.run_uuid = r.run_uuid where r.status = 'RUNNING' "
                "and t.key = 'rlhf.stage' and t.value = ? "
                "and t2.key = 'rlhf.prefect_flow_run_id'",
                (stage,),
            ).fetchone()
        if row:
            return row[0]
        time.sleep(0.1)
    raise AssertionError(f"no RUNNING {stage} run")


@pytest.mark.parametrize(
    ("stage", "checkpoint", "key", "past", "last"),
    [
        ("dpo", "checkpoints/dpo/checkpoint-40/trainer_state.json", "loss", 42, 120),
        ("ppo", "checkpoints/ppo/state/ppo_state.pt", "objective/kl", 4, 11),
    ],
)
def test_kill_9_then_dvc_repro_resumes_in_the_same_run(
    repo: Path, stage: str, checkpoint: str, key: str, past: int, last: int
):
    repro = start(repo, str(BIN / "dvc"), "repro", stage)
    victim = stage_process(stage, repro)
    wait_for(repo / checkpoint, repro)
    flow_run = running_tag(repo, stage)
    wait_for_step(repo, stage, key, past, repro)  # a few steps past the checkpoint
    victim.kill()
    assert repro.wait(timeout=120) != 0
    assert (repo / "checkpoints" / stage).is_dir(), "it finished before the kill: nothing to resume"
    rerun = subprocess.run(
        [str(BIN / "dvc"), "repro", stage], cwd=repo, env=environment(repo), capture_output=True
    )
    output = rerun.stdout.decode() + rerun.stderr.decode()
    assert rerun.returncode == 0, output[-3000:]
    assert "resum" in output
    (run,) = runs(repo, stage)  # one run: the killed one, continued
    assert run.info.status == "FINISHED"
    start_step = 1 if stage == "dpo" else 0
    assert steps(repo, run.info.run_id, key) == list(range(start_step, last + 1))  # whole
    assert not [r for r in runs(repo) if r.info.status == "RUNNING"]
    assert flow_run_state(flow_run) == "CRASHED"  # the killed stage's flow run
    assert running_flow_runs(stage) == []
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert not list((repo / "checkpoints").glob(f"{stage}/*"))  # finished: nothing to resume
    # The resumed run ends where an uninterrupted one does, step by step.
    resumed = json.loads((repo / "plots" / f"{stage}.json").read_text())
    again = subprocess.run(
        [str(BIN / "rlhf"), "stage", stage], cwd=repo, env=environment(repo), capture_output=True
    )
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    uninterrupted = json.loads((repo / "plots" / f"{stage}.json").read_text())
    assert [sorted(row) for row in resumed] == [sorted(row) for row in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        if key in a:  # ppo's last row holds only the held-out evaluation of the final policy
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5)


def test_sigterm_stops_keeps_the_checkpoint_and_a_damaged_one_is_discarded(repo: Path):
    stage = start(repo, str(BIN / "rlhf"), "stage", "dpo")
    wait_for(repo / "checkpoints/dpo/checkpoint-40/trainer_state.json", stage)
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=120) == 128 + signal.SIGTERM
    lines = output_of(stage).strip().splitlines()
    assert lines[-1].startswith("rlhf: stopped by SIGTERM: no output was written"), lines[-5:]
    killed = [r for r in runs(repo, "dpo") if r.info.status == "KILLED"]
    assert killed and killed[-1].data.tags["rlhf.end_reason"].startswith("stopped by SIGTERM")
    assert not [r for r in runs(repo) if r.info.status == "RUNNING"]
    kept = sorted((repo / "checkpoints" / "dpo").glob("checkpoint-*"))
    assert kept, "the last checkpoint is kept"
    weights = kept[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    rerun = subprocess.run(
        [str(BIN / "rlhf"), "stage", "dpo"], cwd=repo, env=environment(repo), capture_output=True
    )
    output = rerun.stdout.decode() + rerun.stderr.decode()
    assert rerun.returncode == 0, output[-3000:]
    assert "discarding damaged checkpoint" in output
    assert "Traceback" not in output
    assert (repo / "models" / "dpo" / "model.safetensors").is_file()


def test_a_killed_dvc_repro_takes_its_stage_with_it(repo: Path):
    repro = start(repo, str(BIN / "dvc"), "repro", "-f", "-s", "dpo")  # dpo alone, again
    stage = stage_process("dpo", repro)
    wait_for(repo / "checkpoints/dpo/checkpoint-40/trainer_state.json", repro)
    repro.kill()
    repro.wait(timeout=30)
    try:
        stage.wait(timeout=120)
    except psutil.TimeoutExpired:
        stage.kill()
        pytest.fail("rlhf stage dpo outlived its dvc repro")
    (run,) = [r for r in runs(repo, "dpo") if r.data.tags.get("rlhf.pid") == str(stage.pid)]
    assert run.info.status == "KILLED", output_of(repro)[-3000:]
    assert not [r for r in runs(repo) if r.info.status == "RUNNING"]


def torchrun(repo: Path, stage: str, *args: str, tee: bool = False) -> list[str]:
    """`torchrun --nproc_per_node 2` of a stage: two CPU processes over gloo, a thread each;
    `tee`: each rank's lines prefixed `[default<rank>]:`."""
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        *(["--tee", "3"] if tee else []),
        "-m",
        "flows.infra.cli",
        "stage",
        stage,
        *args,
    ]


def run_torchrun(repo: Path, stage: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        torchrun(repo, stage, *args),
        cwd=repo,
        env=environment(repo) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_ppo_under_torchrun_logs_the_mean_of_both_ranks_once(repo: Path):
    before = {r.info.run_id for r in runs(repo, "ppo")}
    done = run_torchrun(repo, "ppo")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("rlhf: ppo done") == 1  # rank 0 alone
    assert "ppo: actor identical on 2 processes" in output
    (run,) = [r for r in runs(repo, "ppo") if r.info.run_id not in before]  # one run
    assert run.info.status == "FINISHED"
    own: dict[tuple[int, int], float] = {}
    for iteration, rank, score in re.findall(
        r"ppo: iteration (\d+), rank (\d) of 2 \(its own rollouts\): score (-?[\d.]+)", output
    ):
        own[int(iteration), int(rank)] = float(score)
    client = mlflow.MlflowClient(tracking_uri=environment(repo)["MLFLOW_TRACKING_URI"])
    logged = {
        p.step: p.value for p in client.get_metric_history(run.info.run_id, "objective/scores")
    }
    assert sorted(logged) == list(range(load_params(repo / "params.yaml").ppo.num_iterations))
    assert own[1, 0] != own[1, 1]  # the ranks sampled different prompts
    for step, value in logged.items():
        mean = (own[step + 1, 0] + own[step + 1, 1]) / 2
        assert value == pytest.approx(mean, abs=2e-6)


def test_sft_under_torchrun_is_one_finished_run(repo: Path):
    before = {r.info.run_id for r in runs(repo, "sft")}
    done = run_torchrun(repo, "sft")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("rlhf: sft done") == 1
    (run,) = [r for r in runs(repo, "sft") if r.info.run_id not in before]
    assert run.info.status == "FINISHED"
    assert (repo / "models" / "sft" / "model.safetensors").is_file()


def test_a_nan_on_one_rank_stops_both_in_the_same_step(repo: Path, tmp_path: Path):
    """Real PPO (`rlhf stage ppo`) under `torchrun --nproc_per_node 2`: only rank 1 draws the
    poisoned prompt (iteration 1) and gets a NaN score; both ranks must stop with the same error
    in the same iteration. A rank that went on would wait in the next collective until torchrun,
    seeing the other exit, killed it: it would never report the NaN itself."""
    params = write_params(
        tmp_path / "params.yaml",
        {"ppo.num_iterations": 2, "ppo.rollout_batch_size": 16, "ppo.eval_every": None},
        base=repo / "params.yaml",
    )
    poison_one_prompt(repo, tmp_path, load_params(params))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        torchrun(repo, "ppo", "--params", str(params), tee=True),
        cwd=tmp_path,
        env=environment(repo) | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store},
        capture_output=True,
        text=True,
        timeout=600,  # a rank left waiting in a collective would hang until this
    )
    output = done.stdout + done.stderr
    (tmp_path / "torchrun.log").write_text(output)
    assert done.returncode != 0, output[-3000:]
    # Rank 0 drew clean prompts: it stops because rank 1 saw the NaN, and it says so once, after
    # ending the run as FAILED (torchrun stops every rank once one has exited: `--tee 3` prefixes
    # each rank's lines with [default<rank>]:).
    errors = re.findall(r"^\[default(\d)\]:rlhf: error: (ppo: iteration \d+: [^;]+);", output, re.M)
    assert errors == [("0", "ppo: iteration 1: non-finite reward-model score")], output[-6000:]
    assert "stopped by SIGTERM" not in output, output[-6000:]
    assert not (tmp_path / "models" / "ppo").exists()
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"


def test_ppo_under_torchrun_resumes_after_a_kill(repo: Path):
    before = {r.info.run_id for r in runs(repo, "ppo")}
    longer = write_params(
        repo / "longer.yaml", {"ppo.num_iterations": 30}, base=repo / "params.yaml"
    )
    launcher = subprocess.Popen(
        torchrun(repo, "ppo", "--params", str(longer)),
        cwd=repo,
        env=environment(repo) | {"OMP_NUM_THREADS": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(repo / "checkpoints/ppo/state/ppo_state.pt", launcher)
    ranks = [p for p in psutil.Process(launcher.pid).children() if "stage" in p.cmdline()]
    assert len(ranks) == 2
    launcher.kill()  # kill -9 of torchrun: its ranks (sessions of their own) must stop too
    launcher.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "a rank outlived its torchrun"
    done = run_torchrun(repo, "ppo", "--params", str(longer))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"ppo: resuming at iteration \d+", output), output[-6000:]
    (run,) = [r for r in runs(repo, "ppo") if r.info.run_id not in before]  # the same run
    assert run.info.status == "FINISHED"
    assert steps(repo, run.info.run_id, "objective/kl") == list(range(30))  # whole, once each
    assert (repo / "models" / "ppo" / "model.safetensors").is_file()
    assert not [r for r in runs(repo) if r.info.status == "RUNNING"]
    assert running_flow_runs("ppo") == []  # both killed ranks' flow runs were marked Crashed
