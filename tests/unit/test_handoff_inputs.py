"""The hand-off's inputs (flows/infra/handoff.py) that git tracks: evaluate reads the plots of
ppo, grpo and rloo (`cache: false`, no object in DVC's cache), which must reach a worker that
shares no disk as they are on the laptop, not as the last commit holds them. Real git and DVC
in temporary directories (a bare git remote, a local-directory DVC remote); no servers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.repo import Repo

from flows.infra import handoff
from flows.infra.testing import GIT_IDENTITY, REPO
from tasks.stages import EVALUATE, HELD_OUT, STAGE

PLOTS = [f"plots/{name}.json" for name in HELD_OUT]


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def test_evaluate_reads_the_held_out_plots():
    assert set(PLOTS) == {"plots/ppo.json", "plots/grpo.json", "plots/rloo.json"}
    assert set(PLOTS) <= set(EVALUATE.inputs)


def test_inputs_are_split_by_who_tracks_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Cached outputs (DVC, by dvc.lock's hash), git-tracked outputs (metrics, plots: as they
    are), raw data; inputs that do not exist here are none of them."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", "dvc.yaml")
    for path in EVALUATE.inputs:
        if path.startswith(("models/", "data/")):
            Path(path).mkdir(parents=True)
    Path("plots").mkdir()
    for path in PLOTS[:-1]:  # the last one's stage never ran here
        Path(path).write_text("[]")
    produced, tracked, raw = handoff._inputs("evaluate")
    assert produced == [p for p in EVALUATE.inputs if p.startswith(("models/", "data/"))]
    assert tracked == PLOTS[:-1]
    assert raw == []
    Path("data/raw").mkdir()
    assert handoff._inputs("prepare") == ([], [], ["data/raw"])


def test_git_tracked_inputs_reach_the_worker_as_they_are_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`send` hashes the plot as it is on the laptop (newer than its commit, as right after
    `dvc repro ppo`) and pushes it; the worker's `receive_inputs` puts exactly that in its
    checkout, over the committed version."""
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.delenv("RLHF_GIT_REMOTE", raising=False)
    origin, laptop, worker = tmp_path / "origin.git", tmp_path / "laptop", tmp_path / "worker"
    _git(tmp_path, "init", "-q", "--bare", str(origin))
    laptop.mkdir()
    _git(laptop, "init", "-q")
    shutil.copy(REPO / "dvc.yaml", laptop / "dvc.yaml")
    Repo.init(str(laptop))
    (laptop / ".dvc" / "config").write_text(
        f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {tmp_path / 'remote'}\n"
    )
    (laptop / "plots").mkdir()
    (laptop / "plots" / "ppo.json").write_text(json.dumps([{"iteration": 0}]))  # committed
    _git(laptop, "add", "-A")
    _git(laptop, "commit", "-qm", "baseline")
    _git(laptop, "remote", "add", "origin", str(origin))
    _git(laptop, "push", "-q", "origin", "HEAD:main")
    rows = [{"iteration": 0, "heldout/kl": 0.0}, {"iteration": 4, "heldout/kl": 1.5}]
    (laptop / "plots" / "ppo.json").write_text(json.dumps(rows))  # what `dvc repro ppo` wrote
    # evaluate reading this plot alone: no models to fake
    only_plot = dataclasses.replace(EVALUATE, dataset=None, uses=("plots/ppo.json",))
    monkeypatch.setattr(handoff, "STAGE", STAGE | {"evaluate": only_plot})

    monkeypatch.chdir(laptop)
    sent = json.loads(handoff.send("evaluate")[handoff.HANDOFF_ENV])
    assert list(sent["inputs"]) == ["plots/ppo.json"]
    assert _git(laptop, "status", "--porcelain").split() == ["M", "plots/ppo.json"]  # untouched
    assert not list(laptop.glob(".rlhf-handoff-*"))

    _git(tmp_path, "clone", "-q", "--branch", "main", str(origin), str(worker))
    assert json.loads((worker / "plots" / "ppo.json").read_text()) == [{"iteration": 0}]
    monkeypatch.chdir(worker)
    handoff.receive_inputs.fn(sent)
    assert json.loads((worker / "plots" / "ppo.json").read_text()) == rows
    assert not list(worker.glob(".rlhf-handoff-*"))
