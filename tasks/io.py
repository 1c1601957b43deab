"""Atomic outputs: a stage that fails leaves no partial file or directory behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.config import Params

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success it replaces `final`, on error it goes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are shared like any other file
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (callers write into an atomic_dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def resumable_dir(checkpoints: Path, params: Params, stage: str, inputs: list[Path]) -> Path:
    """Create `checkpoints/` for `stage`, keeping what is there only if it was written by a run
    of the same params (common, model, the stage's section) on the same input files (size and
    mtime of everything under `inputs`, as DVC checks them out): a checkpoint of other settings
    or of an older upstream model is deleted, so a changed run starts over instead of resuming."""
    files = sorted(f for root in inputs for f in ([root] if root.is_file() else root.rglob("*")))
    fingerprint = json.dumps(
        {
            "params": {
                name: getattr(params, name).model_dump() for name in ("common", "model", stage)
            },
            "inputs": [
                [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()
            ],
        },
        sort_keys=True,
    )
    marker = checkpoints / "params.json"
    if checkpoints.is_dir() and (not marker.is_file() or marker.read_text() != fingerprint):
        log.info("%s: discarding checkpoints of other params or inputs in %s", stage, checkpoints)
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return checkpoints
