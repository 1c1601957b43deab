"""Orchestration + tracking overhead of one TRL stage (SPEC §8: budget ratio ≤ 1.10).

For each repeat, two subprocesses run the same training on the same data with the same config:

- **rlhf**: `rlhf stage <stage>`, process start to exit — Python and library imports, params
  check, Prefect start-up (the shared server the first stage starts, or a server of the
  benchmark's with `--prefect-server`), the MLflow run with its params and tags, TRL training
  through transformers' MLflow callback, saving, the sample-generation table, shutdown;
- **bare**: `benchmarks/bare_trl.py`, the same TRL trainer, config and data with nothing around
  it (no Prefect, no MLflow, `report_to="none"`, no samples).

The ratio rlhf wall / bare wall is the overhead budget. Both run in a temporary copy of
params.yaml, dvc.yaml, dvc.lock and the outputs of the stage's upstream stages (data/prepared,
models/base and, after sft, models/sft), with MLflow in a SQLite file there, so the repository's
models/, metrics/ and mlflow.db are never written (upstream outputs missing in the repository
are built in the copy, by `rlhf stage prepare` / `rlhf stage sft`). This script reads params
with `tasks.params.load_params` and the stage's trainer, config and data from the registry
(tasks/stages.py); `bare_trl.py` imports nothing of `tasks/` (it gets a JSON job).

Breakdown of the rlhf run, from the time each of its log lines arrives:
  start-up   process start → Prefect's "Beginning flow run" (imports, params, Prefect start-up)
  Prefect    starting the shared Prefect server (the first repeat only)
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
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Importing flows (flows.infra.testing) sets the library settings of flows/__init__.py in
# os.environ: both variants get them.
from benchmarks.harness import (  # noqa: E402
    OtherCPU,
    machine_info,
    markdown_table,
    medians,
    parse_args,
    run_logged,
    scratch_dir,
)
from flows.infra.deployment import BIN  # noqa: E402
from flows.infra.services import stop_recorded  # noqa: E402
from flows.infra.testing import services, start_prefect_server, upstream, write_params  # noqa: E402
from flows.infra.transfer import stage_outputs  # noqa: E402

SHARED_SERVER = r"^rlhf: started a shared Prefect server at \S+ in ([\d.]+) s"
from tasks.params import load_params  # noqa: E402
from tasks.stages import STAGE, TRL_STAGES  # noqa: E402

BARE = Path(__file__).resolve().with_name("bare_trl.py")
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
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="start `prefect server start` on a free port for the run and point the stage at it "
        "(default: the stage starts the shared server, as under `dvc repro`)",
    )
    parser.add_argument(
        "--params", type=Path, default=REPO / "params.yaml", help="default: the repo's params.yaml"
    )
    args = parse_args(parser, argv, repeats="runs of each variant")
    params = load_params(args.params)
    section = getattr(params, args.stage)
    spec = STAGE[args.stage]
    with scratch_dir(f"rlhf-overhead-{args.stage}-", args.keep) as workspace:
        env = _workspace(workspace, args.params, args.stage)
        _prepare_inputs(workspace, env, args.stage)
        job = {
            "trainer_class": spec.trainer,
            "config_class": spec.trl_config,
            "dataset": spec.dataset,
            "head": spec.head,
            "model": _start_model(workspace, args.stage),
            "revision": params.model.revision if spec.start == "base" else None,
            "trust_remote_code": params.model.trust_remote_code,
            "seed": params.common.seed,
            "device": params.common.device,
            "dtype": params.model.dtype,
            "lora": section.lora.model_dump() if section.lora else None,
            "prepared_dir": "data/prepared",
            "trainer": section.trainer,
        }
        run_logged(
            [sys.executable, "-c", "import torch, transformers, trl, datasets, mlflow, prefect"],
            workspace,
            env,
            workspace / "logs" / "warm-up.log",
        )  # page cache, untimed
        with _prefect(args.prefect_server, workspace, env) as mode, OtherCPU() as other:
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
            "machine": machine_info(),
            "runs": runs,
            "median": medians(runs, COLUMNS),
        }
        print(_markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- the workspace


def _workspace(workspace: Path, params_file: Path, stage: str) -> dict[str, str]:
    """Copy the outputs of the stage's upstream stages into `workspace`, and `params_file`
    with the runs sent to the env's MLflow store; the environment both variants run in."""
    outputs = [out for name in upstream(stage) for out in stage_outputs(name, REPO / "dvc.yaml")]
    for name in ("dvc.yaml", "dvc.lock", *outputs):
        source, target = REPO / name, workspace / name
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # A `tracking.tracking_uri` in the params would send the runs elsewhere.
    overrides = {"tracking.tracking_uri": None}
    write_params(workspace / "params.yaml", overrides, base=params_file)
    (workspace / "logs").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "RLHF_ORCHESTRATION": "local",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Create the MLflow database (schema migrations take seconds) before anything is timed:
    # a user's mlflow.db exists after the first stage.
    run_logged(
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


def _prepare_inputs(workspace: Path, env: dict[str, str], stage: str) -> None:
    """Build what the repository lacks, in the workspace (untimed): each upstream stage with an
    output missing."""
    for name in upstream(stage):
        missing = [
            out
            for out in stage_outputs(name, workspace / "dvc.yaml")
            if not (workspace / out).exists()
        ]
        if missing:
            print(
                f"{', '.join(missing)} missing: running `rlhf stage {name}` in {workspace}",
                file=sys.stderr,
            )
            log = workspace / "logs" / f"{name}.log"
            run_logged([str(BIN / "rlhf"), "stage", name], workspace, env, log)


def _start_model(workspace: Path, stage: str) -> str:
    """The model the stage starts from: models/<start>, or the base model's name or path."""
    start = STAGE[stage].start
    if start != "base":
        return f"models/{start}"
    pointer = json.loads((workspace / "models/base/base.json").read_text())
    return pointer["name_or_path"]


# ---------------------------------------------------------------- timing the two variants


def _timed(
    cmd: list[str], workspace: Path, env: dict[str, str], log: Path, other: OtherCPU
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
    stage: str, workspace: Path, env: dict[str, str], repeat: int, other: OtherCPU
) -> dict[str, Any]:
    metrics = workspace / "metrics" / f"{stage}.json"
    metrics.unlink(missing_ok=True)
    log = workspace / "logs" / f"rlhf-{repeat}.log"
    wall, lines, cpu = _timed([str(BIN / "rlhf"), "stage", stage], workspace, env, log, other)

    def at(pattern: str) -> float | None:
        return next((t for t, line in lines if re.search(pattern, line)), None)

    started = next(
        (m for _, line in lines if (m := re.search(SHARED_SERVER, line))), None
    )  # the first repeat starts the shared server
    flow_start = at(r"Beginning flow run")
    run_open = at(r"tasks.tracking - MLflow run")
    train_end = at(r"Task run 'train-\w+' - Finished")
    samples_end = at(r"Task run 'log_samples-\w+' - Finished")
    done = at(rf"^rlhf: {stage} done in")
    return {
        "rlhf_wall_s": wall,
        "rlhf_train_s": json.loads(metrics.read_text())["train_runtime_s"],
        "startup_s": flow_start,
        "prefect_boot_s": float(started.group(1)) if started else None,
        "mlflow_open_s": run_open - flow_start if run_open and flow_start else None,
        "samples_s": samples_end - train_end if samples_end and train_end else None,
        "finish_s": done - samples_end if done and samples_end else None,
        "exit_s": wall - done if done else None,
        "rlhf_other": cpu,
    }


def _time_bare(
    job: dict[str, Any], workspace: Path, env: dict[str, str], repeat: int, other: OtherCPU
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


# ---------------------------------------------------------------- Prefect


@contextlib.contextmanager
def _prefect(server: bool, workspace: Path, env: dict[str, str]) -> Iterator[str]:
    """As `dvc repro` runs a stage (no PREFECT_API_URL: the first repeat starts the shared
    server and the warm process, flows/infra/prefect_server.py and flows/infra/warm.py, and
    the later ones reuse them), or a `prefect server start` of ours for the run."""
    if not server:
        try:
            yield "shared (started by the first repeat, as in `dvc repro`)"
        finally:
            stop_recorded(workspace / ".rlhf")
        return
    server_env = env | {"PREFECT_HOME": str(workspace / "prefect-server")}  # its own database
    with services(workspace / "logs") as started:
        url = env["PREFECT_API_URL"] = start_prefect_server(started, workspace, server_env)
        try:
            yield f"running server (`prefect server start`, {url})"
        finally:
            env.pop("PREFECT_API_URL", None)


# ---------------------------------------------------------------- output


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if key in ("ratio", "same_train_ratio", "other_cpu") else f"{value:.1f}"


def _format_short(run: dict[str, Any]) -> str:
    return ", ".join(f"{header} {_fmt(key, run.get(key))}" for key, header in COLUMNS[:4])


def _markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    heading = [
        f"### {report['stage']} — Prefect {report['prefect']}",
        "",
        f"{machine['cores']} cores ({machine['cpu']}), GPU: {'yes' if machine['gpu'] else 'no'}; "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"trl {machine.get('trl')}, prefect {machine.get('prefect')}, "
        f"mlflow {machine.get('mlflow')}. Seconds; ratio = rlhf wall / bare wall (budget ≤ 1.10); "
        "other CPU = cores used by other processes meanwhile (contended above ~0.2).",
        "",
    ]
    return "\n".join([*heading, *markdown_table(report, COLUMNS, _fmt)])


if __name__ == "__main__":
    sys.exit(main())
