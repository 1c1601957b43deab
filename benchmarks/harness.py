"""What the timing benchmarks share and the tests do not: their common options, a scratch
workspace, untimed commands, the results table, the machine they ran on and how busy it was.
What the tests need too (params, services, a copy of the repository) is in flows/infra/testing.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.infra.deployment import BIN

Columns = Sequence[tuple[str, str]]  # (key of a run's result, header of its column)


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, repeats: str
) -> argparse.Namespace:
    """`parser`'s arguments and those of every timing benchmark (--repeats, counting `repeats`;
    --json; --keep), checked, with the `rlhf` it runs next to this Python."""
    parser.add_argument("--repeats", type=int, default=3, help=f"{repeats} (default: 3)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace and logs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: must be at least 1")
    if not (BIN / "rlhf").is_file():
        parser.error(f"no `rlhf` next to {sys.executable}: run with the project's .venv/bin/python")
    signal.signal(signal.SIGTERM, _stop_with_children)
    return args


def _stop_with_children(signum: int, _: Any) -> None:
    """A stopped benchmark stops what it started (`dvc repro`, its stage, a server): a SIGTERM
    reaches only this process, unlike Ctrl-C, which the terminal sends to the whole group."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()
    sys.exit(128 + signum)


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary directory for the workspace and logs, removed when the block ends; kept (and
    named on stderr) with `keep`, or when the block failed, to read the logs."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    failed = True
    try:
        yield root
        failed = False
    finally:
        if keep or failed:
            print(f"workspace and logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_logged(command: list[str], cwd: Path, env: Mapping[str, str], log: Path) -> None:
    """Run `command` (an untimed step) to its end, its output in `log`; SystemExit with the
    log's last lines if it fails."""
    with log.open("w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}), see {log}:\n{tail}")


def medians(runs: list[dict[str, Any]], columns: Columns) -> dict[str, float]:
    """The median of each column over the runs that have a value for it."""
    found = {key: [run[key] for run in runs if run.get(key) is not None] for key, _ in columns}
    return {key: statistics.median(values) for key, values in found.items() if values}


def markdown_table(
    report: Mapping[str, Any], columns: Columns, cell: Callable[[str, Any], str]
) -> list[str]:
    """The lines of a Markdown table: a row per repeat (`report["runs"]`), then the medians
    (`report["median"]`); `cell(key, value)` writes a value (None where a run has none)."""
    lines = [
        "| repeat | " + " | ".join(header for _, header in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    rows = [(run["repeat"], run) for run in report["runs"]] + [("**median**", report["median"])]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(cell(k, row.get(k)) for k, _ in columns) + " |")
    return lines


# ---------------------------------------------------------------- the machine


class OtherCPU:
    """Samples, once a second, the CPU use of every process outside this benchmark's tree and
    not working in `ours` (the stages' shared Prefect server and warm process, and the warm
    process's forks, run outside the tree but in the benchmark's workspace)."""

    def __init__(self, ours: Path | None = None) -> None:
        self.ours = str(ours) if ours else None
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> OtherCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float:
        inside = [cores for t, cores in self.samples if start <= t <= end]
        return statistics.fmean(inside) if inside else 0.0

    def _works_in_ours(self, proc: Any) -> bool:
        import psutil

        try:
            return self.ours is not None and proc.cwd().startswith(self.ours)
        except psutil.Error:
            return False

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        known: dict[int, psutil.Process] = {}
        while not self._stop.wait(1.0):
            with contextlib.suppress(psutil.Error):
                ours = {me.pid} | {child.pid for child in me.children(recursive=True)}
            total = 0.0
            for proc in psutil.process_iter():
                if proc.pid in ours or self._works_in_ours(proc):
                    continue
                proc = known.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.Error):
                    total += proc.cpu_percent(None)  # since the previous sample (0 the first time)
            self.samples.append((time.perf_counter(), total / 100))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, Python, the libraries' versions, and whether there is a GPU."""
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
