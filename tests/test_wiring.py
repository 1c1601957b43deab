"""Static wiring of the pipeline: dvc.yaml ↔ flows/ ↔ tasks/ ↔ params.yaml ↔ the CLI (no training).

Written over whatever stages dvc.yaml declares, so a new stage is checked as soon as it is added.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tasks.config import STAGE_SECTIONS, STAGES, Params

REPO = Path(__file__).resolve().parents[1]
UNTRACKED_SECTIONS = {"tracking", "orchestration"}


def _load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


DVC = _load_yaml(REPO / "dvc.yaml")
DVC_STAGES: dict[str, dict[str, Any]] = DVC["stages"]
STAGE_NAMES = sorted(DVC_STAGES)

# Modules that shape how a stage runs and reports, not what it computes: a change to them must
# not rebuild the pipeline (e.g. a better error message in config.py, a new MLflow tag).
INFRASTRUCTURE = {"tasks/config.py", "tasks/io.py", "tasks/tracking.py", "tasks/lineage.py"}


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml outs/metrics/deps entries are `path` or `{path: {options}}`."""
    paths = []
    for entry in entries or []:
        if isinstance(entry, dict):
            paths += list(entry)
        else:
            paths.append(entry)
    return [str(p).rstrip("/") for p in paths]


def _params(stage: dict[str, Any]) -> list[str]:
    """Top-level params.yaml keys a stage tracks (`section`, or `{params.yaml: [section]}`)."""
    keys = []
    for entry in stage.get("params") or []:
        if isinstance(entry, dict):
            for file, names in entry.items():
                assert file == "params.yaml", f"params from another file: {file}"
                keys += list(names)
        else:
            keys.append(entry)
    return keys


def _outs(stage: dict[str, Any]) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


ALL_OUTS = {out: name for name, stage in DVC_STAGES.items() for out in _outs(stage)}


def _covers(parent: str, path: str) -> bool:
    return path == parent or path.startswith(parent + "/")


