"""What a mistake in params.yaml costs before it is reported, and what checking the whole file
costs when it has none (issue 21.3).

Each case is a copy of the repository's params.yaml with one mistake, given to a fresh
`rlhf stage prepare --params <file>` in a scratch directory: the wall time from process start
to exit, the exit code and the last stderr line. A mistake the check misses lets prepare run
(exit 0): the user learns of it only when the stage of that section starts (for `rloo.trainer`,
after sft, reward_model, ppo, dpo, simpo and grpo trained). The `none` case is a valid file:
prepare at tiny sizes, for scale.

Prefect: a server of the benchmark's on a loopback port (PREFECT_API_URL), started before the
timings, and warm starts off (RLHF_WARM=0), so the figures are the checks', not a server's
start-up or a warm fork's.

`--code DIR` runs another checkout's flows/ and tasks/ (PYTHONPATH=DIR) with this venv:
`git worktree add /tmp/before <commit>` then `--code /tmp/before` gives the before column.

Example: .venv/bin/python benchmarks/params_check.py --repeats 3 --json /tmp/params-after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import OtherCPU, machine_info, parse_args, scratch_dir  # noqa: E402
from flows.infra.deployment import BIN  # noqa: E402
from flows.infra.testing import (  # noqa: E402
    SMALL,
    clean_env,
    services,
    start_prefect_server,
    write_params,
)
from tasks.stages import STAGES  # noqa: E402

CASES: dict[str, dict[str, Any]] = {  # case → overrides of params.yaml (with SMALL)
    "none": {},
    "top-level key": {"commn": {"seed": 1}},
    "data key": {"data.synthetic.num_sfft": 10},
    **{
        f"{spec.name}.trainer": {f"{spec.name}.trainer.learning_rat": 1e-4}
        for spec in STAGES
        if spec.kind == "trl"
    },
    "ppo key": {"ppo.actor_lrr": 1e-4},
    "grpo.rewards": {"grpo.rewards": {"reward_modle": 1.0}},
    "evaluate key": {"evaluate.max_promts": 8},
}


def run_case(work: Path, params: Path, env: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "rlhf"), "stage", "prepare", "--params", str(params)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("rlhf: ")]
    return {
        "seconds": time.perf_counter() - start,
        "exit": done.returncode,
        "line": (lines or [""])[-1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose code runs")
    args = parse_args(parser, argv, "runs of each case")
    report: dict[str, Any] = {"code": str(args.code), "machine": machine_info(), "cases": {}}
    with scratch_dir("rlhf-params-check-", args.keep) as root, services(root / "logs") as started:
        env = clean_env(args.code, root) | {"RLHF_WARM": "0", "OMP_NUM_THREADS": "1"}
        env["PREFECT_API_URL"] = start_prefect_server(started, root, env)
        with OtherCPU(root) as other:
            for case, overrides in CASES.items():
                runs = []
                for repeat in range(args.repeats):
                    work = root / f"{case.replace(' ', '-')}-{repeat}"
                    work.mkdir()
                    new_keys = case in ("top-level key", "data key", "ppo key", "evaluate key")
                    params = write_params(
                        work / "params.yaml",
                        SMALL | overrides,
                        base=args.code / "params.yaml",
                        new_keys=new_keys,
                    )
                    began = time.perf_counter()
                    runs.append(run_case(work, params, env))
                    runs[-1]["other_cpu"] = other.mean(began, time.perf_counter())
                seconds = statistics.median(run["seconds"] for run in runs)
                report["cases"][case] = {"median_s": seconds, "runs": runs}
                line = runs[-1]["line"].replace(str(root), "…")
                print(f"| {case} | {seconds:.1f} | {runs[-1]['exit']} | `{line[:90]}` |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
