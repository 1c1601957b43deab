"""The hand-off of a stage to a worker that shares no disk with this workspace: the inputs go up
and the outputs come down through the project's DVC remote, by hash. For the deployments of
`rlhf deploy --workspace clone`; `--workspace shared` workers run in this very directory.

1. Laptop, `send` (the `rlhf stage X` that `dvc repro` runs, with the deployment backend): a
   default DVC remote is set, the code (flows/, tasks/, pyproject.toml, dvc.yaml, .dvc/config)
   is committed and its commit is on the git remote; then the stage's inputs (the outputs of
   other stages it reads, its raw data, dvc.lock) are hashed into the cache and pushed — the
   metrics and plots of other stages, which git tracks, as the files are here. The run gets
   the commit and those hashes in its environment (`RLHF_HANDOFF`) — never credentials: each
   side reads its own from its environment (git, DVC and cloud settings).
2. Worker, `enter`, the deployments' pull step: the flow run works in the worker's checkout
   (cloned once from the git remote, then fetched; `$RLHF_CHECKOUT`, by default
   `.rlhf/checkout/` of the worker's installation), locked for the run and checked out at the
   laptop's commit, and the stage's code is imported from there.
3. Worker, `stage` (every stage's flow): exactly the sent hashes are pulled into the checkout,
   the stage runs as a local run would, its outputs (outs, metrics, plots) are pushed and their
   hashes published as the flow run's artifact `rlhf-handoff-outputs`. Checkpoints stay in the
   checkout, so a rerun of a stage killed there resumes.
4. Laptop, `receive`: exactly those hashes are pulled into a staging directory and each file is
   checked against its hash before anything moves into place; DVC then records the stage in
   dvc.lock as after a local run.

Files move with DVC itself, by hash (flows/infra/transfer.py).
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from ruamel.yaml import YAML

from flows.infra import outage, transfer
from tasks.errors import HandoffFailed
from tasks.io import replace_dir
from tasks.stages import STAGE

HANDOFF_ENV = "RLHF_HANDOFF"  # the run's commit and input hashes, set by the laptop
ARTIFACT = "rlhf-handoff-outputs"  # the outputs' hashes, published by the worker
CODE = ("flows", "tasks", "pyproject.toml", "dvc.yaml", ".dvc/config")  # what the worker must have
PACKAGE = Path(__file__).resolve().parents[2]  # the worker's installation


# ---------------------------------------------------------------- the laptop


def send(stage: str) -> dict[str, str]:
    """Check that the worker can run what is here, push the stage's inputs: the environment of
    the deployment run (RLHF_HANDOFF)."""
    repo = transfer.open_repo()
    if not repo.config["core"].get("remote"):
        raise HandoffFailed(
            "no default DVC remote, through which the worker gets the inputs: "
            "`dvc remote add -d storage s3://bucket/path` (or any DVC remote), commit .dvc/config "
            "and `git push`"
        )
    produced, tracked, raw = _inputs(stage)
    status = transfer.git("status", "--porcelain", "--untracked-files=all", "--", *CODE, *raw)
    if changed := [line[3:] for line in status.splitlines()]:
        paths = ", ".join(changed[:4]) + (", …" if len(changed) > 4 else "")
        raise HandoffFailed(
            f"{paths}: not committed; the worker runs the code and reads the raw data of a "
            "commit: commit (or `dvc add` data), `git push`, then rerun"
        )
    commit = _pushed_commit()
    hashes = _recorded(produced) | _dvc_tracked(raw)
    began = time.perf_counter()
    transfer.push(repo, hashes, f"{stage}-inputs")  # objects of this cache
    # Other stages' metrics and plots: git tracks them and DVC caches no object of theirs, and
    # the commit may hold an older version than `dvc repro` just wrote: the files as they are.
    hashes |= transfer.add(repo, tracked, tracked, f"{stage}-tracked-inputs")
    print(
        f"rlhf: {stage}: sent {len(hashes)} inputs through the DVC remote "
        f"({time.perf_counter() - began:.1f} s)",
        file=sys.stderr,
    )
    lock = Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else ""
    sender = f"{socket.gethostname()}:{Path.cwd().resolve()}"
    handoff = {"commit": commit, "inputs": hashes, "sender": sender}
    # dvc.lock too, for the runs' lineage tags (DVC's md5 of each upstream output); small, but
    # an environment variable holds at most 128 KiB on Linux.
    return {HANDOFF_ENV: json.dumps(handoff | ({"lock": lock} if len(lock) < 100_000 else {}))}


def published(client: Any, flow_run_id: Any) -> dict[str, str]:
    """{path: md5} of the outputs a worker's run pushed (its artifact `rlhf-handoff-outputs`)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    rows = json.loads(found[0].data) if found else []
    return {row["path"]: row["md5"] for row in rows}


