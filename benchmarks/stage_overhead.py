"""Orchestration + tracking overhead of one TRL stage (SPEC §8: budget ratio ≤ 1.10).

For each repeat, two subprocesses run the same training on the same data with the same config:

- **rlhf**: `rlhf stage <stage>`, process start to exit — Python and library imports, params
  check, Prefect start-up (ephemeral temporary server, or a running server with
  `--prefect-server`), the MLflow run with its params and tags, TRL training through
  transformers' MLflow callback, saving, the sample-generation table, shutdown;
- **bare**: `benchmarks/bare_trl.py`, the same TRL trainer, config and data with nothing around
  it (no Prefect, no MLflow, `report_to="none"`, no samples).

The ratio rlhf wall / bare wall is the overhead budget. Both run in a temporary copy of
params.yaml, dvc.yaml, dvc.lock, data/prepared, models/base and models/sft, with MLflow in a
SQLite file there, so the repository's models/, metrics/ and mlflow.db are never written (inputs
missing in the repository are built in the copy, by `rlhf stage prepare` / `rlhf stage sft`).
This script reads params with `tasks.config.load_params`; `bare_trl.py` imports nothing of
`tasks/` (it gets a JSON job).

Breakdown of the rlhf run, from the time each of its log lines arrives:
  start-up   process start → Prefect's "Beginning flow run" (imports, params, Prefect start-up)
  Prefect    "Starting temporary server" → "Beginning flow run" (ephemeral mode only)
  MLflow     "Beginning flow run" → the MLflow run is open (experiment, tags, params)
  samples    end of the train task → end of the log_samples task (generation + MLflow table)
  finish     end of log_samples → "rlhf: <stage> done" (summary metrics, MLflow run and flow end)
  exit       "rlhf: <stage> done" → process exit (stopping the temporary server, interpreter exit)
  train      `train_runtime_s` of metrics/<stage>.json (bare: the trainer's train_runtime)
  fixed overhead   (rlhf wall − rlhf train) − (bare wall − bare train): the overhead without the
             noise of training time, which swings up to 10x between runs on a contended machine
  ratio, same train   (rlhf wall − rlhf train + T) / (bare wall − bare train + T), T the fastest
             training of either variant in this invocation: the ratio as if both trained alike
  other CPU  mean CPU use, in cores, of processes that are not this benchmark's: above ~0.2 the
             machine was contended and the figures are noisy

Example: .venv/bin/python benchmarks/stage_overhead.py --stage dpo --repeats 3 --prefect-server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config import load_params  # noqa: E402

BARE = Path(__file__).resolve().with_name("bare_trl.py")
BIN = Path(sys.executable).parent
TRL_STAGES = ("sft", "reward_model", "dpo", "simpo")
# What the stage reads: the preference stages start from models/sft, sft from models/base.
INPUTS = ("params.yaml", "dvc.yaml", "dvc.lock", "data/prepared", "models/base", "models/sft")
# Library settings the pipeline applies in flows/__init__.py; both runs get them.
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
COLUMNS = (  # (key, header) of the Markdown table
    ("rlhf_wall_s", "rlhf wall s"),
    ("bare_wall_s", "bare wall s"),
    ("ratio", "ratio"),
    ("overhead_s", "overhead s"),
    ("fixed_overhead_s", "fixed overhead s"),
    ("same_train_ratio", "ratio, same train"),
    ("rlhf_train_s", "rlhf train s"),
    ("bare_train_s", "bare train s"),
    ("startup_s", "start-up s"),
    ("prefect_boot_s", "Prefect s"),
    ("mlflow_open_s", "MLflow s"),
    ("samples_s", "samples s"),
    ("finish_s", "finish s"),
    ("exit_s", "exit s"),
    ("other_cpu", "other CPU"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: .venv/bin/python benchmarks/stage_overhead.py --stage sft --repeats 3 "
        "--prefect-server --json sft-server.json",
    )
    parser.add_argument("--stage", choices=TRL_STAGES, default="sft", help="default: sft")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (default: 3)")
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="start `prefect server start` on a free port for the run and point the stage at it "
        "(default: Prefect's ephemeral mode, a temporary server per stage process)",
    )
    parser.add_argument(
        "--params", type=Path, default=REPO / "params.yaml", help="default: the repo's params.yaml"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace and logs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: must be at least 1")

    if not (BIN / "rlhf").is_file():
        parser.error(f"no `rlhf` next to {sys.executable}: run with the project's .venv/bin/python")
    params = load_params(args.params)
    section = getattr(params, args.stage)
    workspace = Path(tempfile.mkdtemp(prefix=f"rlhf-overhead-{args.stage}-"))
    failed = True
    try:
        env = _workspace(workspace, args.params)
        _prepare_inputs(workspace, env, args.stage)
        job = {
            "stage": args.stage,
            "model": _start_model(workspace, args.stage),
            "revision": params.model.revision if args.stage == "sft" else None,
            "trust_remote_code": params.model.trust_remote_code,
            "seed": params.common.seed,
            "device": params.common.device,
            "dtype": params.model.dtype,
            "lora": section.lora.model_dump() if section.lora else None,
            "prepared_dir": "data/prepared",
            "trainer": section.trainer,
        }
        _run(
            [sys.executable, "-c", "import torch, transformers, trl, datasets, mlflow, prefect"],
            workspace,
            env,
            workspace / "logs" / "warm-up.log",
        )  # page cache, untimed
        with _prefect(args.prefect_server, workspace, env) as mode, _OtherCPU() as other:
            runs = []
            for repeat in range(1, args.repeats + 1):
                # Alternate the order, so neither variant always runs on a warmer machine.
                order = ("rlhf", "bare") if repeat % 2 else ("bare", "rlhf")
                result: dict[str, Any] = {"repeat": repeat}
                for variant in order:
                    if variant == "rlhf":
                        result |= _time_rlhf(args.stage, workspace, env, repeat, other)
                    else:
                        result |= _time_bare(job, workspace, env, repeat, other)
                result["other_cpu"] = max(result.pop("rlhf_other"), result.pop("bare_other"))
                result["ratio"] = result["rlhf_wall_s"] / result["bare_wall_s"]
                result["overhead_s"] = result["rlhf_wall_s"] - result["bare_wall_s"]
                runs.append(result)
                print(f"repeat {repeat}: " + _format_short(result), file=sys.stderr, flush=True)
        _same_train(runs)
        report = {
            "stage": args.stage,
            "prefect": mode,
            "repeats": args.repeats,
            "machine": _machine(),
            "runs": runs,
            "median": {
                key: statistics.median(run[key] for run in runs if run.get(key) is not None)
                for key, _ in COLUMNS
                if any(run.get(key) is not None for run in runs)
            },
        }
        print(_markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        failed = False
        return 0
    finally:
        if args.keep or failed:
            print(f"workspace and logs kept in {workspace}", file=sys.stderr)
        else:
            shutil.rmtree(workspace, ignore_errors=True)


# ---------------------------------------------------------------- the workspace


def _workspace(workspace: Path, params_file: Path) -> dict[str, str]:
    """Copy the stage's inputs into `workspace`; the environment both variants run in."""
    for name in INPUTS:
        source = params_file if name == "params.yaml" else REPO / name
        target = workspace / name
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    _untrack_uri(workspace / "params.yaml")
    (workspace / "logs").mkdir()
    env = ENV_DEFAULTS | {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "RLHF_ORCHESTRATION": "local",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Create the MLflow database (schema migrations take seconds) before anything is timed:
    # a user's mlflow.db exists after the first stage.
    _run(
        [
            sys.executable,
            "-c",
            "import mlflow, sys; mlflow.set_experiment(sys.argv[1])",
            load_params(params_file).tracking.experiment,
        ],
        workspace,
        env,
        workspace / "logs" / "mlflow-init.log",
    )
    return env


def _untrack_uri(params_file: Path) -> None:
    """A `tracking.tracking_uri` in the params would send the runs elsewhere: use the env's."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    data = yaml.load(params_file.read_text(encoding="utf-8"))
    if data["tracking"]["tracking_uri"] is not None:
        data["tracking"]["tracking_uri"] = None
        with params_file.open("w", encoding="utf-8") as out:
            yaml.dump(data, out)


def _prepare_inputs(workspace: Path, env: dict[str, str], stage: str) -> None:
    """Build what the repository lacks, in the workspace (untimed)."""
    needed = [("prepare", workspace / "models/base/base.json")]
    if stage != "sft":
        needed.append(("sft", workspace / "models/sft/config.json"))
    for upstream, marker in needed:
        if not marker.is_file():
            print(
                f"{marker.relative_to(workspace)} missing: running `rlhf stage {upstream}` in "
                f"{workspace}",
                file=sys.stderr,
            )
            _run(
                [str(BIN / "rlhf"), "stage", upstream],
                workspace,
                env,
                workspace / "logs" / f"{upstream}.log",
            )


def _start_model(workspace: Path, stage: str) -> str:
    if stage != "sft":
        return "models/sft"
    pointer = json.loads((workspace / "models/base/base.json").read_text())
    return pointer["name_or_path"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}), see {log}:\n{tail}")


# ---------------------------------------------------------------- timing the two variants


def _timed(
    cmd: list[str], workspace: Path, env: dict[str, str], log: Path, other: _OtherCPU
) -> tuple[float, list[tuple[float, str]], float]:
    """Run `cmd`; (wall seconds, [(seconds since start, output line)], other processes' CPU)."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line))
            out.write(line)
        code = proc.wait()
    wall = time.perf_counter() - start
    if code:
        tail = "".join(line for _, line in lines[-20:])
        raise SystemExit(f"{' '.join(cmd)} failed ({code}), see {log}:\n{tail}")
    return wall, lines, other.mean(start, start + wall)


def _time_rlhf(
    stage: str, workspace: Path, env: dict[str, str], repeat: int, other: _OtherCPU
) -> dict[str, Any]:
    metrics = workspace / "metrics" / f"{stage}.json"
    metrics.unlink(missing_ok=True)
    log = workspace / "logs" / f"rlhf-{repeat}.log"
    wall, lines, cpu = _timed([str(BIN / "rlhf"), "stage", stage], workspace, env, log, other)

    def at(pattern: str) -> float | None:
        return next((t for t, line in lines if re.search(pattern, line)), None)

    temp_server = at(r"Starting temporary server")
    flow_start = at(r"Beginning flow run")
    run_open = at(r"tasks.tracking - MLflow run")
    train_end = at(r"Task run 'train-\w+' - Finished")
    samples_end = at(r"Task run 'log_samples-\w+' - Finished")
    done = at(rf"^rlhf: {stage} done in")
    return {
        "rlhf_wall_s": wall,
        "rlhf_train_s": json.loads(metrics.read_text())["train_runtime_s"],
        "startup_s": flow_start,
        "prefect_boot_s": flow_start - temp_server if temp_server and flow_start else None,
        "mlflow_open_s": run_open - flow_start if run_open and flow_start else None,
        "samples_s": samples_end - train_end if samples_end and train_end else None,
        "finish_s": done - samples_end if done and samples_end else None,
        "exit_s": wall - done if done else None,
        "rlhf_other": cpu,
    }


def _time_bare(
    job: dict[str, Any], workspace: Path, env: dict[str, str], repeat: int, other: _OtherCPU
) -> dict[str, Any]:
    run_dir = workspace / "bare" / str(repeat)
    job = job | {"output_dir": str(run_dir / "checkpoints"), "save_dir": str(run_dir / "final")}
    job_file = run_dir / "job.json"
    job_file.parent.mkdir(parents=True)
    job_file.write_text(json.dumps(job, indent=2))
    log = workspace / "logs" / f"bare-{repeat}.log"
    wall, lines, cpu = _timed(
        [sys.executable, str(BARE), str(job_file)], workspace, env, log, other
    )
    result = next(
        json.loads(line.split(" ", 1)[1]) for _, line in lines if line.startswith("BARE_")
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"bare_wall_s": wall, "bare_train_s": result["train_runtime_s"], "bare_other": cpu}


def _same_train(runs: list[dict[str, Any]]) -> None:
    """Contention-robust figures: on 2 busy cores training time swings 10x between runs, so
    compare the variants' non-training time (wall − train_runtime), each plus the fastest
    training seen in this invocation (the best estimate of an uncontended one)."""
    best = min(min(run["rlhf_train_s"], run["bare_train_s"]) for run in runs)
    for run in runs:
        rlhf_rest = run["rlhf_wall_s"] - run["rlhf_train_s"]
        bare_rest = run["bare_wall_s"] - run["bare_train_s"]
        run["fixed_overhead_s"] = rlhf_rest - bare_rest
        run["same_train_ratio"] = (rlhf_rest + best) / (bare_rest + best)


# ---------------------------------------------------------------- Prefect, contention, machine


@contextlib.contextmanager
def _prefect(server: bool, workspace: Path, env: dict[str, str]) -> Iterator[str]:
    """Ephemeral mode (no PREFECT_API_URL), or a `prefect server start` of ours for the run."""
    if not server:
        yield "ephemeral (a temporary server per stage process)"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    server_env = env | {"PREFECT_HOME": str(workspace / "prefect-server")}  # its own database
    log = (workspace / "logs" / "prefect-server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=workspace,
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with its uvicorn child
    )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prefect server did not start, see {log.name}")
            time.sleep(0.5)
        env["PREFECT_API_URL"] = url
        yield f"running server (`prefect server start`, {url})"
    finally:
        env.pop("PREFECT_API_URL", None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class _OtherCPU:
    """Samples, once a second, the CPU use of every process outside this benchmark's tree."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _OtherCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float:
        inside = [cores for t, cores in self.samples if start <= t <= end]
        return statistics.fmean(inside) if inside else 0.0

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        known: dict[int, psutil.Process] = {}
        while not self._stop.wait(1.0):
            with contextlib.suppress(psutil.Error):
                ours = {me.pid} | {child.pid for child in me.children(recursive=True)}
            total = 0.0
            for proc in psutil.process_iter():
                if proc.pid in ours:
                    continue
                proc = known.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.Error):
                    total += proc.cpu_percent(None)  # since the previous sample (0 the first time)
            self.samples.append((time.perf_counter(), total / 100))


def _machine() -> dict[str, Any]:
    import importlib.metadata

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["ram_gb"] = round(kb / 2**20, 1)
    for name in ("torch", "transformers", "trl", "prefect", "mlflow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[name] = importlib.metadata.version(name)
    info["gpu"] = shutil.which("nvidia-smi") is not None
    return info


# ---------------------------------------------------------------- output


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if key in ("ratio", "same_train_ratio", "other_cpu") else f"{value:.1f}"


def _format_short(run: dict[str, Any]) -> str:
    return ", ".join(f"{header} {_fmt(run.get(key), key)}" for key, header in COLUMNS[:4])


def _markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"### {report['stage']} — Prefect {report['prefect']}",
        "",
        f"{machine['cores']} cores ({machine['cpu']}), GPU: {'yes' if machine['gpu'] else 'no'}; "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"trl {machine.get('trl')}, prefect {machine.get('prefect')}, "
        f"mlflow {machine.get('mlflow')}. Seconds; ratio = rlhf wall / bare wall (budget ≤ 1.10); "
        "other CPU = cores used by other processes meanwhile (contended above ~0.2).",
        "",
        "| repeat | " + " | ".join(header for _, header in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['repeat']} | " + " | ".join(_fmt(run.get(k), k) for k, _ in COLUMNS) + " |"
        )
    median = report["median"]
    lines.append("| **median** | " + " | ".join(_fmt(median.get(k), k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
