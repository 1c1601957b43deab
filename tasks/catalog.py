"""What the MLflow UI shows beside a run's metrics, so users compare where they compare: the
data a stage read (dataset inputs; digest = DVC's md5 of the file), the model it wrote (a
logged model pointing at the DVC-tracked directory and its md5; the weights stay in DVC), and
for `evaluate/<policy>` the params and the run of the stage that trained the policy."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from tasks.io import md5, write_json
from tasks.params import Params
from tasks.stages import MODELS_DIR, PREPARED_DIR, STAGE

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in models/<stage>/: the run that trained it


def log_datasets(stage: str, params: Params) -> None:
    """The prepared files the stage reads as the active run's dataset inputs (context train or
    eval; tag `hub` when they came from the hub); for `prepare`, its raw sources."""
    spec = STAGE[stage]
    if spec.kind == "prepare":
        inputs = _raw_sources(params)
    elif spec.dataset:
        splits = ("eval",) if spec.kind == "evaluate" else ("train", "eval")
        source = getattr(params.data, spec.dataset)
        tags = {"hub": source.name} if params.data.source == "hub" and source.name else {}
        inputs = [
            (
                _file(f"{spec.dataset}/{split}", PREPARED_DIR / spec.dataset / f"{split}.jsonl"),
                split,
                tags,
            )
            for split in splits
        ]
    else:
        inputs = []
    for dataset, context, tags in inputs:
        if dataset is not None:
            mlflow.log_input(dataset, context=context, tags=tags)


def record_run(out: Path) -> None:
    """`out/mlflow_run.json`: the active run, so evaluate can say where a policy came from."""
    if (run := mlflow.active_run()) is not None:
        write_json(out / RUN_FILE, {"run_id": run.info.run_id})


def trained_by(model: str) -> str | None:
    """The id of the run that wrote `models/<model>/`, if it recorded itself and exists here."""
    recorded = MODELS_DIR / model / RUN_FILE
    if not recorded.is_file():
        return None
    run_id = json.loads(recorded.read_text())["run_id"]
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:  # another tracking store's run
        return None
    return run_id


def log_model(model: str, run_id: str, dvc_md5: str) -> str:
    """A logged model of `run_id` (its Model column) for `models/<model>/` at `dvc_md5`, made
    once per (run, md5); its id."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    query = f"source_run_id = '{run_id}' AND tags.`dvc.md5` = '{dvc_md5}'"
    if found := client.search_logged_models([experiment], filter_string=query, max_results=1):
        return found[0].model_id
    logged = client.create_logged_model(
        experiment,
        name=model,
        source_run_id=run_id,
        tags={"dvc.path": f"models/{model}", "dvc.md5": dvc_md5, "rlhf.stage": model},
        model_type="reward model" if STAGE[model].head == "scorer" else "policy",
    )
    client.finalize_logged_model(logged.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def lineage(policy: str, dvc_md5: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Params and tags for `evaluate/<policy>`: the training run's params (its own flattened
    keys), its id, the model's md5 and its logged model."""
    run_id = trained_by(policy)
    tags = {"dvc.md5": dvc_md5}
    if run_id is None:
        return {}, tags
    trained = mlflow.MlflowClient().get_run(run_id)
    tags |= {
        "rlhf.trained_by_run": run_id,
        "rlhf.trained_pipeline_id": trained.data.tags.get("rlhf.pipeline_id", ""),
    }
    if dvc_md5 != "unknown":
        tags["rlhf.logged_model_id"] = log_model(policy, run_id, dvc_md5)
    return dict(trained.data.params), tags


def _raw_sources(params: Params) -> list[tuple[Any, str, dict[str, str]]]:
    """prepare's inputs: local files (their md5) or hub datasets (name, config, split); the
    synthetic task has none (its generator's settings are the run's params)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import HuggingFaceDatasetSource

    inputs = []
    for kind in ("sft", "preference", "prompts"):
        cfg = getattr(params.data, kind)
        if params.data.source == "local" and cfg.path is not None:
            root = Path(cfg.path)
            for file in (
                sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            ):
                inputs.append((_file(f"{kind}/{file.name}", file), "raw", {}))
        elif params.data.source == "hub" and cfg.name is not None:
            source = HuggingFaceDatasetSource(cfg.name, config_name=cfg.config, split=cfg.split)
            key = json.dumps([cfg.name, cfg.config, cfg.split])
            digest = hashlib.md5(key.encode()).hexdigest()[:16]
            inputs.append(
                (
                    MetaDataset(source, name=f"{kind}/{cfg.name}", digest=digest),
                    "raw",
                    {"hub": cfg.name},
                )
            )
    return inputs


def _file(name: str, path: Path) -> Any:
    """A dataset input for a file: its absolute path, digest = its md5 (None when missing)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    if not path.is_file():
        return None
    source = LocalArtifactDatasetSource(str(path.resolve()))
    return MetaDataset(source=source, name=name, digest=md5(path))
