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

from tasks.config import STAGES, load_params

EXAMPLES = """examples:
  rlhf stage prepare                      run one stage in-process (as `dvc repro` does)
  rlhf stage sft --params my-params.yaml  the same with another params file
  dvc repro                               run every stage whose inputs changed
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
    params = load_params(args.params)  # fail fast on a bad file, before Prefect starts
    start = time.perf_counter()
    metrics = stage_flow(args.name)(params)
    summary = ", ".join(f"{key}={value:.4g}" for key, value in list(metrics.items())[:6])
    print(f"rlhf: {args.name} done in {time.perf_counter() - start:.1f}s: {summary}")
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, OSError)) and text:
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
