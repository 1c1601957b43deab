"""`rlhf`: the command line. `rlhf stage <name>` is what every dvc.yaml stage runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks.errors import MissingInput, ParamsError, Terminated, TrainingDiverged, UserError
from tasks.params import check_trainers, load_params, locate
from tasks.stages import MODELS_DIR, POLICIES, STAGE, STAGES, producer

EXAMPLES = """examples:
  rlhf stage prepare                      run one stage in-process (as `dvc repro` does)
  rlhf stage sft --params my-params.yaml  the same with another params file
  dvc repro                               run every stage whose inputs changed
  rlhf generate --model models/ppo "What is 3 plus 4?"
  rlhf generate --compare "What is 3 plus 4?"   every trained policy, side by side
  rlhf up --worker gpu && rlhf deploy     local Prefect + MLflow servers, a worker, deployments
  RLHF_ORCHESTRATION=deployment dvc repro  every stage runs on the worker pool
  RLHF_ORCHESTRATION=deployment,prepare=local,evaluate=local dvc repro   training on the worker
  rlhf replay .rlhf/tracking/ppo-20261203-142357-4242.jsonl   MLflow records kept in an outage
  rlhf report sweep                       gold and proxy against √KL across DVC experiments
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Reproducible RLHF pipeline, stage by stage: "
        + ", ".join(spec.name for spec in STAGES)
        + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stage = commands.add_parser(
        "stage",
        help="run one pipeline stage",
        epilog="stages:\n"
        + "".join(f"  {spec.name:<14}{spec.description}\n" for spec in STAGES)
        + "\n"
        + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one stage's Prefect flow: load params, open the stage's MLflow run, "
        "write models/<stage>/ and metrics/<stage>.json.",
    )
    stage.add_argument(
        "name", choices=[spec.name for spec in STAGES], metavar="NAME", help="a stage (below)"
    )
    stage.add_argument("--params", type=Path, default=Path("params.yaml"), help="%(default)s")
    stage.set_defaults(run=run_stage)

    generate = commands.add_parser(
        "generate",
        help="answer prompts with a trained policy (or --compare all of them)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate with the KV cache, greedy unless --sample. Plain prompts get a "
        "trailing newline, as the synthetic task's prompts have; --chat renders each prompt as a "
        "user message through the tokenizer's chat template.",
    )
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=MODELS_DIR / "ppo", help="model directory")
    source.add_argument("--compare", action="store_true", help="every policy in models/")
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--params", type=Path, default=Path("params.yaml"), help="for device")
    generate.set_defaults(run=run_generate)

    deploy = commands.add_parser(
        "deploy",
        help="register the stage and pipeline deployments (prefect.yaml) with the Prefect server",
        description="Create the work pool if missing (process type) and run `prefect deploy "
        "--all`: deployments <stage>/<pool>. Needs PREFECT_API_URL.",
        epilog="examples:\n"
        "  rlhf deploy --pool gpu                      runs work in this directory (a worker\n"
        "                                              on this box or a shared file system)\n"
        "  rlhf deploy --pool gpu --workspace clone    runs work in each worker's own clone;\n"
        "                                              data moves through the DVC remote\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_argument("--pool", help="work pool (default: orchestration.work_pool)")
    deploy.add_argument(
        "--workspace",
        choices=("shared", "clone"),
        default="shared",
        help="where the runs work: this workspace, shared with the worker (default), or the "
        "worker's own checkout of the git remote (docs/gpu-worker.md)",
    )
    deploy.add_argument(
        "--repository",
        metavar="URL",
        help="--workspace clone: the git remote the workers clone (default: origin's URL)",
    )
    deploy.add_argument("--params", type=Path, default=Path("params.yaml"))
    deploy.set_defaults(run=run_deploy)

    up = commands.add_parser(
        "up",
        help="start a local Prefect server and MLflow server on 127.0.0.1",
        description="Background services for the UIs (state and logs in .rlhf/); "
        "`rlhf down` stops them.",
    )
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--mlflow-port", type=int, default=5000)
    up.add_argument("--worker", metavar="POOL", help="also start a process worker on POOL")
    up.set_defaults(run=lambda a: _services().up(a.prefect_port, a.mlflow_port, a.worker) or 0)
    down = commands.add_parser("down", help="stop what `rlhf up` and the stages started")
    down.set_defaults(run=lambda a: _services().down() or 0)
    replay = commands.add_parser(
        "replay",
        help="deliver the MLflow records a stage kept while its tracking server was away",
        description="Send a spool file a stage left (.rlhf/tracking/*.jsonl) to its MLflow "
        "server, in order; what cannot be sent yet stays in the file.",
        epilog="example:\n  rlhf replay .rlhf/tracking/dpo-20261203-142357-4242.jsonl\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("file", type=Path, help="the file the stage's warning names")
    replay.set_defaults(
        run=lambda a: importlib.import_module("tasks.tracking_queue").command(a.file)
    )
    report = commands.add_parser("report", help="pictures and tables from the MLflow store")
    sweep = report.add_subparsers(dest="report", required=True, metavar="REPORT").add_parser(
        "sweep",
        help="gold and proxy against √KL across the DVC experiments of a sweep",
        description="Each DVC experiment's evaluate point per policy (runs tagged rlhf.dvc_exp),"
        " labelled by the params that differ; those that differ only in common.seed: mean ± std.",
        epilog="example: dvc exp run --queue -S 'ppo.kl_coef=0.01,0.1,0.3' && dvc queue start;"
        " then: rlhf report sweep",
    )
    sweep.add_argument("--out", type=Path, default=Path("sweep/overoptimisation.png"), help="PNG")
    sweep.add_argument("--experiment", metavar="NAME", help="MLflow's (tracking.experiment)")
    sweep.add_argument("--params", type=Path, default=Path("params.yaml"), help="its tracking")
    sweep.set_defaults(
        run=lambda a: importlib.import_module("tasks.sweep").command(a.out, a.experiment, a.params)
    )
    serve = commands.add_parser("warm-serve")  # flows/infra/warm.py starts it: no help, no user's
    serve.add_argument("state_dir", type=Path)
    serve.add_argument("key")
    serve.set_defaults(run=_warm_serve)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # as given: a warm start runs it again
    try:
        return args.run(args)
    except UserError as exc:  # already phrased for the user: one line
        if args.debug:
            raise
        diverged = isinstance(exc, TrainingDiverged)
        if not (diverged and int(os.environ.get("RANK", "0")) > 0):
            # (every rank stops on a divergence together: rank 0 says it once)
            print(f"rlhf: error: {_located(exc, getattr(args, 'params', None))}", file=sys.stderr)
        if diverged:
            _all_ranks_stopped()
        return 1
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:  # SIGTERM: a worker cancelling the run, `docker stop`
        print(f"rlhf: stopped by {exc}: {_kept(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:  # a bug, or a library's error we did not foresee
        if args.debug:
            raise
        text = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"rlhf: internal error: {type(exc).__name__}: {text} "
            "(rerun with `rlhf --debug ...` for the traceback)",
            file=sys.stderr,
        )
        return 1


def _all_ranks_stopped() -> None:
    """Under torchrun every rank raises the divergence in the same step. The first to exit
    has torchrun SIGTERM the others: rank 1, with nothing to say, would cut rank 0 off before
    it ended its MLflow run as FAILED and said why. So no rank leaves before all got here (a
    rank that died instead has torchrun stop this one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _terminate(signum: int, _: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def _kept(args: argparse.Namespace) -> str:
    """What a stopped command left: a stage keeps its checkpoints and no partial output."""
    if args.command != "stage" or STAGE[args.name].kind not in ("trl", "ppo"):
        return "nothing was written"
    return f"no output was written; a rerun resumes from checkpoints/{args.name}/ if one was saved"


def stage_flow(name: str) -> Callable:
    """The Prefect flow of a stage: `flows/<name>.py` defines a flow called `<name>`."""
    return getattr(importlib.import_module(f"flows.{name}"), name)


def run_stage(args: argparse.Namespace) -> int:
    from flows.infra import outage, warm
    from flows.infra.deployment import placement, run_on_worker
    from flows.infra.prefect_server import shared_prefect
    from flows.infra.services import end_with_launcher
    from tasks.stages import state_dir

    # What can be checked without torch or Prefect fails here, in a second.
    signal.signal(signal.SIGTERM, _terminate)  # a warm start forwards it to its fork
    end_with_launcher()
    params = load_params(args.params, trainers=False)  # the TRL fields below: they import TRL
    try:
        _check_inputs(args.name, params)
    except UserError:  # a mistake in the params file is reported first, wherever it is
        check_trainers(params, args.params)
        raise
    start = time.perf_counter()
    backend, pool = placement(args.name, params)
    if backend == "deployment":
        _prefect_console(args.debug)
        run_on_worker(args.name, params, pool)
        print(f"rlhf: {args.name} done on the worker in {time.perf_counter() - start:.1f}s")
        return 0
    warm.prestart(state_dir())  # imports while the Prefect server starts, for this or the next
    with shared_prefect() as api:  # before Prefect loads its settings
        if "prefect" in sys.modules:  # imported early (a caller in-process): load them again
            import prefect.context

            prefect.context.refresh_global_settings_context()
        if (code := warm.delegate(["rlhf", *args.argv], state_dir())) is not None:
            return code  # the warm fork ran all of this command, cheap checks included
        # Every stage's `trainer:`, before anything trains (a warm fork has TRL imported). Not
        # on the worker path: it imports TRL, seconds spent only to send the run away.
        check_trainers(params, args.params)
        _prefect_console(args.debug)
        from prefect import tags

        from tasks.tracking import process_tag

        # The tag: the next start crashes the flow run if this process dies.
        with tags(process_tag()), outage.watch(api):
            metrics = outage.outcome(lambda: stage_flow(args.name)(params))
    summary = ", ".join(f"{key}={value:.4g}" for key, value in list(metrics.items())[:6])
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once
        print(f"rlhf: {args.name} done in {time.perf_counter() - start:.1f}s: {summary}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from tasks.models import locate as locate_model

    # No flow runs here: Prefect (imported with the generation code) has nothing to send.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

    params = load_params(args.params, trainers=False)  # for the device: no TRL
    models = [MODELS_DIR / name for name in POLICIES] if args.compare else [args.model]
    models = [path for path in models if not args.compare or (path / "config.json").is_file()]
    if not models:
        raise MissingInput(f"{MODELS_DIR}: no trained policy yet; run `dvc repro`")
    locate_model(models[0])  # a missing model fails before the slow imports
    import torch

    from tasks.generation import generate_texts, load_policy, render_prompts

    if args.chat:
        prompts = [[{"role": "user", "content": text}] for text in args.prompt]
    else:
        prompts = [text if text.endswith("\n") else text + "\n" for text in args.prompt]
    answers = {}
    for path in models:
        model, tokenizer = load_policy(path, params)
        torch.manual_seed(args.seed)  # --sample: the same draw for every policy
        answers[path.name] = generate_texts(
            model,
            tokenizer,
            render_prompts(prompts, tokenizer),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
        )
    width = max(len(name) for name in answers)
    for index, text in enumerate(args.prompt):
        print(text.strip())
        for name, responses in answers.items():
            printable = "".join(ch if ch.isprintable() else " " for ch in responses[index])
            print(f"  {name:<{width}}  {' '.join(printable.split())}")  # one line per policy
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    from flows.infra.deployment import deploy

    pool = args.pool or load_params(args.params).orchestration.work_pool
    deploy(pool, args.workspace, args.repository)
    return 0


def _services() -> ModuleType:
    """flows.infra.services, imported only for `up`/`down`."""
    import flows.infra.services

    return flows.infra.services


def _warm_serve(args: argparse.Namespace) -> int:
    """The warm process (flows/infra/warm.py); each fork runs `main` and flushes what it owes."""
    from flows.infra import warm

    def run_and_flush(argv: list[str]) -> int:
        code = main(argv)
        flush()
        return code

    return warm.serve(args.state_dir, args.key, run_and_flush)


def _located(exc: UserError, params_file: Path | None) -> str:
    """The message; a params error raised after loading also names the file and line."""
    if isinstance(exc, ParamsError) and exc.key and params_file is not None:
        return f"{locate(params_file, exc.key)}: {exc}"
    return str(exc)


class _ConsoleErrorsOnce(logging.Filter):
    """Prefect reports a failing run several times on the console; the user gets our one line.
    The Prefect API (UI) handlers still receive everything, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        return record.levelno < logging.ERROR and "in state Failed" not in record.getMessage()


def _prefect_console(debug: bool) -> None:
    """Prefect's logging, its repeated error reports left out of the console unless --debug."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ConsoleErrorsOnce())


def _check_inputs(stage: str, params: Any) -> None:
    """The outputs of other stages that `stage` reads exist (evaluate: those of the listed
    policies), and local raw data parses: a missing or malformed file is one line at once."""
    spec = STAGE[stage]
    unlisted = set(POLICIES) - set(params.evaluate.policies) if spec.kind == "evaluate" else set()
    for path in spec.inputs:
        if path != "data/raw" and producer(path) not in unlisted and not Path(path).exists():
            raise MissingInput(f"{path}: missing; run `dvc repro {producer(path)}`")
    if spec.kind == "prepare" and params.data.source == "local":
        from tasks.data import read_local

        for kind in ("sft", "preference", "prompts"):
            if (source := getattr(params.data, kind).path) is not None:
                read_local(Path(source))


def run() -> None:
    """The `rlhf` command: `main`, then a quick exit. Prefect's logs and events and the
    standard streams are flushed; the interpreter's teardown of torch, Prefect and MLflow,
    seconds per stage with nothing left to do, is skipped."""
    code = main()
    flush()
    os._exit(code)


def flush() -> None:
    """What the process still owes others: Prefect's logs and events, the standard streams
    (MLflow's queued metrics were flushed when the stage's run ended)."""
    if "prefect" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        from flows.infra.outage import drain_s

        APILogWorker.drain_all(timeout=drain_s(10))
        EventsWorker.drain_all(timeout=drain_s(10))
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    run()
