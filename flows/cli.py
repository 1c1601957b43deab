"""`rlhf`: the command line. `rlhf stage <name>` is what every dvc.yaml stage runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from tasks.config import MODELS_DIR, POLICIES, STAGES, load_params

EXAMPLES = """examples:
  rlhf stage prepare                      run one stage in-process (as `dvc repro` does)
  rlhf stage sft --params my-params.yaml  the same with another params file
  dvc repro                               run every stage whose inputs changed
  rlhf generate --model models/ppo "What is 3 plus 4?"
  rlhf generate --compare "What is 3 plus 4?"   every trained policy, side by side
  rlhf up --worker gpu && rlhf deploy     local Prefect + MLflow servers, a worker, deployments
  RLHF_ORCHESTRATION=deployment dvc repro  every stage runs on the worker pool
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Reproducible RLHF pipeline: prepare → sft → reward_model → "
        "ppo / dpo / simpo → evaluate.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stage = commands.add_parser(
        "stage",
        help="run one pipeline stage",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one stage's Prefect flow: load params, open the stage's MLflow run, "
        "write models/<stage>/ and metrics/<stage>.json.",
    )
    stage.add_argument("name", choices=available_stages(), help="the stage to run")
    stage.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: params.yaml)",
    )
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
        "--all`; runs execute in this workspace. Needs PREFECT_API_URL.",
    )
    deploy.add_argument("--pool", help="work pool (default: orchestration.work_pool)")
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
    down = commands.add_parser("down", help="stop what `rlhf up` started")
    down.set_defaults(run=lambda a: _services().down() or 0)

    args = parser.parse_args(argv)
    if not args.debug:
        _hide_tracebacks()
    try:
        return args.run(args)
    except Exception as exc:  # every error ends as one line unless --debug
        if args.debug:
            raise
        print(f"rlhf: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


def available_stages() -> list[str]:
    """Stages that have a flow module (the pipeline grows one stage at a time)."""
    return [name for name in STAGES if importlib.util.find_spec(f"flows.{name}") is not None]


def stage_flow(name: str) -> Callable:
    """The Prefect flow of a stage: `flows/<name>.py` defines a flow called `<name>`."""
    return getattr(importlib.import_module(f"flows.{name}"), name)


def run_stage(args: argparse.Namespace) -> int:
    from flows.deployment import backend, run_on_worker

    # Fail fast on a bad file, before Prefect starts. The deployment backend skips the TRL check
    # of the `trainer:` sections: it would import torch here only to send the run to a worker.
    params = load_params(args.params, trainers=False)
    if backend(params) == "local":
        params = load_params(args.params)
    start = time.perf_counter()
    if backend(params) == "deployment":
        run_on_worker(args.name, params)
        print(f"rlhf: {args.name} done on the worker in {time.perf_counter() - start:.1f}s")
        return 0
    metrics = stage_flow(args.name)(params)
    summary = ", ".join(f"{key}={value:.4g}" for key, value in list(metrics.items())[:6])
    print(f"rlhf: {args.name} done in {time.perf_counter() - start:.1f}s: {summary}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    models = [MODELS_DIR / name for name in POLICIES] if args.compare else [args.model]
    models = [path for path in models if not args.compare or (path / "config.json").is_file()]
    if not models:
        raise FileNotFoundError(f"{MODELS_DIR}: no trained policy yet (run `dvc repro`)")
    if not (models[0] / "config.json").is_file():  # before the slow imports
        raise FileNotFoundError(f"{models[0]}: no model here (run its stage with `dvc repro`)")
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
    from flows.deployment import deploy

    deploy(args.pool or load_params(args.params).orchestration.work_pool)
    return 0


def _services() -> ModuleType:
    """flows.services, imported only for `up`/`down`."""
    import flows.services

    return flows.services


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    from flows.deployment import StageFailed

    if isinstance(exc, (ValueError, OSError, FloatingPointError, StageFailed)) and text:
        return text  # our errors are already phrased for the user
    return f"{type(exc).__name__}: {text} (run `rlhf --debug ...` for the traceback)"


class _ConsoleErrorsOnce(logging.Filter):
    """Prefect reports a failing run several times on the console; the user gets our one line.
    The Prefect API (UI) handlers still receive everything, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        return record.levelno < logging.ERROR and "in state Failed" not in record.getMessage()


def _hide_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ConsoleErrorsOnce())


if __name__ == "__main__":
    sys.exit(main())
