"""Where the time of a whole `dvc repro` goes, stage by stage (SPEC §8: ≤ 240 s for the default
pipeline, ≤ 8 s per stage outside its training).

In a temporary git copy of the repository (the repository's params unless `--fast`), with its
own MLflow store and Prefect home and no PREFECT_API_URL (so the stages start and share one
Prefect server, as on a fresh machine), this runs `dvc repro` once, stamps every output line as
it arrives and watches each `rlhf stage` process start and end. Per stage:

  wall       DVC's "Running stage" → the next stage's (the last: → `dvc repro`'s end)
  train      `train_runtime_s` of metrics/<stage>.json (0 for prepare and evaluate)
  overhead   wall − train: what the stage costs around its training, of which
    start-up   process start → Prefect's "Beginning flow run": interpreter, imports, params and
               input checks, TRL config check, flow-run creation (Prefect server start excluded)
    Prefect    starting the shared Prefect server (the first stage only; 0 when it runs)
    MLflow     "Beginning flow run" → the stage's MLflow run is open (experiment, tags, params)
    in-flow    the rest of the flow, training excluded: loading models and data, evaluation,
               saving, samples, summary metrics, closing the runs
    exit       "rlhf: <stage> done" → the process is gone (interpreter shutdown)
    DVC        everything else: DVC hashing and committing outputs, its own start-up, spawning

Example: .venv/bin/python benchmarks/pipeline_timeline.py --json timeline.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import OtherCPU, machine_info, scratch_dir  # noqa: E402
from flows.infra.deployment import BIN  # noqa: E402
from flows.infra.services import stop_recorded  # noqa: E402
from flows.infra.testing import FAST, clean_env, copy_repo  # noqa: E402

COLUMNS = ("wall", "train", "overhead", "start-up", "Prefect", "MLflow", "in-flow", "exit", "DVC")
MARKS = {  # output line → the event it marks, for the stage named in it
    "dvc": re.compile(r"^Running stage '(\w+)'"),
    "server": re.compile(r"^rlhf: started a shared Prefect server at \S+ in ([\d.]+) s"),
    "flow": re.compile(r"Beginning flow run '[^']+' for flow '(\w+)'"),
    "mlflow": re.compile(r"tasks\.tracking - MLflow run \w+ \((\w+)\)"),
    "done": re.compile(r"^rlhf: (\w+) done in"),
}


def watch_processes(root: int, seen: dict[str, list[float]], stop: threading.Event) -> None:
    """Record when each `rlhf stage <name>` under process `root` starts and ends."""
    import psutil

    alive: dict[int, str] = {}
    while not stop.is_set():
        now = time.time()
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            break
        current = {}
        for child in children:
            try:
                cmd = child.cmdline()
                if "stage" in cmd and cmd.index("stage") + 1 < len(cmd):
                    current[child.pid] = (cmd[cmd.index("stage") + 1], child.create_time())
            except psutil.Error:
                continue
        for pid, (name, created) in current.items():
            if pid not in alive:
                alive[pid] = name
                seen.setdefault(name, [created, None])
        for pid in [pid for pid in alive if pid not in current]:
            seen[alive.pop(pid)][1] = now
        time.sleep(0.05)


def run_repro(workspace: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """`dvc repro` in `workspace`: the stamped output lines and the stage processes' spans."""
    started = time.time()
    lines: list[tuple[float, str]] = []
    processes: dict[str, list[float]] = {}
    stop = threading.Event()
    with log.open("w") as out:
        repro = subprocess.Popen(
            [str(BIN / "dvc"), "repro"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        watcher = threading.Thread(target=watch_processes, args=(repro.pid, processes, stop))
        watcher.start()
        assert repro.stdout is not None
        for line in repro.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            out.write(line)
        repro.wait()
        stop.set()
        watcher.join()
    if repro.returncode:
        raise SystemExit(f"dvc repro failed ({repro.returncode}), see {log}")
    return {"started": started, "ended": time.time(), "lines": lines, "processes": processes}


def timeline(repro: dict[str, Any], workspace: Path) -> list[dict[str, Any]]:
    """One row per stage, in the order DVC ran them, with the COLUMNS in seconds."""
    marks: dict[str, dict[str, float]] = {}
    order: list[str] = []
    server_s = 0.0
    for stamp, line in repro["lines"]:
        for event, pattern in MARKS.items():
            if not (match := pattern.search(line)):
                continue
            if event == "server":
                server_s = float(match[1])
                continue
            marks.setdefault(match[1], {})[event] = stamp
            if event == "dvc":
                order.append(match[1])
    rows = []
    for index, name in enumerate(order):
        m, (created, ended) = marks[name], repro["processes"][name]
        end = marks[order[index + 1]]["dvc"] if index + 1 < len(order) else repro["ended"]
        metrics = json.loads((workspace / "metrics" / f"{name}.json").read_text())
        train = float(metrics.get("train_runtime_s", 0.0))
        prefect = server_s if index == 0 else 0.0
        row = {
            "stage": name,
            "wall": end - m["dvc"],
            "train": train,
            "start-up": m["flow"] - created - prefect,
            "Prefect": prefect,
            "MLflow": m["mlflow"] - m["flow"],
            "in-flow": m["done"] - m["mlflow"] - train,
            "exit": ended - m["done"],
        }
        row["overhead"] = row["wall"] - train
        row["DVC"] = row["overhead"] - sum(row[k] for k in COLUMNS[3:8])
        rows.append(row)
    return rows


def noop_repro(workspace: Path, env: dict[str, str]) -> float:
    """Seconds of a second `dvc repro` with nothing changed."""
    began = time.time()
    subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=workspace, env=env, check=True, capture_output=True
    )
    return time.time() - began


def markdown(rows: list[dict[str, Any]], total: float, noop: float) -> str:
    lines = [
        "| stage | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append(f"| {row['stage']} | " + " | ".join(f"{row[c]:.1f}" for c in COLUMNS) + " |")
    sums = {c: sum(row[c] for row in rows) for c in COLUMNS}
    lines.append("| **sum** | " + " | ".join(f"**{sums[c]:.1f}**" for c in COLUMNS) + " |")
    per_stage = (total - sums["train"]) / len(rows)
    lines += [
        "",
        f"`dvc repro` wall: **{total:.1f} s**; outside training: **{per_stage:.1f} s per stage** "
        f"((wall − Σ train) / {len(rows)} stages); no-op `dvc repro`: **{noop:.2f} s**.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="FAST sizes (a few steps per stage)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace and logs")
    args = parser.parse_args(argv)
    with scratch_dir("rlhf-timeline-", args.keep) as root, OtherCPU(root) as other:
        workspace = copy_repo(root / "repo", sizes=FAST if args.fast else {})
        env = clean_env(workspace, root)
        repro = run_repro(workspace, env, root / "repro.log")
        rows = timeline(repro, workspace)
        noop = noop_repro(workspace, env)
        total = repro["ended"] - repro["started"]
        busy = other.mean(0.0, float("inf"))
        quality = json.loads((workspace / "metrics" / "evaluate.json").read_text())
        stop_recorded(workspace / ".rlhf")  # the shared server and warm process would idle on
    print(markdown(rows, total, noop))
    print("\n| policy | ground truth | correct | polite |\n|---|---:|---:|---:|")
    for policy, m in quality.items():
        parts = ("ground_truth_score", "ground_truth_correct", "ground_truth_polite")
        print(f"| {policy} | " + " | ".join(f"{m[k]:.3f}" for k in parts) + " |")
    print(f"\nother CPU (cores busy outside the benchmark): {busy:.2f}; {machine_info()}")
    if args.json:
        report = {"rows": rows, "total_s": total, "noop_s": noop, "other_cpu": busy}
        report["evaluate"] = quality
        args.json.write_text(json.dumps(report | {"machine": machine_info()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
