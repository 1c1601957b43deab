"""What a sweep in DVC's queue costs and keeps: the issue's example on the tiny pipeline. A copy
of the repository (FAST params) runs `dvc repro` (untimed) and commits its `dvc.lock`; then
two experiments that change only evaluate (`-S evaluate.max_new_tokens=20` and `=28`) are
queued and run two at a time (`dvc queue start -j 2`), with a user's defaults: no
MLFLOW_TRACKING_URI, no PREFECT_API_URL. It reports the queue's wall time, the evaluate time
of each experiment, how many Prefect servers its stages started, the MLflow runs that reached
the project's `mlflow.db`, and whether anything opened `$PREFECT_HOME/prefect.db`.

    .venv/bin/python benchmarks/sweep.py [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import machine_info, parse_args, run_logged, scratch_dir
from flows.infra.deployment import BIN
from flows.infra.services import stop_recorded
from flows.infra.testing import GIT_IDENTITY, clean_env, copy_repo

EXPERIMENTS = {"tokens-20": "evaluate.max_new_tokens=20", "tokens-28": "evaluate.max_new_tokens=28"}
DONE = re.compile(r"^rlhf: evaluate done in ([\d.]+)s", re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args = parse_args(parser, argv, repeats="sweeps")
    runs = []
    with scratch_dir("rlhf-sweep-bench-", args.keep) as root:
        repo = copy_repo(root / "repo")
        env = clean_env(repo, root) | GIT_IDENTITY
        del env["MLFLOW_TRACKING_URI"]  # the default: the project's mlflow.db
        run_logged([str(BIN / "dvc"), "repro"], repo, env, root / "repro.log")
        for command in (["add", "dvc.lock"], ["commit", "-qm", "baseline"]):
            subprocess.run(["git", *command], cwd=repo, env=env, check=True)
        stop_recorded(repo / ".rlhf")  # the queue starts what it needs, as on a fresh checkout
        for repeat in range(1, args.repeats + 1):
            runs.append({"repeat": repeat, **_sweep(repo, env, root / f"queue-{repeat}.log")})
            print(f"repeat {repeat}: {runs[-1]}", file=sys.stderr, flush=True)
        stop_recorded(repo / ".rlhf")
    report = {"machine": machine_info(), "runs": runs}
    print(_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _sweep(repo: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Queue the experiments, run them two at a time, wait for the queue to empty."""
    store = repo / "mlflow.db"
    before = _runs(store)
    dvc = [str(BIN / "dvc")]
    for name, override in EXPERIMENTS.items():
        queue = [*dvc, "exp", "run", "--queue", "-n", f"{name}-{log.stem}", "-S", override]
        run_logged(queue, repo, env, log)
    began = time.perf_counter()
    run_logged([*dvc, "queue", "start", "-j", "2"], repo, env, log)
    while re.search(r"\b(Queued|Running)\b", _out([*dvc, "queue", "status"], repo, env)):
        time.sleep(0.5)
    wall = time.perf_counter() - began
    names = [f"{name}-{log.stem}" for name in EXPERIMENTS]  # `-f` would also force every stage
    logs = "".join(_out([*dvc, "queue", "logs", name], repo, env) for name in names)
    log.write_text(logs)
    return {
        "wall_s": round(wall, 1),
        "evaluate_s": [float(s) for s in DONE.findall(logs)],
        "stages_run": sorted(set(re.findall(r"Running stage '(\w+)'", logs))),
        "prefect_servers_started": logs.count("started a shared Prefect server"),
        "mlflow_runs_kept": _runs(store) - before,
        "prefect_home_db": (Path(env["PREFECT_HOME"]) / "prefect.db").exists(),
        "succeeded": _out([*dvc, "queue", "status"], repo, env).count("Success"),
    }


def _runs(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def _out(command: list[str], repo: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    return done.stdout + done.stderr


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "| repeat | queue wall s | stages run | evaluate s (each) | Prefect servers started "
        "| MLflow runs kept | `$PREFECT_HOME/prefect.db` opened | experiments succeeded |",
        "|---|---:|---|---|---:|---:|---|---:|",
    ]
    for run in report["runs"]:
        each = ", ".join(f"{s:.1f}" for s in run["evaluate_s"])
        lines.append(
            f"| {run['repeat']} | {run['wall_s']:.1f} | {', '.join(run['stages_run'])} | {each} "
            f"| {run['prefect_servers_started']} "
            f"| {run['mlflow_runs_kept']} | {run['prefect_home_db']} | {run['succeeded']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
