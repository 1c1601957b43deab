"""PPO memory: peak resident memory and parameter + optimizer bytes per process, four ways.

    .venv/bin/python benchmarks/ppo_memory.py                          # the tiny default model
    .venv/bin/python benchmarks/ppo_memory.py --model path/to/hf-model # and a local HF model

For each model (the tiny default that `prepare` builds, and any local HF model directory: no
hub), a scratch workspace gets `prepare`'s data, models/sft = the model and models/reward_model
= a 1-label classifier on it (untrained: memory does not depend on training). Then PPO runs
`--iterations` iterations (a checkpoint after the first, then the export to models/ppo/) in:

- `full`: one process, full fine-tuning (actor, reference, critic, reward: four models);
- `lora`: one process, `ppo.lora` (the frozen models are the trained ones' bases);
- `ddp x2`: `torchrun --nproc_per_node 2`, full fine-tuning, each process holds everything;
- `fsdp x2`: the same under accelerate's FSDP config (every model sharded over the two);
- `lora stage`: `rlhf stage ppo` with `ppo.lora`, cold (RLHF_WARM=0), as a user runs it: Prefect,
  MLflow, the samples table after training.

Each rank reports its peak RSS (ru_maxrss, the whole process) and the bytes it holds in the
parameters of its models (shards under FSDP, a tensor shared by two models once) and in its
optimizers' state, read after the last update. "model sizes" is the peak RSS above the same
setting on the tiny default, over the model's float32 weight bytes: the copies of the model a
setting holds at its peak (issue 20's measure). Results go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import machine_info, run_logged, scratch_dir  # noqa: E402
from flows.infra.deployment import BIN  # noqa: E402
from flows.infra.testing import write_params  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
SIZES = {"ppo.rollout_batch_size": 16, "ppo.mini_batch_size": 8, "ppo.max_new_tokens": 16,
         "ppo.checkpoint_every": 1, "ppo.sample_every": 1000}  # fmt: skip
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what docs/accelerate/fsdp.yaml sets
SETTINGS = ("full", "lora", "ddp x2", "fsdp x2", "lora stage")
MARK = "ppo-memory: "


def measure(params_file: Path) -> dict[str, float]:
    """PPO in this process (one rank of a launch) with the workspace's params: its memory."""
    import mlflow

    import flows  # noqa: F401  (offline defaults)
    import tasks.ppo.train as train
    from tasks.params import load_params

    train.rollout, train.update = train.rollout.fn, train.update.fn  # no Prefect around them
    runs = []
    setup = train.setup

    def kept(params: Any) -> Any:  # the run, to read its models and optimizers at the end
        runs.append(setup(params))
        return runs[-1]

    train.setup = kept
    params = load_params(params_file)
    main = int(os.environ.get("RANK", "0")) == 0
    with mlflow.start_run() if main else contextlib.nullcontext():
        train.train_ppo(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return model_bytes(runs[0]) | {"peak_rss_mb": peak}


def model_bytes(run: Any) -> dict[str, float]:
    """MB this process holds in its models' parameters and its optimizers' state."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(tensor: Any) -> Any:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    models = [run.accelerator.unwrap_model(m) for m in (run.actor, run.critic)]
    # a frozen model is a module of its own, or (LoRA) a trained one with its adapter disabled
    models += [
        m if isinstance(m, torch.nn.Module) else m.model for m in (run.reference, run.reward)
    ]
    tensors = {id(p): local(p) for model in models for p in model.parameters()}
    storage = {t.data_ptr(): t.numel() * t.element_size() for t in tensors.values()}
    moments = [
        local(value)
        for optimizer in (run.actor_optimizer, run.critic_optimizer)
        for state in optimizer.state.values()
        for value in state.values()
        if hasattr(value, "numel") and value.dim() > 0
    ]
    return {
        "param_mb": sum(storage.values()) / 2**20,
        "optimizer_mb": sum(t.numel() * t.element_size() for t in moments) / 2**20,
    }


def build(root: Path, model: Path | None) -> tuple[Path, float]:
    """A workspace at `root` (data, models/sft, models/reward_model) for the tiny default or
    `model` → (its params file, the policy's float32 weight MB)."""
    import torch

    overrides: dict[str, Any] = dict(SIZES)
    if model is not None:
        overrides["model.base"] = str(model.resolve())
    params_file = write_params(root / "params.yaml", overrides)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "RLHF_WARM": "0"}
    prepare = [str(BIN / "rlhf"), "stage", "prepare", "--params", str(params_file)]
    run_logged(prepare, root, env, root / "prepare.log")
    run_logged([str(BIN / "rlhf"), "down"], root, env, root / "down.log")
    sft = root / "models" / "sft"
    if model is None:
        shutil.copytree(root / "models" / "base", sft)
    else:
        sft.symlink_to(model.resolve(), target_is_directory=True)
    from tasks.models import load_scorer, load_tokenizer
    from tasks.params import load_params

    params = load_params(params_file)
    tokenizer = load_tokenizer(sft, params.model)
    reward = load_scorer(sft, params.model, torch.float32, tokenizer.pad_token_id)
    reward.save_pretrained(root / "models" / "reward_model")
    tokenizer.save_pretrained(root / "models" / "reward_model")
    stats = {"reward_mean": 0.0, "reward_std": 1.0}
    (root / "models" / "reward_model" / "reward_stats.json").write_text(json.dumps(stats))
    weights = sum(p.numel() for n, p in reward.named_parameters() if not n.startswith("score"))
    return params_file, weights * 4 / 2**20


def run_setting(root: Path, params_file: Path, setting: str, iterations: int) -> dict[str, Any]:
    """One setting in `root` → the largest peak RSS and bytes over its processes."""
    lora = {"ppo.lora": LORA} if "lora" in setting else {}
    params = write_params(root / "run.yaml", {"ppo.num_iterations": iterations, **lora},
                          base=params_file)  # fmt: skip
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "RLHF_WARM": "0"}
    env |= {"OMP_NUM_THREADS": "1"} if "x2" in setting else {}
    env |= FSDP if setting.startswith("fsdp") else {}
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    if setting == "lora stage":
        return {"processes": 1, "peak_rss_mb": _stage_rss(root, params, env)}
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2"] if "x2" in setting else []
    command = [
        *launcher,
        *([] if launcher else [sys.executable]),
        __file__,
        "--worker",
        str(params),
    ]
    log = root / f"{setting.replace(' ', '-')}.log"
    run_logged(command, root, env, log)
    ranks = [json.loads(line.split(MARK, 1)[1]) for line in log.read_text().splitlines()
             if MARK in line]  # fmt: skip
    row = {key: max(rank[key] for rank in ranks) for key in ranks[0]}
    return row | {"processes": len(ranks)}


