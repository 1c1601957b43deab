"""PPO throughput: rollout tokens/s, update tokens/s, episodes/s and peak RSS, per model size.

    .venv/bin/python benchmarks/ppo_throughput.py                 # default + large
    .venv/bin/python benchmarks/ppo_throughput.py --config default --iterations 10

`default` measures the trained tiny models of this workspace (models/sft, models/reward_model,
data/prepared: run `dvc repro ppo` first) with params.yaml's ppo section. `large` builds a
~25M-parameter Llama (hidden 512, 8 layers) on the synthetic data in a temp dir, untrained, so
its responses run to max_new_tokens: the worst case for the rollout. Each config runs in its own
process (peak RSS is that process's), iterations after the first are averaged (the first pays
one-off allocation costs). Results go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LARGE = {"vocab_size": 512, "hidden_size": 512, "intermediate_size": 1408, "num_layers": 8,
         "num_heads": 8, "max_position_embeddings": 96}  # fmt: skip


def measure(workdir: Path, params_file: Path, iterations: int) -> dict[str, float]:
    """Run `iterations` PPO iterations in `workdir` (inside this process) and average them."""
    os.chdir(workdir)
    sys.path.insert(0, str(REPO))
    import flows  # noqa: F401  (offline defaults)
    from tasks.params import load_params
    from tasks.ppo.run import setup
    from tasks.ppo.train import rollout, update

    params = load_params(params_file)
    leave_alone = Path("checkpoints/ppo").exists()  # a real run's resumable state
    run = setup(params)
    rows = []
    for iteration in range(iterations):
        began = time.perf_counter()
        experience, stats = rollout.fn(run, iteration)
        stats |= update.fn(run, experience, iteration)
        stats["episodes_per_s"] = params.ppo.rollout_batch_size / (time.perf_counter() - began)
        rows.append(stats)
    steady = rows[1:] or rows

    def mean(key: str) -> float:
        return sum(row[key] for row in steady) / len(steady)

    if not leave_alone:
        shutil.rmtree("checkpoints/ppo", ignore_errors=True)
    actor = run.accelerator.unwrap_model(run.actor)
    return {
        "parameters_m": sum(p.numel() for p in actor.parameters()) / 1e6,
        "rollout_tokens_per_s": mean("time/rollout_tokens_per_s"),
        "update_tokens_per_s": mean("time/update_tokens_per_s"),
        "episodes_per_s": mean("episodes_per_s"),
        "response_length": mean("val/response_length"),
        "rollout_s": mean("time/rollout_s"),
        "update_s": mean("time/update_s"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_large(root: Path) -> Path:
    """A temp workspace with the synthetic data and an untrained ~25M model as sft + reward."""
    sys.path.insert(0, str(REPO))
    from flows.infra.testing import write_params

    large = {f"model.tiny.{key}": value for key, value in LARGE.items()}
    params_file = write_params(root / "params.yaml", large)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    rlhf = [str(REPO / ".venv" / "bin" / "rlhf"), "stage", "prepare", "--params", str(params_file)]
    subprocess.run(rlhf, cwd=root, env=env, check=True, capture_output=True)
    shutil.copytree(root / "models" / "base", root / "models" / "sft")
    script = (
        "import json, sys; from transformers import AutoModelForSequenceClassification as C\n"
        "m = C.from_pretrained('models/sft', num_labels=1)\n"
        "m.save_pretrained('models/reward_model')\n"
        "json.dump({'reward_mean': 0.0, 'reward_std': 1.0},"
        " open('models/reward_model/reward_stats.json', 'w'))\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, capture_output=True)
    return params_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["default", "large", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=6, help="per config (first is warm-up)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("WORKDIR", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one config, in this process
        print(json.dumps(measure(Path(args.worker[0]), Path(args.worker[1]), args.iterations)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-ppo-bench-") as tmp:
        for name in ["default", "large"] if args.config == "both" else [args.config]:
            if name == "default":
                workdir, params_file = REPO, REPO / "params.yaml"
            else:
                workdir, params_file = Path(tmp), build_large(Path(tmp))
            command = [sys.executable, __file__, "--iterations", str(args.iterations)]
            done = subprocess.run(
                [*command, "--worker", str(workdir), str(params_file)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    keys = list(next(iter(results.values())))
    print("| config | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[key]:.3g}" for key in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
