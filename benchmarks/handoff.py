"""What the hand-off to a worker that shares no disk costs (flows/infra/handoff.py): the tiny
pipeline (FAST params, every stage) by `dvc repro` twice against the same Prefect and MLflow
servers — once local, once from a laptop whose stages all run on a worker in its own clone, the
data through a local-directory DVC remote (flows/infra/testing_handoff.py) — and, per stage, the
four legs of the hand-off:

- **send**: the laptop's checks (git, DVC remote) and the push of the inputs;
- **receive inputs** / **send outputs**: the worker's tasks (Prefect task-run times) that pull
  the inputs into its checkout, and hash and push the outputs;
- **receive**: the laptop's pull into staging, check of every file against its hash, move.

    .venv/bin/python benchmarks/handoff.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import machine_info, parse_args, scratch_dir
from flows.infra.deployment import BIN
from flows.infra.testing import clean_env, copy_repo, services
from flows.infra.testing_handoff import laptop_and_worker
from tasks.stages import STAGES

POOL = "bench-handoff"
DONE = re.compile(r"^rlhf: (\w+) done (?:on the worker )?in ([\d.]+)s", re.M)
LEG = re.compile(r"^rlhf: (\w+): (sent|received) .*\(([\d.]+) s\)$", re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args = parse_args(parser, argv, repeats="pipelines each way")
    runs = []
    with (
        scratch_dir("rlhf-handoff-bench-", args.keep) as root,
        services(root / "logs") as started,
        laptop_and_worker(started, root / "remote", POOL) as hosts,
    ):
        local = copy_repo(root / "local", {"orchestration.work_pool": POOL})
        (root / "local-state").mkdir()
        env = clean_env(local, root / "local-state")
        env |= {"PREFECT_API_URL": hosts.api, "MLFLOW_TRACKING_URI": hosts.mlflow}
        for repeat in range(1, args.repeats + 1):
            force = ["--force"] if repeat > 1 else []
            here = _repro(local, env, force, "local")
            there = _repro(hosts.laptop, hosts.env, force, "deployment")
            worker, laptop = _worker_legs(hosts), _legs(there["output"])
            legs = {stage: worker.get(stage, {}) | laptop.get(stage, {}) for stage in worker}
            runs.append({"repeat": repeat, "local": here, "worker": there, "legs": legs})
            print(
                f"repeat {repeat}: local {here['wall_s']:.1f} s, through the worker "
                f"{there['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    report = {"machine": machine_info(), "runs": _plain(runs)}
    print(_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _repro(repo: Path, env: dict[str, str], force: list[str], backend: str) -> dict[str, Any]:
    """`dvc repro` of every stage with `backend`: wall time, each stage's time, the output."""
    import subprocess

    began = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", *force],
        cwd=repo,
        env=env | {"RLHF_ORCHESTRATION": backend},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - began
    output = done.stdout + done.stderr
    (repo.parent / f"repro-{backend}.log").write_text(output)
    if done.returncode:
        raise SystemExit(f"dvc repro ({backend}) failed:\n{output[-3000:]}")
    stages = {stage: float(seconds) for stage, seconds in DONE.findall(output)}
    return {"wall_s": wall, "stages": stages, "output": output}


def _legs(output: str) -> dict[str, dict[str, float]]:
    """The laptop's legs of each stage: send (checks + push), receive (pull, check, move)."""
    legs: dict[str, dict[str, float]] = {}
    for stage, verb, seconds in LEG.findall(output):
        legs.setdefault(stage, {})["send" if verb == "sent" else "receive"] = float(seconds)
    return legs


def _worker_legs(hosts: Any) -> dict[str, dict[str, float]]:
    """The worker's legs of each stage's newest flow run: its two hand-off tasks' run times."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    legs: dict[str, dict[str, float]] = {}
    with hosts.client() as client:
        for spec in STAGES:
            deployment = client.read_deployment_by_name(f"{spec.name}/{POOL}")
            runs = client.read_flow_runs()
            mine = [run for run in runs if run.deployment_id == deployment.id]
            newest = max(mine, key=lambda run: run.start_time)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[newest.id]))
            )
            legs[spec.name] = {
                task.name.rsplit("-", 1)[0]: task.total_run_time.total_seconds()
                for task in tasks
                if task.name.startswith(("receive_inputs", "send_outputs"))
            }
    return legs


def _plain(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs without the commands' full output (it is in the logs)."""
    return [
        run
        | {
            side: {k: v for k, v in run[side].items() if k != "output"}
            for side in ("local", "worker")
        }
        for run in runs
    ]


def _markdown(report: dict[str, Any]) -> str:
    lines = []
    for run in report["runs"]:
        here, there, legs = run["local"], run["worker"], run["legs"]
        lines += [
            f"### repeat {run['repeat']}: `dvc repro` local {here['wall_s']:.1f} s, "
            f"through the worker {there['wall_s']:.1f} s",
            "",
            "| stage | local s | on the worker s | send s | receive inputs s | send outputs s "
            "| receive s | hand-off s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for spec in STAGES:
            leg = legs.get(spec.name, {})
            parts = [leg.get(k) for k in ("send", "receive_inputs", "send_outputs", "receive")]
            cells = [here["stages"].get(spec.name), there["stages"].get(spec.name), *parts]
            cells.append(sum(p for p in parts if p is not None))
            text = " | ".join("–" if c is None else f"{c:.1f}" for c in cells)
            lines.append(f"| {spec.name} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
