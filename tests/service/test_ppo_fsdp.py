"""PPO sharded with FSDP2 over two CPU processes (gloo), launched as docs/gpu-worker.md says:
`accelerate launch --config_file docs/accelerate/fsdp.yaml -m flows.infra.cli stage ppo`. Killed
after a sharded checkpoint (one DCP file per process) and rerun, it resumes there, logs one
whole MLflow run, writes one ordinary HF model directory, and ends where the same run under
DDP (`torchrun --nproc_per_node 2`) ends: the same curve and, within float tolerance, the same
policy. Inputs as in tests/integration/test_ppo_stage.py (SMALL sizes, untrained models)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from flows.infra.deployment import BIN
from flows.infra.testing import write_params
from tests.conftest import REPO, mlflow_client, prepare_small, stage_runs
from tests.integration.test_ppo_stage import PPO, build_models, copy_inputs, saved_weights

pytestmark = [pytest.mark.service, pytest.mark.slow]

ITERATIONS = 6
SIZES = PPO | {"ppo.num_iterations": ITERATIONS, "ppo.sample_every": ITERATIONS}
STAGE = ["-m", "flows.infra.cli", "stage", "ppo"]
DDP = [str(BIN / "torchrun"), "--nproc_per_node", "2", *STAGE]
FSDP = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "docs/accelerate/fsdp.yaml")]
FSDP += STAGE
STATE = Path("checkpoints/ppo/state")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Path:
    from flows.infra.testing import SMALL

    root = tmp_path_factory.mktemp("ppo-fsdp-inputs")
    prepare_small(root)
    build_models(root)
    write_params(root / "params.yaml", SMALL | SIZES)
    return root


def workspace(inputs: Path, root: Path) -> Path:
    copy_inputs(inputs, root)
    (root / "params.yaml").write_text((inputs / "params.yaml").read_text())
    return root


def environment(root: Path, prefect_server: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }


def launch(command: list[str], root: Path, prefect_server: str) -> str:
    done = subprocess.run(
        command,
        cwd=root,
        env=environment(root, prefect_server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.count("rlhf: ppo done") == 1, output[-4000:]  # rank 0 alone
    return output


def curve(root: Path, key: str) -> dict[int, float]:
    (run,) = stage_runs(root, "ppo")
    assert run.info.status == "FINISHED"
    history = mlflow_client(root).get_metric_history(run.info.run_id, key)
    steps = [point.step for point in history]
    assert sorted(steps) == list(range(ITERATIONS)), steps  # whole, each step once
    return {point.step: point.value for point in history}


@pytest.fixture(scope="module")
def ddp(inputs: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Path:
    """The same run under DDP, start to end."""
    root = workspace(inputs, tmp_path_factory.mktemp("ppo-ddp"))
    output = launch(DDP, root, prefect_server)
    assert "ppo: actor identical on 2 processes" in output
    return root


def test_fsdp_resumes_from_its_sharded_checkpoint_and_ends_where_ddp_ends(
    inputs: Path, ddp: Path, tmp_path: Path, prefect_server: str
):
    root = workspace(inputs, tmp_path / "fsdp")
    with (root / "killed.log").open("wb") as log:
        launcher = subprocess.Popen(
            FSDP,
            cwd=root,
            env=environment(root, prefect_server),
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while not (root / STATE / "ppo_state.pt").exists():
        assert launcher.poll() is None, (root / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    ranks = [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "stage" in p.cmdline()
    ]
    assert len(ranks) == 2
    shards = sorted(path.name for path in (root / STATE).glob("*.distcp"))
    assert len(shards) == 2, shards  # one file per process: each wrote its own shards
    launcher.kill()  # kill -9 of the launcher: its ranks stop with it
    launcher.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "a rank outlived its launcher"
    assert (root / STATE).is_dir(), "it finished before the kill: nothing to resume"

    output = launch(FSDP, root, prefect_server)
    resumed = re.search(r"ppo: resuming at iteration (\d+)", output)
    assert resumed and 0 < int(resumed.group(1)) < ITERATIONS, output[-4000:]
    assert "ppo: actor gathered from 2 shards" in output
    assert not (root / "checkpoints" / "ppo").exists()  # finished: nothing left to resume

    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value"):
        assert curve(root, key) == pytest.approx(curve(ddp, key), rel=1e-4, abs=1e-5), key

    # one ordinary HF model directory, the DDP run's policy within float tolerance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / "models" / "ppo"
    model = AutoModelForCausalLM.from_pretrained(out)
    batch = AutoTokenizer.from_pretrained(out)(["What is 1 plus 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    fsdp, replicated = saved_weights(out), saved_weights(ddp / "models" / "ppo")
    sft = saved_weights(root / "models" / "sft")
    assert set(fsdp) == set(replicated) == set(sft)
    for name, tensor in replicated.items():
        assert torch.allclose(fsdp[name], tensor, atol=1e-5), name
        assert not torch.equal(fsdp[name], sft[name]), name  # trained
