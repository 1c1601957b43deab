"""One `dvc repro` of the whole pipeline for the e2e package: a git + DVC copy of the repository
at sizes where every stage learns (LEARNING), run once and shared by the DVC tests
(test_dvc_repro.py) and the learning tests (test_learning.py).

The first run's results are kept aside (`project["first"]`) before the DVC tests change
params and rerun stages, so each test reads what the first `dvc repro` produced whatever order
the tests run in."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from ruamel.yaml import YAML

from flows.infra.deployment import BIN
from flows.infra.services import stop_recorded
from flows.infra.testing import GIT_IDENTITY, REPO, clean_env, copy_repo

SEED = int(os.environ.get("RLHF_TEST_SEED", "42"))
"""`common.seed` of the run: data, base model and every stage. The margins of test_learning.py
were checked with 42 (the default), 7 and 1: `RLHF_TEST_SEED=7 pytest -m learning tests/e2e`."""

LEARNING: dict[str, Any] = {
    "common.seed": SEED,
    # The default tiny model (3 layers); enough data for held-out splits of ~100 pairs and ~60
    # prompts, and for the reward model and DPO to generalise to them.
    "data.eval_fraction": 0.2,
    "data.synthetic.num_sft": 1000,
    "data.synthetic.num_preference": 600,
    "data.synthetic.num_prompts": 300,
    "sft.trainer.num_train_epochs": 3,
    "sft.trainer.eval_strategy": "no",
    "reward_model.trainer.num_train_epochs": 2,
    "dpo.trainer.num_train_epochs": 2,
    "simpo.trainer.num_train_epochs": 3,
    "ppo.num_iterations": 8,
    "ppo.rollout_batch_size": 32,
    "ppo.checkpoint_every": 100,  # no checkpoint: the faults tests resume
    "ppo.sample_every": 4,
    "grpo.rewards": {"ground_truth": 1.0},  # one online stage on the verifiable reward (RLVR)
    "grpo.trainer.max_steps": 30,
    "grpo.trainer.learning_rate": 3.0e-4,
    "grpo.sample_every": 10,
    "rloo.trainer.max_steps": 30,
    "rloo.sample_every": 10,
    "evaluate.max_prompts": 64,
    "evaluate.best_of_n": [2],  # best-of-n's plumbing; its numbers are not read here
    "tracking.system_metrics_interval_s": 0.5,  # short stages still sample the system
}
"""Sizes at which every stage learns on a 2-core CPU (the whole `dvc repro` in about a minute on
a quiet machine): the DVC tests exercise the real pipeline and the learning tests read what it
learnt."""

KEPT = (  # what the learning tests read of the first run, and what their broken reruns start from
    "params.yaml",
    "metrics",
    "plots",
    "data/prepared",
    "models/sft",
    "models/dpo",
    "models/reward_model",
)


@pytest.fixture(scope="package")
def project(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: None
) -> Iterator[dict[str, Any]]:
    """A git + DVC copy of the repository (committed and uncommitted-but-not-ignored files),
    minus any stage output and dvc.lock, with LEARNING params and its own MLflow store
    (flows.infra.testing.copy_repo and clean_env), after one `dvc repro` of every stage.

    Stages report to the session's Prefect server and start in a warm process of the copy
    (flows/infra/warm.py), as `dvc repro` runs them for a user; it is stopped at the end.
    → repo, root, env, stages (dvc.yaml's), output (of the first dvc repro), first (a copy of
    KEPT as that run left it)."""
    import prefect.settings

    root = tmp_path_factory.mktemp("e2e")
    repo = copy_repo(root / "repo", LEARNING, sizes={})
    env = clean_env(repo, root) | GIT_IDENTITY  # `dvc exp run` commits
    env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    try:
        done = subprocess.run(
            [str(BIN / "dvc"), "repro"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        output = done.stdout + done.stderr
        if done.returncode != 0:
            pytest.fail(f"dvc repro exited {done.returncode}:\n{output[-6000:]}")
        first = root / "first"
        for rel in KEPT:
            copy = shutil.copytree if (repo / rel).is_dir() else shutil.copy2
            (first / rel).parent.mkdir(parents=True, exist_ok=True)
            copy(repo / rel, first / rel)
        yield {
            "repo": repo,
            "root": root,
            "env": env,
            "stages": stages,
            "output": output,
            "first": first,
        }
    finally:
        stop_recorded(repo / ".rlhf")
