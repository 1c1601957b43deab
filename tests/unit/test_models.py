"""tasks/models.py, the one loader: where a model is, the missing-model line, the pad-token
fallback and padding side, revision for the base model, and `model.trust_remote_code` reaching
every stage — a model that needs its own code trained SFT and then failed in PPO and evaluate,
whose loaders did not pass it on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.config import ModelConfig
from tasks.errors import MissingInput
from tasks.models import build_tiny, load_causal_lm, load_scorer, load_tokenizer, locate
from tasks.params import load_params
from tests.conftest import REPO

CONFIGURATION = """from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
"""
MODELING = """from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .configuration_remote_llama import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig


class RemoteLlamaForSequenceClassification(LlamaForSequenceClassification):
    config_class = RemoteLlamaConfig

    def __init__(self, config):  # its own backbone: AutoModel does not know this config
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
"""


def model_config(trust_remote_code: bool = False) -> ModelConfig:
    cfg = load_params(REPO / "params.yaml").model
    return cfg.model_copy(update={"trust_remote_code": trust_remote_code})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tokenizer + Llama saved like models/base."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = model_config().model_copy(
        update={"tiny": model_config().tiny.model_copy(update={"hidden_size": 16, "num_heads": 2})}
    )
    build_tiny(cfg, 0, ["What is 1 plus 2?\n3.", "Sure! The answer is 4."] * 20, out)
    return out


def make_remote(source: Path, out: Path) -> Path:
    """A copy of `source` whose config names a model type only its own code defines."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config |= {
        "model_type": "remote_llama",
        "architectures": ["RemoteLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_remote_llama.RemoteLlamaConfig",
            "AutoModelForCausalLM": "modeling_remote_llama.RemoteLlamaForCausalLM",
            "AutoModelForSequenceClassification": (
                "modeling_remote_llama.RemoteLlamaForSequenceClassification"
            ),
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_remote_llama.py").write_text(CONFIGURATION)
    (out / "modeling_remote_llama.py").write_text(MODELING)
    return out


def test_locate_stage_models_and_directories(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInput) as caught:
        locate("sft")
    assert str(caught.value) == "models/sft: no model; run `dvc repro sft`"
    with pytest.raises(MissingInput) as caught:
        locate("base")
    assert str(caught.value) == "models/base: no model; run `dvc repro prepare`"
    with pytest.raises(MissingInput) as caught:
        locate(Path("elsewhere/ppo"))
    assert str(caught.value) == "elsewhere/ppo: no model; run `dvc repro ppo`"
    (tmp_path / "models" / "sft").mkdir(parents=True)
    (tmp_path / "models" / "sft" / "config.json").write_text("{}")
    assert locate("sft") == ("models/sft", None)
    (tmp_path / "models" / "base").mkdir()
    pointer = {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "v1"}
    (tmp_path / "models" / "base" / "base.json").write_text(json.dumps(pointer))
    assert locate("base") == ("Qwen/Qwen2.5-0.5B-Instruct", "v1")


def test_tokenizer_pad_fallback_and_padding_side(tiny_dir: Path, tmp_path: Path) -> None:
    no_pad = tmp_path / "no-pad"
    shutil.copytree(tiny_dir, no_pad)
    tokenizer_config = json.loads((no_pad / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (no_pad / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    special = no_pad / "special_tokens_map.json"
    if special.exists():
        special.write_text(
            json.dumps(
                {k: v for k, v in json.loads(special.read_text()).items() if k != "pad_token"}
            )
        )
    tokenizer = load_tokenizer(no_pad, model_config())
    assert tokenizer.pad_token == tokenizer.eos_token
    assert load_tokenizer(tiny_dir, model_config(), padding_side="left").padding_side == "left"
    assert load_tokenizer(tiny_dir, model_config()).pad_token == "<pad>"


def hub_cache(tiny_dir: Path, cache: Path) -> dict[str | None, Any]:
    """A Hugging Face hub cache (refs/<name> → commit, snapshots/<commit>/) holding `test/tiny`
    at two revisions: `main`, the tiny model, and `v1`, other weights and another
    model_max_length. → {revision: the weights of that revision}; None is the default (main)."""
    from transformers import AutoModelForCausalLM

    repo = cache / "models--test--tiny"
    weights: dict[str | None, Any] = {}
    for name, commit, shift in (("main", "a" * 40, 0.0), ("v1", "b" * 40, 1.0)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_dir, snapshot)
        model = AutoModelForCausalLM.from_pretrained(snapshot)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(shift)
        model.save_pretrained(snapshot)
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        config["model_max_length"] = 64 + int(shift)
        (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        weights[name] = {k: v.clone() for k, v in model.state_dict().items()}
    weights[None] = weights["main"]
    return weights


@pytest.mark.parametrize("revision", ["v1", None])
def test_base_model_revision_reaches_the_loader(
    tiny_dir: Path, tmp_path: Path, monkeypatch, revision: str | None
) -> None:
    """A hub model pinned to `model.revision` loads that revision, not the default branch:
    the tokenizer, the causal LM and the scorer's backbone (offline, from a hub cache)."""
    import huggingface_hub.constants

    weights = hub_cache(tiny_dir, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    pointer = {"name_or_path": "test/tiny", "revision": revision}
    (tmp_path / "models" / "base" / "base.json").write_text(json.dumps(pointer))

    assert load_tokenizer("base", model_config()).model_max_length == (65 if revision else 64)
    lm = load_causal_lm("base", model_config(), torch.float32).state_dict()
    assert set(lm) == set(weights[revision])
    assert all(torch.equal(lm[k], weights[revision][k]) for k in lm)
    scorer = load_scorer("base", model_config(), torch.float32, pad_token_id=0).state_dict()
    backbone = {k: v for k, v in scorer.items() if k.startswith("model.")}
    assert backbone and all(torch.equal(v, weights[revision][k]) for k, v in backbone.items())


def test_remote_code_needs_trust_and_then_loads_every_head(tiny_dir: Path, tmp_path: Path):
    remote = make_remote(tiny_dir, tmp_path / "remote")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(remote, model_config(), torch.float32)
    trusted = model_config(trust_remote_code=True)
    lm = load_causal_lm(remote, trusted, torch.float32)
    assert type(lm).__name__ == "RemoteLlamaForCausalLM"
    scorer = load_scorer(remote, trusted, torch.float32, pad_token_id=0)
    assert type(scorer).__name__ == "RemoteLlamaForSequenceClassification"
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id == 0
    assert load_tokenizer(remote, trusted).pad_token == "<pad>"


def test_ppo_and_evaluate_load_a_remote_code_model(
    tiny_dir: Path, workdir: Path, make_params
) -> None:
    """The regression: with trust_remote_code set, PPO's four models and evaluate's policy and
    reward model load from a models/sft and models/reward_model that need their own code."""
    from tasks.generation import load_policy
    from tasks.ppo.run import setup

    for stage in ("sft", "reward_model"):
        make_remote(tiny_dir, workdir / "models" / stage)
    stats = {"reward_mean": 0.0, "reward_std": 1.0}
    (workdir / "models" / "reward_model" / "reward_stats.json").write_text(json.dumps(stats))
    prompts = workdir / "data" / "prepared" / "prompts" / "train.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text(json.dumps({"prompt": "What is 1 plus 2?\n"}) + "\n")
    params = load_params(make_params({"model.trust_remote_code": True}))

    run = setup(params)
    unwrap = run.accelerator.unwrap_model
    assert type(unwrap(run.actor)).__name__ == "RemoteLlamaForCausalLM"
    assert type(run.reference).__name__ == "RemoteLlamaForCausalLM"
    assert type(unwrap(run.critic).classifier).__name__ == "RemoteLlamaForSequenceClassification"
    assert type(run.reward.classifier).__name__ == "RemoteLlamaForSequenceClassification"
    policy, tokenizer = load_policy("sft", params)
    assert type(policy).__name__ == "RemoteLlamaForCausalLM"
    assert tokenizer.padding_side == "left"