def receive(stage: str, hashes: dict[str, str]) -> None:
    """Pull exactly `hashes` (the stage's outputs) into staging, verify every file against its
    hash, then move them into place: all of them, or nothing."""
    if missing := sorted(set(transfer.stage_outputs(stage)) - set(hashes)):
        raise HandoffFailed(
            f"{stage}: the worker's run completed without publishing {', '.join(missing)} "
            f"(flow run artifact {ARTIFACT}); nothing changed here"
        )
    repo, began = transfer.open_repo(), time.perf_counter()
    with transfer.pulled(repo, hashes, f"{stage}-outputs") as staging:
        for path, md5 in hashes.items():
            if problem := transfer.mismatch(repo, staging / path, md5):
                raise HandoffFailed(
                    f"{stage}: {path} from the DVC remote does not match its hash {md5} "
                    f"({problem}); nothing changed here (check the remote's storage, rerun)"
                )
        for path in hashes:  # all verified: now into place
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if (staging / path).is_dir():
                replace_dir(staging / path, Path(path))
            else:
                os.replace(staging / path, path)
    print(
        f"rlhf: {stage}: received {len(hashes)} outputs, verified "
        f"({time.perf_counter() - began:.1f} s)",
        file=sys.stderr,
    )


def _inputs(stage: str) -> tuple[list[str], list[str], list[str]]:
    """The stage's inputs here: (outputs of other stages that DVC caches, which go through the
    DVC remote as dvc.lock records them; those git tracks (`cache: false`: metrics, plots),
    which go through it as they are here; raw data, which comes with the commit, or through the
    remote where DVC tracks it)."""
    outs = {
        out: caches
        for spec in STAGE.values()
        for caches in (True, False)
        for out in transfer.stage_outputs(spec.name, cached=caches)
    }
    produced, tracked, raw = [], [], []
    for path in (p for p in STAGE[stage].inputs if Path(p).exists()):
        if any((path == out or path.startswith(f"{out}/")) and outs[out] for out in outs):
            produced.append(path)
        else:
            (tracked if path in outs else raw).append(path)
    return produced, tracked, raw


def _recorded(produced: list[str]) -> dict[str, str]:
    """{output: md5} of the other stages' outputs that hold `produced`, as dvc.lock records them
    (`dvc repro` committed them, and their objects, just before this stage)."""
    locked = YAML(typ="safe").load(Path("dvc.lock")) if Path("dvc.lock").is_file() else {}
    outs = {
        out["path"]: out["md5"]
        for stage in (locked or {}).get("stages", {}).values()
        for out in stage.get("outs", [])
    }
    hashes = {}
    for path in produced:
        out = next((o for o in outs if path == o or path.startswith(f"{o}/")), None)
        if out is None:
            raise HandoffFailed(
                f"{path}: not in dvc.lock, whose hashes the worker gets: run the stage that "
                "writes it with `dvc repro`"
            )
        hashes[out] = outs[out]
    return hashes


def _dvc_tracked(raw: list[str]) -> dict[str, str]:
    """{path: md5} of what `.dvc` files under `raw` track; a file there that neither git nor DVC
    tracks would be missing on the worker, and is refused."""
    if not raw:
        return {}
    tracked = {}
    for folder in raw:
        for dvcfile in sorted(Path(folder).rglob("*.dvc")):
            for out in YAML(typ="safe").load(dvcfile)["outs"]:
                tracked[os.path.normpath(dvcfile.parent / out["path"])] = out["md5"]
    ignored = transfer.git("ls-files", "--others", "--ignored", "--exclude-standard", "--", *raw)
    lost = [
        file
        for file in ignored.splitlines()
        if not any(file == out or file.startswith(f"{out}/") for out in tracked)
    ]
    if lost:
        raise HandoffFailed(
            f"{', '.join(lost[:3])}: git ignores it and DVC does not track it, so the worker "
            "would not have it: `dvc add` it, commit the .dvc file and `git push`"
        )
    return tracked


def _pushed_commit() -> str:
    """HEAD, if a branch or tag of the git remote (`$RLHF_GIT_REMOTE`, default origin) has it."""
    remote = os.environ.get("RLHF_GIT_REMOTE", "origin")
    commit = transfer.git("rev-parse", "HEAD")
    try:
        listed = transfer.git("ls-remote", "--heads", "--tags", remote)
    except HandoffFailed as exc:
        raise HandoffFailed(
            f"git remote '{remote}' cannot be read ({exc}): the worker clones it"
        ) from None
    tips = {line.split()[0] for line in listed.splitlines() if line}
    if commit in tips or any(_ancestor(commit, tip) for tip in tips):
        return commit
    raise HandoffFailed(
        f"commit {commit[:12]} is not on git remote '{remote}', where the worker gets the code: "
        "`git push`, then rerun"
    )


def _ancestor(commit: str, tip: str) -> bool:
    """`tip` is known here and contains `commit`."""
    done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, tip], capture_output=True)
    return done.returncode == 0


# ---------------------------------------------------------------- the worker


