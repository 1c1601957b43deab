"""Atomic outputs: a stage that fails leaves no partial file or directory behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.params import Params
from tasks.stages import STAGE

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
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Put directory `new` in the place of `final` (which may not exist) by renames: at every
    moment `final` is the old or the new one, or (between two renames) missing, never partial."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def md5(path: Path) -> str:
    """DVC's md5 of a file: the md5 of its bytes."""
    digest = hashlib.md5()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (callers write into an atomic_dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


RUN_ID_FILE = "mlflow_run_id"  # the MLflow run a checkpoints directory belongs to


def resumable_dir(checkpoints: Path, params: Params, stage: str, inputs: list[Path]) -> Path:
    """Create `checkpoints/` for `stage`, keeping what is there only if it was written by a run
    of the same params (the sections the stage reads) on the same input files (size and mtime of
    everything under `inputs`, as DVC checks them out): a checkpoint of other settings or of an
    older upstream model is deleted, so a changed run starts over instead of resuming. Records
    the active MLflow run, which a resumed stage continues (`resumable_run_id`)."""
    import mlflow
    from accelerate import PartialState

    state = PartialState()  # several processes: the main one decides, the others wait for it
    if state.is_main_process:
        fingerprint = _fingerprint(params, stage, inputs)
        marker = checkpoints / "params.json"
        if checkpoints.is_dir() and (not marker.is_file() or marker.read_text() != fingerprint):
            log.info(
                "%s: discarding checkpoints of other params or inputs in %s", stage, checkpoints
            )
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
        if (run := mlflow.active_run()) is not None:
            (checkpoints / RUN_ID_FILE).write_text(run.info.run_id)
    state.wait_for_everyone()
    return checkpoints


def resumable_run_id(checkpoints: Path, params: Params, stage: str) -> str | None:
    """The MLflow run of the checkpoints a start of `stage` with these params would resume
    from; None when there are none, or they would be discarded."""
    marker, recorded = checkpoints / "params.json", checkpoints / RUN_ID_FILE
    if not (marker.is_file() and recorded.is_file()):
        return None
    inputs = [Path(p) for p in STAGE[stage].inputs]
    if marker.read_text() != _fingerprint(params, stage, inputs):
        return None
    whole = (d for d in checkpoints.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not any(damaged(d, ()) is None for d in whole):
        return None  # killed before its first whole checkpoint: it starts over, in a new run
    return recorded.read_text().strip() or None


def damaged(directory: Path, required: tuple[str, ...]) -> str | None:
    """What makes a checkpoint unreadable, found without loading it: a `required` file (glob)
    missing, a safetensors file whose header does not cover its length, a torch file (a zip
    archive) without its end record, a JSON file that does not parse. None when it is whole."""
    from safetensors import safe_open

    for pattern in required:
        if not any(directory.glob(pattern)):
            return f"no {pattern}"
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
                return f"{path.name}: truncated"
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as exc:  # safetensors and json raise their own types; all mean damaged
            return f"{path.name}: {str(exc).splitlines()[0][:120]}"
    return None


def _fingerprint(params: Params, stage: str, inputs: list[Path]) -> str:
    files = sorted(f for root in inputs for f in ([root] if root.is_file() else root.rglob("*")))
    return json.dumps(
        {
            "params": {name: getattr(params, name).model_dump() for name in STAGE[stage].sections},
            "inputs": [
                [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()
            ],
        },
        sort_keys=True,
    )
