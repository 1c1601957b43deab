"""What the deployment backend adds to a stage (budget: ≤ 5 s per stage over the local path
against the same Prefect server).

In a temporary git copy of the repository with fast params (flows/infra/testing.py: FAST), this
starts its own Prefect server (own SQLite database) and a process worker on free ports of
127.0.0.1, registers the deployments (`rlhf deploy`), builds the stage's inputs (its upstream
stages, locally, untimed), then times `rlhf stage <stage>` from process start to exit, for each
repeat once with each backend, alternating which goes first:

- **local**: RLHF_ORCHESTRATION=local, the flow runs in the `rlhf` process;
- **deployment**: RLHF_ORCHESTRATION=deployment, the run of deployment `<stage>/<pool>` on the
  worker, followed until it ends and its last log records arrived.

Both report to the same server and the same MLflow store (SQLite in the copy). Breakdown of a
deployment run, from the flow run's state history and the `rlhf` process's start and exit:

  trigger    process start → flow run created (imports, params check, `run_deployment`)
  pick-up    created (Scheduled) → Pending: the worker's poll (PREFECT_WORKER_QUERY_SECONDS=1)
  engine     Pending → Running: the flow-run process starts (Python, Prefect, the pull step,
             the flow's imports)
  flow       Running → Completed (the same span of a local run: its "flow" column)
  finish     Completed → process exit, of which
    last logs    Completed → the "rlhf: <stage> done" line (state polling, waiting for the run's
                 last log records, the output check)
    exit         that line → process exit (interpreter shutdown)

The difference is paired per repeat (deployment − local); load = 1-minute load average before
the pair (`os.getloadavg`); on a machine with other jobs the figures are noisy.

Example: .venv/bin/python benchmarks/deployment_overhead.py --stage prepare --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import (  # noqa: E402
    markdown_table,
    medians,
    parse_args,
    run_logged,
    scratch_dir,
)
from flows.infra.deployment import BIN  # noqa: E402
from flows.infra.testing import (  # noqa: E402
    clean_env,
    copy_repo,
    services,
    start_prefect_server,
    start_worker,
    upstream,
    wait_for_pool,
)
from tasks.stages import STAGES  # noqa: E402

POOL = "bench"
COLUMNS = (  # (key, header) of the Markdown table
    ("local_s", "local s"),
    ("deployment_s", "deployment s"),
    ("difference_s", "difference s"),
    ("trigger_s", "trigger s"),
    ("pickup_s", "pick-up s"),
    ("engine_s", "engine s"),
    ("flow_s", "flow s"),
    ("finish_s", "finish s"),
    ("follow_s", "last logs s"),
    ("exit_s", "exit s"),
    ("local_flow_s", "local flow s"),
    ("load_1m", "load 1m"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = [spec.name for spec in STAGES]
    parser.add_argument("--stage", choices=stages, default="prepare", help="default: prepare")
    args = parse_args(parser, argv, repeats="pairs of runs")

    with scratch_dir("rlhf-deployment-overhead-", args.keep) as root:
        workspace = copy_repo(root / "repo", {"orchestration.work_pool": POOL})
        env = clean_env(workspace, root)
        logs = root / "logs"
        with services(logs) as started:
            env["PREFECT_API_URL"] = start_prefect_server(started, root, env)
            deploy = [str(BIN / "rlhf"), "deploy", "--pool", POOL]
            run_logged(deploy, workspace, env, logs / "deploy.log")
            start_worker(started, POOL, workspace, env)
            wait_for_pool(env["PREFECT_API_URL"], POOL, worker=True)
            for name in upstream(args.stage):  # untimed
                run_logged([str(BIN / "rlhf"), "stage", name], workspace, env, logs / f"{name}.log")
            runs = []
            for repeat in range(1, args.repeats + 1):
                order = ("local", "deployment") if repeat % 2 else ("deployment", "local")
                result: dict[str, Any] = {"repeat": repeat, "load_1m": os.getloadavg()[0]}
                for backend in order:
                    result |= _time(args.stage, backend, workspace, env, root, repeat)
                result["difference_s"] = result["deployment_s"] - result["local_s"]
                runs.append(result)
                print(
                    f"repeat {repeat}: local {result['local_s']:.1f} s, deployment "
                    f"{result['deployment_s']:.1f} s, difference {result['difference_s']:+.1f} s "
                    f"(load {result['load_1m']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
        report = {
            "stage": args.stage,
            "repeats": args.repeats,
            "cores": os.cpu_count(),
            "load_after": os.getloadavg(),
            "runs": runs,
            "median": medians(runs, COLUMNS),
        }
        print(_markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _time(
    stage: str, backend: str, workspace: Path, env: dict[str, str], root: Path, repeat: int
) -> dict[str, Any]:
    """Run `rlhf stage <stage>` with `backend`; its wall time and the flow run's timeline."""
    log = root / "logs" / f"{backend}-{repeat}.log"
    done_at = None  # when the "rlhf: <stage> done" line arrived
    start = time.time()
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "rlhf"), "stage", stage],
            cwd=workspace,
            env=env | {"RLHF_ORCHESTRATION": backend},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(f"rlhf: {stage} done"):
                done_at = time.time()
            out.write(line)
        code = process.wait()
    end = time.time()
    if code or done_at is None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"rlhf stage {stage} ({backend}) failed, see {log}:\n{tail}")
    states = _states(env["PREFECT_API_URL"], stage, after=start)
    if backend == "local":
        return {"local_s": end - start, "local_flow_s": states["COMPLETED"] - states["RUNNING"]}
    return {
        "deployment_s": end - start,
        "trigger_s": states["SCHEDULED"] - start,
        "pickup_s": states["PENDING"] - states["SCHEDULED"],
        "engine_s": states["RUNNING"] - states["PENDING"],
        "flow_s": states["COMPLETED"] - states["RUNNING"],
        "finish_s": end - states["COMPLETED"],
        "follow_s": done_at - states["COMPLETED"],
        "exit_s": end - done_at,
    }


def _states(api: str, flow_name: str, after: float) -> dict[str, float]:
    """{state type: first time (epoch s)} of the newest run of `flow_name` created after `after`."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(api) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                start_time=FlowRunFilterStartTime(after_=datetime.fromtimestamp(after).astimezone())
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        found: dict[str, float] = {}
        for state in client.read_flow_run_states(run.id):
            found.setdefault(state.type.value, state.timestamp.timestamp())
    return found


def _markdown(report: dict[str, Any]) -> str:
    def cell(key: str, value: float) -> str:
        if key == "load_1m":
            return f"{value:.2f}"
        return f"{value:+.1f}" if key == "difference_s" else f"{value:.1f}"

    return "\n".join(
        [
            f"### `rlhf stage {report['stage']}`: deployment backend vs local, same Prefect server",
            "",
            f"{report['cores']} cores; seconds, process start to exit; budget: difference ≤ 5 s. "
            f"Load average after: {' / '.join(f'{x:.2f}' for x in report['load_after'])} "
            "(1/5/15 min).",
            "",
            *markdown_table(report, COLUMNS, cell),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