def _stage_rss(root: Path, params: Path, env: dict[str, str]) -> float:
    """Peak RSS (MB) of `rlhf stage ppo` itself (not the Prefect server it starts)."""
    with (root / "stage.log").open("w") as out:
        stage = subprocess.Popen(
            [str(BIN / "rlhf"), "stage", "ppo", "--params", str(params)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(stage.pid, 0)
    run_logged([str(BIN / "rlhf"), "down"], root, env, root / "down.log")
    if status:
        raise SystemExit(f"rlhf stage ppo failed, see {root / 'stage.log'}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a local HF model directory (config.json)")
    parser.add_argument("--iterations", type=int, default=2, help="PPO iterations per setting")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces and logs")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one rank of one setting, in the workspace (the cwd)
        sys.stdout.write(MARK + json.dumps(measure(args.worker) | rank()) + "\n")
        return
    settings = args.settings.split(",")
    if unknown := set(settings) - set(SETTINGS):
        parser.error(f"--settings: unknown {sorted(unknown)} (choose from {', '.join(SETTINGS)})")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model: {args.model} is not a model directory (no config.json)")
    results: dict[str, Any] = {"machine": machine_info(), "models": {}}
    with scratch_dir("rlhf-ppo-memory-", args.keep) as scratch:
        models = {"tiny default": None} | ({str(args.model): args.model} if args.model else {})
        for name, model in models.items():
            root = scratch / f"model-{len(results['models'])}"
            root.mkdir()
            params_file, weight_mb = build(root, model)
            rows = {s: run_setting(root, params_file, s, args.iterations) for s in settings}
            results["models"][name] = {"weight_mb": weight_mb, "settings": rows}
            print(f"{name}: done", file=sys.stderr)
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def rank() -> dict[str, int]:
    return {"rank": int(os.environ.get("RANK", "0"))}


def table(results: dict[str, Any]) -> list[str]:
    """The Markdown table: a row per (model, setting)."""
    tiny = results["models"]["tiny default"]["settings"]
    lines = [
        "| model | setting | processes | peak RSS / process | params / process "
        "| optimizer / process | params + optimizer | model sizes at peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in results["models"].items():
        for setting, row in model["settings"].items():
            held = row.get("param_mb", 0) + row.get("optimizer_mb", 0)
            sizes = (row["peak_rss_mb"] - tiny[setting]["peak_rss_mb"]) / model["weight_mb"]
            cells = [f"{row['peak_rss_mb']:,.0f} MB"] + [
                f"{row[k]:,.1f} MB" if k in row else "—" for k in ("param_mb", "optimizer_mb")
            ]
            cells += [f"{held:,.1f} MB" if "param_mb" in row else "—"]
            cells += [f"{sizes:.2f}" if name != "tiny default" else "—"]
            lines.append(f"| {name} | {setting} | {row['processes']} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
