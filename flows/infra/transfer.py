"""Files between hosts by their hash, for the hand-off (flows/infra/handoff.py): DVC moves
them — a temporary `.dvc` file naming paths (and hashes) in a directory of the repository's
root, then `dvc commit` / `push` / `pull` of that file — and they are checked here against the
hashes, not DVC's records; and the git commands of the hand-off, each failure one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tasks.errors import HandoffFailed
from tasks.io import md5 as file_md5


def stage_outputs(
    stage: str, dvc_yaml: Path = Path("dvc.yaml"), cached: bool | None = None
) -> list[str]:
    """The outs, metrics and plots dvc.yaml declares for `stage` (only those DVC caches, or
    only those it does not — `cache: false`, which git tracks — when `cached` says so)."""
    spec = YAML(typ="safe").load(dvc_yaml)["stages"][stage]
    entries = [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
    paths = {}
    for entry in entries:
        path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        paths[path] = (options or {}).get("cache", True)
    return [path for path, caches in paths.items() if cached is None or caches == cached]


DVCFILE = "handoff.dvc"


def open_repo() -> Any:
    """The DVC repository of the working directory."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(".")
    except NotDvcRepoError as exc:
        raise HandoffFailed(f"{Path.cwd()}: not a DVC repository ({exc})") from None


def push(repo: Any, hashes: dict[str, str], label: str) -> None:
    """Push the objects `hashes` names ({path: md5}, in this cache) to the default remote."""
    if not hashes:
        return
    with _dvcfile(repo, label, {path: md5 for path, md5 in hashes.items()}, staged=True) as files:
        _dvc(f"pushing {', '.join(hashes)}", repo.push, targets=[str(files / DVCFILE)])


def pull(repo: Any, hashes: dict[str, str], label: str) -> None:
    """Pull exactly `hashes` ({path: md5}) into place; files already right stay untouched."""
    if not hashes:
        return
    with _dvcfile(repo, label, hashes) as files:
        _dvc(f"pulling {', '.join(hashes)}", repo.pull, targets=[str(files / DVCFILE)], force=True)


@contextlib.contextmanager
def pulled(repo: Any, hashes: dict[str, str], label: str) -> Iterator[Path]:
    """Exactly `hashes` ({path: md5}) pulled under a staging directory, which the block gets
    (`staging / path`) and which goes after it, with whatever was not moved out."""
    with _dvcfile(repo, label, hashes, staged=True) as files:
        _dvc(f"pulling {', '.join(hashes)}", repo.pull, targets=[str(files / DVCFILE)])
        yield files / "staged"


def add(repo: Any, paths: list[str], copies: list[str], label: str) -> dict[str, str]:
    """Hash `paths` into the cache and push them: {path: md5}. Those in `copies` are hashed as
    copies (DVC takes no file that git tracks in place: metrics, plots)."""
    if not paths:
        return {}
    outs = {path: None for path in paths}
    with _dvcfile(repo, label, outs, staged=copies) as files:
        for path in copies:
            (files / "staged" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, files / "staged" / path)
        _dvc(f"hashing {', '.join(paths)}", repo.commit, str(files / DVCFILE), force=True)
        written = YAML(typ="safe").load(files / DVCFILE)["outs"]
        _dvc(f"pushing {', '.join(paths)}", repo.push, targets=[str(files / DVCFILE)])
    return {path: out["md5"] for path, out in zip(paths, written, strict=True)}


@contextlib.contextmanager
def _dvcfile(
    repo: Any, label: str, outs: dict[str, str | None], staged: bool | list[str] = False
) -> Iterator[Path]:
    """A temporary directory in the repository's root (DVC refuses a `.dvc` file that git
    ignores) holding `handoff.dvc`, whose outs are `outs` ({path: md5, or None for `dvc
    commit` to fill in}), each at its place in the repository or, when `staged` (all, or the
    paths listed), under `staged/` of the directory. It goes after the block."""
    root = Path(repo.root_dir)
    directory = root / f".rlhf-handoff-{label}-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    entries = []
    for path, md5 in outs.items():
        here = staged is True or (isinstance(staged, list) and path in staged)
        target = directory / "staged" / path if here else root / path
        entry = {"path": os.path.relpath(target, directory), "hash": "md5"}
        entries.append(entry | ({"md5": md5} if md5 else {}))
    (directory / DVCFILE).write_text(json.dumps({"outs": entries}, indent=1))  # JSON is YAML
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _dvc(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A DVC operation; its failure (no or unreachable remote, missing object) as one line."""
    from dvc.exceptions import DvcException

    try:
        return call(*args, **kwargs)
    except (DvcException, OSError) as exc:  # a remote's file system raises its own errors
        cause = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
        raise HandoffFailed(f"{what} failed: {cause.splitlines()[0]}") from None


def mismatch(repo: Any, path: Path, md5: str) -> str | None:
    """What differs between `path` and DVC's hash `md5` (a directory's: its listing's hash,
    then every file in it), computed here, not read from DVC's state; None when they match."""
    if not md5.endswith(".dir"):
        return None if path.is_file() and file_md5(path) == md5 else "its content differs"
    listing = Path(repo.cache.local.oid_to_path(md5)).read_bytes()
    if hashlib.md5(listing).hexdigest() != md5.removesuffix(".dir"):
        return "its file listing is damaged"
    expected = {entry["relpath"]: entry["md5"] for entry in json.loads(listing)}
    found = {str(f.relative_to(path)): f for f in path.rglob("*") if f.is_file()}
    if set(found) != set(expected):
        return f"files {sorted(set(found) ^ set(expected))[:3]} differ"
    bad = [name for name, file in found.items() if file_md5(file) != expected[name]]
    return f"{bad[0]}'s content differs" if bad else None


def git(*args: str, cwd: Path | None = None) -> str:
    """`git ARGS` (in `cwd`): its output, or HandoffFailed with git's last line."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise HandoffFailed(f"git {args[0]}: {message[-1] if message else done.returncode}")
    return done.stdout.rstrip()
