"""Static wiring of the pipeline against the stage registry (tasks/stages.py): dvc.yaml,
prefect.yaml, params.yaml, flows/, the CLI, and the shape of the code (import direction, no
cycles, one model loader, file sizes). No training.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tasks.params import Params
from tasks.stages import POLICIES, STAGE, STAGES, StageSpec

REPO = Path(__file__).resolve().parents[1]
UNTRACKED_SECTIONS = {"tracking", "orchestration"}


def _load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


DVC = _load_yaml(REPO / "dvc.yaml")
DVC_STAGES: dict[str, dict[str, Any]] = DVC["stages"]
STAGE_NAMES = list(DVC_STAGES)

# Modules that shape how a stage runs and reports, not what it computes: a change to them must
# not rebuild the pipeline (a better error message, a new MLflow tag, a new stage's spec).
INFRASTRUCTURE = {
    "tasks/catalog.py",
    "tasks/config.py",
    "tasks/errors.py",
    "tasks/io.py",
    "tasks/lineage.py",
    "tasks/params.py",
    "tasks/ppo_config.py",
    "tasks/stages.py",
    "tasks/tracking.py",
    "tasks/tracking_queue.py",
}


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


# ---------------------------------------------------------------- registry ↔ dvc.yaml


def test_dvc_stages_are_the_registry_in_order():
    assert [spec.name for spec in STAGES] == STAGE_NAMES


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_cmd_runs_its_flow(spec: StageSpec):
    assert DVC_STAGES[spec.name]["cmd"] == f"rlhf stage {spec.name}"
    from prefect import Flow

    flow = getattr(importlib.import_module(f"flows.{spec.name}"), spec.name)
    assert isinstance(flow, Flow)
    assert flow.name == spec.name


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_params_are_its_sections(spec: StageSpec):
    tracked = _params(DVC_STAGES[spec.name])
    assert tracked == list(spec.sections)
    assert not set(tracked) & UNTRACKED_SECTIONS
    assert set(tracked) <= set(Params.model_fields)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_data_deps_are_its_inputs(spec: StageSpec):
    """The deps that are not code are exactly the spec's inputs (other stages' outputs)."""
    deps = _paths(DVC_STAGES[spec.name].get("deps"))
    assert len(deps) == len(set(deps)), f"listed twice: {deps}"
    data = [dep for dep in deps if not dep.startswith(("flows/", "tasks/"))]
    assert sorted(data) == sorted(spec.inputs)
    for dep in data:  # an upstream stage's output, or something in the repository
        producer = next((s for out, s in ALL_OUTS.items() if _covers(out, dep)), None)
        assert producer != spec.name, f"{dep}: a stage depending on its own output"
        assert producer is not None or (REPO / dep).exists(), f"{spec.name}: {dep} missing"


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_code_deps_are_the_modules_its_flow_imports(spec: StageSpec):
    """A change in any tasks/ module the flow uses (transitively) reruns the stage, and a change
    in one it does not use (e.g. PPO's losses for evaluate) does not."""
    deps = _paths(DVC_STAGES[spec.name].get("deps"))
    code = {dep for dep in deps if dep.startswith(("flows/", "tasks/"))}
    flow_file = REPO / "flows" / f"{spec.name}.py"
    used = {_rel(module) for module in _task_modules(flow_file)} - INFRASTRUCTURE
    assert code == used | {_rel(flow_file)}


def test_evaluate_is_free_of_ppo():
    used = {_rel(module) for module in _task_modules(REPO / "flows" / "evaluate.py")}
    assert not [module for module in used if module.startswith("tasks/ppo/")], used


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_outputs(spec: StageSpec):
    stage = DVC_STAGES[spec.name]
    own = {
        "prepare": ["data/prepared", "models/base"],
        "evaluate": ["reports"],
    }.get(spec.kind, [f"models/{spec.name}"])
    assert _paths(stage.get("outs")) == own
    assert _paths(stage.get("metrics")) == [f"metrics/{spec.name}.json"]
    plots = _paths(stage.get("plots"))
    assert plots == ([] if spec.kind == "prepare" else [f"plots/{spec.name}.json"])
    for entry in [*stage.get("metrics", []), *stage.get("plots", [])]:
        # small: git tracks them, not DVC's cache
        assert isinstance(entry, dict) and next(iter(entry.values())).get("cache") is False
    outs = _outs(stage)
    for other, other_stage in DVC_STAGES.items():
        if other != spec.name:
            overlap = [
                (a, b) for a in outs for b in _outs(other_stage) if _covers(a, b) or _covers(b, a)
            ]
            assert not overlap, f"{spec.name} and {other} both write {overlap}"


def test_stage_inputs_are_upstream_outputs():
    """Each input of a stage is written by a stage before it (or is raw data)."""
    seen: set[str] = set()
    for spec in STAGES:
        for path in spec.inputs:
            assert path == "data/raw" or any(_covers(out, path) for out in seen), (spec.name, path)
        seen |= set(_outs(DVC_STAGES[spec.name]))


# ---------------------------------------------------------------- registry ↔ the rest


def test_prefect_deployments_are_the_stages_and_the_pipeline():
    """One deployment per stage flow and the pipeline, each named after its pool (`sft/gpu`),
    working where the hand-off's pull step puts it."""
    prefect = _load_yaml(REPO / "prefect.yaml")
    entrypoints = [d["entrypoint"] for d in prefect["deployments"]]
    expected = [f"flows.{spec.name}:{spec.name}" for spec in STAGES]
    assert entrypoints == [*expected, "flows.pipeline:pipeline"]
    assert {d["name"] for d in prefect["deployments"]} == {"{{ $RLHF_WORK_POOL }}"}
    (step,) = prefect["pull"]
    assert list(step) == ["flows.infra.handoff.enter"]


def test_params_sections_are_the_config_model():
    """params.yaml has the shared sections, one per stage in pipeline order, the untracked."""
    sections = list(_load_yaml(REPO / "params.yaml"))
    assert sections == list(Params.model_fields)
    own = [spec.own_section for spec in STAGES]
    assert sections == ["common", "model", *own, "tracking", "orchestration"]


@pytest.mark.parametrize("spec", [s for s in STAGES if s.kind == "trl"], ids=lambda s: s.name)
def test_trl_stage_spec_is_complete(spec: StageSpec):
    assert spec.trainer and spec.trl_config and spec.dataset and spec.start and spec.summary
    assert spec.trainer.count(":") == spec.trl_config.count(":") == 1
    assert set(Params.model_fields[spec.name].annotation.model_fields) >= {"lora", "trainer"}


def test_policies_are_causal_lms_and_evaluate_lists_them():
    assert POLICIES[0] == "sft"  # the reference of win rate and KL
    assert all(STAGE[policy].head == "causal_lm" for policy in POLICIES)
    assert YAML(typ="safe").load(REPO / "params.yaml")["evaluate"]["policies"] == list(POLICIES)


def test_cli_offers_every_stage():
    import flows.infra.cli

    parser_help = subprocess.run(
        [sys.executable, "-m", "flows.infra.cli", "stage", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for spec in STAGES:
        assert re.search(rf"^  {spec.name}\s+{re.escape(spec.description[:30])}", parser_help, re.M)
    assert flows.infra.cli.stage_flow("sft").name == "sft"


# ---------------------------------------------------------------- the shape of the code


def _python_files(*folders: str) -> list[Path]:
    return sorted(file for folder in folders for file in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("file", _python_files("tasks"), ids=lambda p: _rel(p))
def test_tasks_never_import_flows(file: Path):
    flows = sorted(m for m in _imports(file) if m.split(".")[0] == "flows")
    assert not flows, f"{_rel(file)} imports {flows}"


def test_ppo_losses_are_pure_torch():
    top_level = {m.split(".")[0] for m in _imports(REPO / "tasks" / "ppo" / "losses.py")}
    assert top_level <= {"torch", "__future__", "typing", "math"}, top_level


def test_no_import_cycle():
    """flows/ and tasks/ modules form no cycle, counting imports inside functions and those
    made only for type checking."""
    graph = {}
    for file in _python_files("flows", "tasks"):
        targets = {_module_file(m) for m in _imports(file) if m.split(".")[0] in ("flows", "tasks")}
        package_inits = {REPO / "flows" / "__init__.py", REPO / "tasks" / "__init__.py"}
        graph[file] = {t for t in targets if t is not None and t != file} - package_inits
    done: set[Path] = set()

    def visit(file: Path, path: list[Path]) -> None:
        if file in path:
            cycle = [*path[path.index(file) :], file]
            pytest.fail("import cycle: " + " → ".join(_rel(f) for f in cycle))
        if file in done:
            return
        for target in graph.get(file, ()):
            visit(target, [*path, file])
        done.add(file)

    for file in graph:
        visit(file, [])


def test_models_load_in_one_place():
    """Models and tokenizers are loaded only by tasks/models.py (one loader honours revision,
    trust_remote_code, dtype and the pad-token fallback everywhere)."""
    offenders = [
        f"{_rel(file)}:{number}"
        for file in _python_files("flows", "tasks")
        if file != REPO / "tasks" / "models.py"
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1)
        if "from_pretrained(" in line
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("file", _python_files("flows", "tasks"), ids=lambda p: _rel(p))
def test_files_stay_readable(file: Path):
    assert len(file.read_text(encoding="utf-8").splitlines()) <= 400


def test_benchmarks_do_not_import_tests():
    for file in _python_files("benchmarks"):
        assert not [m for m in _imports(file) if m.split(".")[0] == "tests"], _rel(file)


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
    """`rlhf` (what every dvc.yaml cmd runs) is flows.infra.cli:run (main, then a quick exit)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^rlhf\s*=\s*"flows\.infra\.cli:run"', pyproject, flags=re.MULTILINE)


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
