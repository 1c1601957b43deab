"""What a restart decides, in-process: which checkpoints are whole (`damaged`), which MLflow run
a resume continues (`resumable_run_id`), which RUNNING runs are dead (`close_dead_runs`), which
steps a resumed run already has (`logged_until`, the TRL callback that skips them); and a
SIGTERM whose exception library code swallowed still stops the stage at its next step, and one
that repeats while the run closes does not leave it RUNNING; a killed `dvc` takes its stage
with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import save_file

from flows.infra.services import alive
from tasks.errors import Terminated
from tasks.io import RUN_ID_FILE, damaged, resumable_dir, resumable_run_id
from tasks.params import load_params
from tasks.stages import STAGE
from tasks.tracking import END_REASON, _noting_sigterm, close_dead_runs, logged_until

REQUIRED = ("trainer_state.json", "optimizer.pt", "*.safetensors")


def whole_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(directory / "model.safetensors"))
    torch.save({"step": 3}, directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text('{"global_step": 3}')
    return directory


def test_a_whole_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path: Path) -> None:
    checkpoint = whole_checkpoint(tmp_path / "checkpoint-3")
    assert damaged(checkpoint, REQUIRED) is None
    assert zipfile.is_zipfile(checkpoint / "optimizer.pt")  # what the check relies on

    weights = checkpoint / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])  # a kill in the middle of the write
    assert damaged(checkpoint, REQUIRED).startswith("model.safetensors: ")
    weights.write_bytes(full)

    optimizer = checkpoint / "optimizer.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[:-30])  # the zip's end record is gone
    assert damaged(checkpoint, REQUIRED) == "optimizer.pt: truncated"
    optimizer.write_bytes(saved)

    (checkpoint / "trainer_state.json").write_text('{"global_st')
    assert damaged(checkpoint, REQUIRED).startswith("trainer_state.json: ")
    (checkpoint / "trainer_state.json").unlink()
    assert damaged(checkpoint, REQUIRED) == "no trainer_state.json"


def test_the_run_to_resume_is_the_one_of_a_whole_matching_checkpoint(
    workdir: Path, make_params: Callable[..., Path]
) -> None:
    params = load_params(make_params())
    inputs = [Path(p) for p in STAGE["sft"].inputs]
    for path in inputs:  # the stage's inputs as DVC checks them out
        (workdir / path).mkdir(parents=True, exist_ok=True)
        (workdir / path / "file").write_text("x")
    checkpoints = Path("checkpoints/sft")
    with mlflow.start_run() as run:
        resumable_dir(checkpoints, params, "sft", inputs)
    assert (checkpoints / RUN_ID_FILE).read_text() == run.info.run_id
    assert resumable_run_id(checkpoints, params, "sft") is None  # killed before a checkpoint

    whole_checkpoint(checkpoints / "checkpoint-3")
    assert resumable_run_id(checkpoints, params, "sft") == run.info.run_id
    other = load_params(make_params({"sft.trainer.learning_rate": 1.0e-4}, name="o.yaml"))
    assert resumable_run_id(checkpoints, other, "sft") is None  # it would be discarded

    weights = checkpoints / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert resumable_run_id(checkpoints, params, "sft") is None  # nothing whole to resume


def test_running_runs_of_dead_processes_are_closed_killed_and_live_ones_kept(
    workdir: Path,
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("faults")
    here = socket.gethostname()

    def running(pid: int, host: str = here, stage: str = "ppo") -> str:
        tags = {"rlhf.stage": stage, "rlhf.pid": str(pid), "rlhf.host": host}
        return client.create_run(experiment, tags=tags).info.run_id

    killed = running(int(dead.stdout))
    child = client.create_run(experiment, tags={"mlflow.parentRunId": killed}).info.run_id
    alive = running(os.getpid())
    elsewhere = running(int(dead.stdout), host="another-machine")
    other_stage = running(int(dead.stdout), stage="sft")

    assert close_dead_runs(client, experiment, "ppo") == [killed]
    for run_id in (killed, child):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[END_REASON].startswith(f"its process {dead.stdout.strip()} died")
    for run_id in (alive, elsewhere, other_stage):
        assert client.get_run(run_id).info.status == "RUNNING"


def test_a_resumed_trl_run_does_not_log_the_steps_it_has(workdir: Path) -> None:
    from transformers import TrainerControl, TrainerState

    from tasks.trainers import _SkipLogged

    with mlflow.start_run() as run:
        # System metrics count samples, not training steps: a new run that sampled 30 times
        # has logged no step.
        for sample in range(30):
            mlflow.log_metric("system/cpu_utilization_percentage", 50.0, step=sample)
        assert logged_until(run.info.run_id) == -1
        for step in (1, 2, 3, 4):
            mlflow.log_metrics({"loss": 1.0 / step, "learning_rate": 0.1}, step=step)
        until = logged_until(run.info.run_id)
    assert until == 4
    skip = _SkipLogged(until)
    for step, expected in ((3, {}), (4, {}), (5, {"loss": 0.2})):
        logs = {"loss": 0.2}
        skip.on_log(None, TrainerState(global_step=step), TrainerControl(), logs=logs)
        assert logs == expected
    summary = {"train_runtime": 1.5, "train_loss": 0.3}  # the dict `trainer.train()` returns
    skip.on_log(None, TrainerState(global_step=4), TrainerControl(), logs=summary)
    assert summary == {"train_runtime": 1.5, "train_loss": 0.3}


def test_a_slow_batch_is_not_overtaken_by_the_steps_after_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asynchronous logging (TRL's MLflow callback) keeps the order of the steps: a resumed run
    logs only after the last step its killed run has, so a step overtaken by a later one and
    not yet written at the kill would be lost. The first step's batch is slow here (a busy
    SQLite file, a loaded machine); the steps reach the store in order all the same."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    written: list[int] = []
    log_batch = SqlAlchemyStore.log_batch

    def slow_first(self: SqlAlchemyStore, run_id: str, metrics: list, params: list, tags: list):
        if any(metric.step == 0 for metric in metrics):
            time.sleep(0.5)
        log_batch(self, run_id, metrics, params, tags)
        written.extend(sorted({metric.step for metric in metrics}))

    # A store of its own, made after the patch: its async queue binds the patched method.
    monkeypatch.setattr(SqlAlchemyStore, "log_batch", slow_first)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'ordered.db'}")
    with mlflow.start_run() as run:
        for step in range(6):
            mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step, synchronous=False)
        mlflow.flush_async_logging()
    assert written == list(range(6))
    assert logged_until(run.info.run_id) == 5


def test_a_pid_reused_by_a_newer_process_counts_as_dead() -> None:
    from tasks.tracking import _alive

    assert _alive(os.getpid(), started_ms=int(1e13))  # this process, started long before
    assert not _alive(os.getpid(), started_ms=0)  # "started" before this process existed
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert not _alive(int(done.stdout), started_ms=int(1e13))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # on purpose
def test_a_sigterm_swallowed_by_library_code_still_stops_the_stage() -> None:
    from transformers import TrainerControl, TrainerState

    from tasks.trainers import _StopWhenSignalled

    class Finalizer:  # the handler's exception raised inside `__del__` is printed and dropped
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # bytecode for the handler to run in

    def raising(signum: int, _: object) -> None:  # what Prefect's handler does inside a flow
        raise Terminated(signal.Signals(signum).name)

    callback = _StopWhenSignalled()
    state, control = TrainerState(global_step=3), TrainerControl()
    previous = signal.signal(signal.SIGTERM, raising)
    try:
        with _noting_sigterm():
            callback.on_step_end(None, state, control)  # no signal: training goes on
            Finalizer()  # dropped at once: its finalizer runs here and swallows the raise
            with pytest.raises(Terminated, match="SIGTERM"):
                callback.on_step_end(None, state, control)
        assert signal.getsignal(signal.SIGTERM) is raising  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_repeated_while_the_run_closes_still_leaves_it_killed(
    workdir: Path,
    make_params: Callable[..., Path],
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.tracking import stage_run

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # bytecode for the handler to run in

    def raising(signum: int, _: object) -> None:
        raise Terminated(signal.Signals(signum).name)

    close = mlflow.MlflowClient.set_terminated

    def close_during_a_repeat(self: mlflow.MlflowClient, *args: object, **kw: object) -> None:
        sigterm()  # a second SIGTERM (the group's, then the process's own)
        close(self, *args, **kw)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", close_during_a_repeat)
    params = load_params(make_params())
    previous = signal.signal(signal.SIGTERM, raising)
    try:
        with pytest.raises(Terminated), stage_run("prepare", params) as run:
            sigterm()
    finally:
        signal.signal(signal.SIGTERM, previous)
    closed = mlflow.MlflowClient().get_run(run.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags[END_REASON].startswith("stopped by SIGTERM")


STAGE_STANDIN = """
import os, select, signal, sys, time
from pathlib import Path
from flows.infra.services import end_with_launcher
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.with_suffix(".stopped").touch(), os._exit(0)))
end_with_launcher()
launcher = os.pidfd_open(int(os.environ["LAUNCHER_PID"]))
out.touch()
select.select([launcher], [], [])  # until the launcher has exited
time.sleep(float(sys.argv[2]))  # a watcher signals at once: it would have stopped us by now
out.with_suffix(".survived").touch()
time.sleep(120)
"""
GRACE_S = 3.0


@pytest.mark.parametrize(
    ("launcher", "shell"),
    [("dvc", "/bin/sh"), ("dvc", "/bin/bash"), ("dvc", None), ("nohup-like", "/bin/sh")],
)
def test_a_killed_dvc_takes_the_stage_with_it_through_the_shell_it_runs(
    tmp_path: Path, launcher: str, shell: str | None
) -> None:
    """DVC runs a stage as `$SHELL -c cmd`; dash (`/bin/sh`, DVC's choice when SHELL is unset)
    stays between the two, bash execs the command. A `kill -9` of dvc must stop the stage in
    both cases; a stage under any other parent outlives it, as `nohup` wants. The launcher is
    a script named like its role (only its name is read); the stage is `end_with_launcher`,
    then it waits for the launcher's end and GRACE_S more, and says it survived."""
    ready = tmp_path / "stage"
    stage = [sys.executable, "-c", STAGE_STANDIN, str(ready), str(GRACE_S)]
    command = [shell, "-c", subprocess.list2cmdline(stage)] if shell else stage
    script = tmp_path / launcher
    body = (
        "import os, subprocess, time\n"
        f"subprocess.Popen({command!r}, env=os.environ | {{'LAUNCHER_PID': str(os.getpid())}})\n"
        "time.sleep(120)\n"
    )
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen([str(script)], env=env)
    family: list[psutil.Process] = []
    try:
        for _ in range(600):
            if ready.is_file():
                break
            assert parent.poll() is None
            time.sleep(0.05)
        family = psutil.Process(parent.pid).children(recursive=True)  # the shell, the stage
        parent.kill()
        parent.wait()
        for _ in range(1200):
            if ready.with_suffix(".stopped").exists() or ready.with_suffix(".survived").exists():
                break
            time.sleep(0.05)
        if launcher == "dvc":
            assert ready.with_suffix(".stopped").exists(), "the stage outlived its dvc"
            assert not ready.with_suffix(".survived").exists()
        else:  # nothing watches a shell or nohup: the stage lives on
            assert ready.with_suffix(".survived").exists(), "the stage died with its launcher"
            assert not ready.with_suffix(".stopped").exists()
            assert any(alive(p) and str(ready) in p.cmdline() for p in family)
    finally:
        parent.kill()
        for process in family:  # only what this test started
            with contextlib.suppress(psutil.Error):
                process.terminate()  # the stage's handler exits quietly