def enter(workspace: str, directory: str = "", repository: str = "") -> dict[str, str]:
    """The deployments' pull step (prefect.yaml): the directory the flow run works in, `shared`:
    `directory`, the workspace this worker shares with `rlhf stage`; `clone`: the worker's
    checkout of `repository` at the laptop's commit. The stage's code is then imported from
    there, not from the worker's installation (Prefect imports the entrypoint from the working
    directory; this module's package is forgotten so that it does)."""
    if workspace == "shared":
        target = Path(directory)
    elif workspace == "clone":
        if HANDOFF_ENV not in os.environ:
            raise HandoffFailed(
                "this deployment runs stages handed off by `rlhf stage` (RLHF_ORCHESTRATION="
                "deployment under `dvc repro`); it cannot be run by itself"
            )
        target = _checkout(repository, json.loads(os.environ[HANDOFF_ENV]))
    else:
        raise HandoffFailed(f"workspace {workspace!r}: expected 'shared' or 'clone'")
    os.chdir(target)
    for name in [name for name in sys.modules if name.split(".")[0] in ("flows", "tasks")]:
        del sys.modules[name]
    return {"directory": str(Path.cwd())}


def _checkout(repository: str, handoff: dict[str, Any]) -> Path:
    """The worker's checkout at the sent commit, locked until this process exits (a second run
    on this worker waits: one checkout, one commit at a time)."""
    checkout = Path(os.environ.get("RLHF_CHECKOUT") or PACKAGE / ".rlhf" / "checkout").resolve()
    if f"{socket.gethostname()}:{checkout}" == handoff["sender"]:
        raise HandoffFailed(
            f"{checkout}: the worker's checkout is the sender's own workspace; register the "
            "deployments with `rlhf deploy --workspace shared` for a worker in this directory"
        )
    checkout.parent.mkdir(parents=True, exist_ok=True)
    # A raw descriptor, never closed: the lock lasts as long as the flow-run process.
    lock = os.open(checkout.parent / f".{checkout.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"rlhf: waiting for another run of this worker to leave {checkout}", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    if not (checkout / ".git").is_dir():
        shutil.rmtree(checkout, ignore_errors=True)
        transfer.git("clone", "--quiet", "--no-checkout", repository, str(checkout))
    else:
        transfer.git("remote", "set-url", "origin", repository, cwd=checkout)
        transfer.git("fetch", "--quiet", "--tags", "origin", cwd=checkout)
    commit = handoff["commit"]
    try:
        transfer.git("cat-file", "-e", f"{commit}^{{commit}}", cwd=checkout)
    except HandoffFailed:
        raise HandoffFailed(f"commit {commit[:12]} is not on {repository}: push it") from None
    # --force: the checkout is the program's; ignored files (checkpoints/, caches) stay.
    transfer.git("checkout", "--quiet", "--force", "--detach", commit, cwd=checkout)
    return checkout


def stage(name: str) -> Callable[[Callable[..., dict[str, float]]], Flow]:
    """The Prefect flow of stage `name`: its function as it is, or, in a clone deployment's run,
    between receiving the laptop's inputs and sending the outputs back."""

    def decorate(body: Callable[..., dict[str, float]]) -> Flow:
        @functools.wraps(body)
        def run(params: Any) -> dict[str, float]:
            with outage.untagged_tasks():
                if (handoff := os.environ.get(HANDOFF_ENV)) is None:
                    return outage.finished(body(params))
                receive_inputs(json.loads(handoff))
                metrics = body(params)
                send_outputs(name)
                return outage.finished(metrics)

        # Types resolved where the body was written: Prefect validates the parameters by them.
        run.__signature__ = inspect.signature(body, eval_str=True)  # type: ignore[attr-defined]
        return flow(name=name)(run)

    return decorate


@task(cache_policy=NO_CACHE)
def receive_inputs(handoff: dict[str, Any]) -> None:
    """Exactly the laptop's inputs, pulled into the checkout (unchanged files stay untouched,
    so a checkpoint taken on them still resumes), and its dvc.lock."""
    if handoff.get("lock"):
        Path("dvc.lock").write_text(handoff["lock"])
    transfer.pull(transfer.open_repo(), handoff["inputs"], "inputs")


@task(cache_policy=NO_CACHE)
def send_outputs(stage: str) -> dict[str, str]:
    """Hash the stage's outputs into the cache, push them, publish {path: md5} for the laptop.
    Metrics and plots go as copies: git tracks them, and DVC will not take them in place."""
    from prefect.artifacts import create_table_artifact

    paths = transfer.stage_outputs(stage)
    copies = transfer.stage_outputs(stage, cached=False)
    hashes = transfer.add(transfer.open_repo(), paths, copies, f"{stage}-outputs")
    rows = [{"path": path, "md5": md5} for path, md5 in hashes.items()]
    create_table_artifact(
        rows,
        key=ARTIFACT,
        description=f"The outputs of `{stage}`, pushed to the DVC remote by their hash",
    )
    return hashes
