"""`resumable_dir`: checkpoints survive only a rerun with the same params and the same inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tasks.io import resumable_dir
from tasks.params import load_params


def test_checkpoints_are_kept_only_for_the_same_params_and_inputs(
    tmp_path: Path, make_params: Callable[..., Path]
) -> None:
    params = load_params(make_params())
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    checkpoints = tmp_path / "checkpoints" / "sft"

    def saved_state() -> Path:
        state = resumable_dir(checkpoints, params, "sft", [data]) / "checkpoint-2"
        state.mkdir(exist_ok=True)
        return state

    state = saved_state()
    assert resumable_dir(checkpoints, params, "sft", [data]) == checkpoints
    assert state.is_dir()  # same params, same inputs: resumable

    # An upstream stage rewrote the data (as `dvc repro` does): a fresh start.
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    os.utime(data / "train.jsonl", ns=(1, 1))
    resumable_dir(checkpoints, params, "sft", [data])
    assert not state.exists()

    state = saved_state()
    other = load_params(make_params({"sft.trainer.learning_rate": 1.0e-4}, name="other.yaml"))
    resumable_dir(checkpoints, other, "sft", [data])
    assert not state.exists()  # other params: a fresh start as well
