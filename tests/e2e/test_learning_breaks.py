"""The learning tests can fail: a stage rerun with learning broken on purpose, from the inputs of
the package's first `dvc repro` and at its sizes, misses the margin test_learning.py demands of
the real run. Breaking is done on the real code path (a sign in PPO's loss call, the pairs DPO
reads), never with a stand-in for the stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_learning import dpo_learnt, dpo_margin, ppo_learnt

pytestmark = [pytest.mark.slow, pytest.mark.learning]

FLIPPED_ADVANTAGE = """
import tasks.ppo.train as train
policy_loss = train.policy_loss
train.policy_loss = lambda logprobs, old, advantages, *rest: policy_loss(
    logprobs, old, -advantages, *rest
)
"""
"""PPO's train step calls policy_loss with the advantages negated: it climbs away from reward."""


def copy_inputs(project: dict[str, Any], work: Path) -> None:
    """The first run's params, data, SFT and reward model, into `work`."""
    first = project["first"]
    for rel in ("data/prepared", "models/sft", "models/reward_model"):
        shutil.copytree(first / rel, work / rel)
    shutil.copy2(first / "params.yaml", work / "params.yaml")


def rerun(project: dict[str, Any], work: Path, stage: str, patch: str = "") -> None:
    """`rlhf stage <stage>` in `work` (copy_inputs), in this interpreter with `patch` run first
    (no warm fork: the patch must be in the process that trains), with its own MLflow store."""
    code = f"{patch}\nfrom flows.infra.cli import run\nrun()"
    done = subprocess.run(
        [sys.executable, "-c", code, "stage", stage, "--params", str(work / "params.yaml")],
        cwd=work,
        env=project["env"]
        | {"RLHF_WARM": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_ppo_with_a_flipped_advantage_fails_the_learning_test(
    project: dict[str, Any], tmp_path: Path
):
    copy_inputs(project, tmp_path)
    rerun(project, tmp_path, "ppo", FLIPPED_ADVANTAGE)
    ppo = json.loads((tmp_path / "metrics" / "ppo.json").read_text())
    first, last = ppo["score_first_quarter"], ppo["score_last_quarter"]
    print(f"flipped advantage: score {first:.2f} → {last:.2f}")  # shown by pytest -rP
    assert not ppo_learnt(ppo), ppo


def test_dpo_on_swapped_pairs_fails_the_learning_test(project: dict[str, Any], tmp_path: Path):
    """DPO trained on its pairs with chosen and rejected swapped, judged on the true held-out
    pairs."""
    copy_inputs(project, tmp_path)
    train = tmp_path / "data" / "prepared" / "preference" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    swapped = [row | {"chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    train.write_text("".join(json.dumps(row) + "\n" for row in swapped))
    rerun(project, tmp_path, "dpo")
    mean, accuracy = dpo_margin(project, tmp_path / "models")
    print(f"swapped pairs: held-out margin {mean:.2f}, share > 0 {accuracy:.2f}")
    assert not dpo_learnt(mean, accuracy), (mean, accuracy)