def _imports(file: Path) -> set[str]:
    """Absolute module names imported by `file` (`from a import b` gives `a` and `a.b`)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{file}:{node.lineno}: relative import"
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module_file(module: str) -> Path | None:
    """`tasks.ppo.losses` → tasks/ppo/losses.py (or the package's __init__.py), if it exists."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _task_modules(file: Path) -> set[Path]:
    """Every tasks/ source file `file` imports, directly or through other tasks/ modules."""
    found: set[Path] = set()
    todo = [file]
    while todo:
        for module in _imports(todo.pop()):
            if module.split(".")[0] != "tasks":
                continue
            path = _module_file(module)
            if path is None or path == REPO / "tasks" / "__init__.py":
                continue  # a name imported from a package, or the bare `tasks` package
            if path not in found:
                found.add(path)
                todo.append(path)
    return found


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _missing_deps(name: str) -> set[str]:
    deps = _paths(DVC_STAGES[name].get("deps"))
    flow_file = REPO / "flows" / f"{name}.py"
    return {
        _rel(module)
        for module in _task_modules(flow_file)
        if not any(_covers(dep, _rel(module)) for dep in deps)
    }


# ---------------------------------------------------------------- dvc.yaml ↔ flows


def test_dvc_declares_stages():
    assert STAGE_NAMES, "dvc.yaml declares no stage"
    assert set(STAGE_NAMES) <= set(STAGES), "dvc.yaml stage missing from tasks.config.STAGES"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_cmd_runs_its_flow(name: str):
    assert DVC_STAGES[name]["cmd"] == f"rlhf stage {name}"
    flow_file = REPO / "flows" / f"{name}.py"
    assert flow_file.is_file()

    from prefect import Flow

    flow = getattr(importlib.import_module(f"flows.{name}"), name)
    assert isinstance(flow, Flow)
    assert flow.name == name


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_params_are_its_sections(name: str):
    tracked = _params(DVC_STAGES[name])
    assert len(tracked) == len(set(tracked)), f"listed twice: {tracked}"
    assert set(tracked) == set(STAGE_SECTIONS[name])
    assert not set(tracked) & UNTRACKED_SECTIONS


def test_no_stage_section_is_untracked():
    for name, sections in STAGE_SECTIONS.items():
        assert not set(sections) & UNTRACKED_SECTIONS, name
        assert set(sections) <= set(Params.model_fields), name


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_deps_exist(name: str):
    deps = _paths(DVC_STAGES[name].get("deps"))
    assert f"flows/{name}.py" in deps
    assert len(deps) == len(set(deps)), f"listed twice: {deps}"
    for dep in deps:
        # an upstream stage's output, or something in the repository
        producer = next((s for out, s in ALL_OUTS.items() if _covers(out, dep)), None)
        if producer is not None:
            assert producer != name, f"{dep}: a stage depending on its own output"
        else:
            assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_deps_cover_imported_tasks_modules(name: str):
    """A change in any tasks/ module the flow uses (transitively) re-runs the stage."""
    missing = _missing_deps(name) - INFRASTRUCTURE
    assert not missing, f"{name}: dvc.yaml deps lack {sorted(missing)}"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_metrics_and_outs(name: str):
    stage = DVC_STAGES[name]
    metrics = _paths(stage.get("metrics"))
    assert f"metrics/{name}.json" in metrics
    for entry in stage.get("metrics") or []:
        if isinstance(entry, dict):  # metrics are small: git tracks them, not DVC's cache
            options = next(iter(entry.values())) or {}
            assert options.get("cache") is False, entry
    outs = _outs(stage)
    assert len(outs) == len(set(outs))
    for other, other_stage in DVC_STAGES.items():
        if other != name:
            overlap = [
                (a, b) for a in outs for b in _outs(other_stage) if _covers(a, b) or _covers(b, a)
            ]
            assert not overlap, f"{name} and {other} both write {overlap}"


# ---------------------------------------------------------------- params.yaml, CLI


def test_params_sections_are_the_config_model():
    sections = set(_load_yaml(REPO / "params.yaml"))
    assert sections == set(Params.model_fields)


def test_cli_offers_every_dvc_stage():
    from flows.cli import available_stages

    assert set(STAGE_NAMES) <= set(available_stages())


# ---------------------------------------------------------------- import direction


def _python_files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("file", _python_files("tasks"), ids=lambda p: _rel(p))
def test_tasks_never_import_flows(file: Path):
    flows = sorted(m for m in _imports(file) if m.split(".")[0] == "flows")
    assert not flows, f"{_rel(file)} imports {flows}"


def test_ppo_losses_are_pure_torch():
    top_level = {m.split(".")[0] for m in _imports(REPO / "tasks" / "ppo" / "losses.py")}
    assert top_level <= {"torch", "__future__", "typing", "math"}, top_level


# ---------------------------------------------------------------- entry points


def test_ci_runs_make_test():
    ci = REPO / ".ci" / "run"
    lines = [line.split("#")[0].strip() for line in ci.read_text().splitlines()]
    assert any(re.fullmatch(r"make test\b.*", line) for line in lines)
    assert ci.stat().st_mode & 0o111, ".ci/run is not executable"


def test_readme_and_makefile_quickstart():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make pipeline" in readme
    assert "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    targets = re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE)
    assert {"pipeline", "test"} <= set(targets)
    assert re.search(r"^pipeline:.*\n\tdvc repro\b", makefile, flags=re.MULTILINE)


def test_rlhf_script_is_the_cli():
    """`rlhf` (what every dvc.yaml cmd runs) is flows.cli:main."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^rlhf\s*=\s*"flows\.cli:main"', pyproject, flags=re.MULTILINE)


def test_stage_outputs_are_not_git_tracked():
    """DVC owns the outs (metrics aside): git must ignore them, or `dvc repro` conflicts."""
    outs = [out for stage in DVC_STAGES.values() for out in _paths(stage.get("outs"))]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *outs],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    ignored = set(done.stdout.split())
    assert set(outs) <= ignored, f"not git-ignored: {sorted(set(outs) - ignored)}"
