"""The `prepare` flow end to end: outputs, MLflow run, atomic failure, base-model pointers."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.infra.testing import SMALL
from tasks.errors import DataError, ParamsError
from tasks.params import load_params
from tasks.stages import STAGE
from tasks.tracking import flatten
from tests.conftest import leftovers, run_cli, stage_runs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KINDS = ("sft", "preference", "prompts")
SPLITS = ("train", "eval")
BAD_LINE = '{"prompt": "What is 1 plus 1?\\n", "chosen": "2.", "rejected": "3."}\n{"prompt": oops\n'


# ---------------------------------------------------------------- helpers


def run_prepare(make_params: Callable[..., Path], overrides: dict[str, Any] | None = None):
    from flows.prepare import prepare

    return prepare(load_params(make_params(SMALL | (overrides or {}))))


def bad_source(tmp_path: Path) -> dict[str, Any]:
    """Overrides that read preferences from a JSONL file whose line 2 is malformed."""
    bad = tmp_path / "raw" / "bad.jsonl"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(BAD_LINE)
    return {"data.source": "local", "data.preference.path": str(bad)}


def runs(workdir: Path, name: str = "prepare") -> list[Any]:
    return stage_runs(workdir, name)


def snapshot(*roots: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `roots` (plus the roots' own files)."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def save_local_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ---------------------------------------------------------------- a good run


def test_prepare_writes_outputs_and_one_mlflow_run(
    workdir: Path, make_params, prefect_server, monkeypatch
):
    monkeypatch.setenv("RLHF_PIPELINE_ID", "pipeline-under-test")
    result = run_prepare(make_params)

    # datasets: every kind and split, non-empty, counted in stats.json and the metrics
    prepared = workdir / "data" / "prepared"
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["source"] == "synthetic"
    for kind in KINDS:
        for split in SPLITS:
            file = prepared / kind / f"{split}.jsonl"
            assert file.is_file(), file
            n = count_lines(file)
            assert n > 0, file
            assert stats[kind][split] == n
            assert result[f"{kind}_{split}_examples"] == n
        first = json.loads((prepared / kind / "train.jsonl").read_text().splitlines()[0])
        assert "prompt" in first
    # at most the generated number of examples (duplicates dropped), eval a minority
    assert stats["sft"]["train"] + stats["sft"]["eval"] <= 200
    assert stats["prompts"]["train"] + stats["prompts"]["eval"] <= 100
    assert stats["sft"]["eval"] < stats["sft"]["train"]

    # base model: loadable weights and a complete tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = workdir / "models" / "base"
    assert (base / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    for special in ("pad_token", "bos_token", "eos_token"):
        assert getattr(tokenizer, special), special
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "What is 2 plus 2?" in chat
    assert model.config.vocab_size == len(tokenizer) == result["vocab_size"]
    assert model.config.hidden_size == 32
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert sum(p.numel() for p in model.parameters()) == result["base_parameters"]
    pointer = json.loads((base / "base.json").read_text())
    assert pointer == {"name_or_path": "models/base", "revision": None}

    # DVC metrics: exactly the returned dict
    assert json.loads((workdir / "metrics" / "prepare.json").read_text()) == result
    assert leftovers(workdir, "data", "models", "metrics") == []

    # MLflow: one finished run with the stage's params, lineage tags, metrics and stats.json
    import mlflow

    (run,) = runs(workdir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.synthetic.num_sft"] == "200"
    assert params["model.tiny.hidden_size"] == "32"
    assert params["common.seed"] == "42"
    assert {key.split(".")[0] for key in params} == set(STAGE["prepare"].sections)
    tags = run.data.tags
    assert tags["rlhf.stage"] == "prepare"
    assert tags["rlhf.pipeline_id"] == "pipeline-under-test"
    assert tags["rlhf.seed"] == "42"
    assert tags["mlflow.source.git.commit"]
    assert tags["version.trl"]
    assert tags["version.torch"]
    assert run.data.metrics == pytest.approx({k: float(v) for k, v in result.items()})
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "stats.json" in artifacts


def test_pipeline_id_without_env_is_generated(
    workdir: Path, make_params, prefect_server, monkeypatch
):
    monkeypatch.delenv("RLHF_PIPELINE_ID", raising=False)
    run_prepare(make_params)
    (run,) = runs(workdir)
    assert re.fullmatch(r"[0-9a-f]{12}", run.data.tags["rlhf.pipeline_id"])


# ---------------------------------------------------------------- failures


def test_failing_run_leaves_nothing_and_marks_run_failed(
    workdir: Path, make_params, prefect_server
):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        run_prepare(make_params, bad_source(workdir))

    assert not (workdir / "data" / "prepared").exists()
    assert not (workdir / "models" / "base").exists()
    assert not (workdir / "metrics" / "prepare.json").exists()
    assert leftovers(workdir, "data", "models", "metrics") == []
    (run,) = runs(workdir)
    assert run.info.status == "FAILED"


def test_failed_rerun_keeps_previous_outputs(workdir: Path, make_params, prefect_server):
    good = run_prepare(make_params)
    outputs = [workdir / "data" / "prepared", workdir / "models" / "base"]
    metrics = workdir / "metrics" / "prepare.json"
    before = snapshot(*outputs, metrics)
    assert len(before) > 10

    with pytest.raises(DataError, match="malformed JSON"):
        run_prepare(make_params, bad_source(workdir))

    assert snapshot(*outputs, metrics) == before
    assert json.loads(metrics.read_text()) == good
    assert leftovers(workdir, "data", "models", "metrics") == []
    assert [r.info.status for r in runs(workdir)] == ["FINISHED", "FAILED"]


# ---------------------------------------------------------------- model.base


def test_local_base_model_is_pointed_to_not_copied(
    workdir: Path, make_params, prefect_server, tmp_path: Path
):
    local = save_local_llama(tmp_path / "my-llama")
    result = run_prepare(make_params, {"model.base": str(local)})

    base = workdir / "models" / "base"
    assert json.loads((base / "base.json").read_text()) == {
        "name_or_path": str(local.resolve()),
        "revision": None,
    }
    assert sorted(p.name for p in base.iterdir()) == ["base.json"]
    assert "base_parameters" not in result
    assert json.loads((workdir / "metrics" / "prepare.json").read_text()) == result
    assert (workdir / "data" / "prepared" / "stats.json").is_file()
    (run,) = runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.base"] == str(local)


def test_missing_local_base_model_is_one_clear_error(
    workdir: Path, make_params, prefect_server, tmp_path: Path
):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ParamsError) as caught:
        run_prepare(make_params, {"model.base": str(missing)})
    message = str(caught.value)
    assert caught.value.key == "model.base"
    assert message.startswith("model.base: ")
    assert str(missing) in message
    assert "does not exist" in message
    assert "\n" not in message
    assert not (workdir / "data" / "prepared").exists()
    assert not (workdir / "models" / "base").exists()
    assert leftovers(workdir, "data", "models", "metrics") == []
    (run,) = runs(workdir)
    assert run.info.status == "FAILED"


def test_cli_reports_missing_base_model_in_one_line(
    workdir: Path, make_params, prefect_server, tmp_path: Path
):
    """`rlhf stage prepare` (what dvc runs) ends with exit 1 and one `rlhf: error:` line."""

    missing = tmp_path / "no-such-model"
    params = make_params(SMALL | {"model.base": str(missing)})
    done = run_cli("stage", "prepare", "--params", str(params), cwd=workdir)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(errors) == 1, done.stderr
    # the params file given (not "params.yaml"), the line of the key, the key
    line = 1 + next(
        n for n, text in enumerate(params.read_text().splitlines()) if text.startswith("  base:")
    )
    assert errors[0].startswith(f"rlhf: error: {params}:{line}: model.base: "), errors[0]
    assert str(missing) in errors[0]
    assert "Traceback" not in done.stderr
    assert not (workdir / "models" / "base").exists()


# ---------------------------------------------------------------- secrets and params


@pytest.mark.parametrize(
    "key", ["hf_token", "HF_TOKEN", "api_key", "apikey", "openai_api_key", "secret", "password"]
)
def test_flatten_drops_secrets(key: str):
    tree = {"hub": {key: "s3cr3t", "name": "org/data"}, key: "s3cr3t", "seed": 1}
    flat = flatten(tree)
    assert flat == {"hub.name": "org/data", "seed": 1}
    assert "s3cr3t" not in json.dumps(flat)


def test_flatten_keeps_nesting_and_empty_mappings():
    tree = {"sft": {"trainer": {"learning_rate": 1e-3}, "lora": None, "columns": {}}}
    assert flatten(tree) == {
        "sft.trainer.learning_rate": 1e-3,
        "sft.lora": None,
        "sft.columns": {},
    }


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _stage_sections(stage: str) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml")
    return {name: getattr(params, name).model_dump() for name in STAGE[stage].sections}


@pytest.mark.parametrize("stage", sorted(STAGE))
def test_flatten_keeps_every_real_param(stage: str):
    """Every key of params.yaml a stage reads becomes an MLflow param (none is a secret)."""
    sections = _stage_sections(stage)
    assert set(flatten(sections)) == _leaf_keys(sections)
