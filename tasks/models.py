"""The base model: a tiny Llama-style model built locally, or a validated hub id / local path.

`models/base/base.json` always says where the base model lives, so later stages read one place
whatever `model.base` is: `models/base` itself for `tiny`, else the hub id or local directory
(resolved and validated here, never copied).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tasks.config import MODELS_DIR, ModelConfig
from tasks.io import write_json

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# A minimal chat template so conversational datasets work with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny(cfg: ModelConfig, seed: int, texts: list[str], out_dir: Path) -> dict[str, Any]:
    """Train a byte-level BPE tokenizer on `texts` and save it with a random-init Llama model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tiny = cfg.tiny
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=tiny.vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        chat_template=CHAT_TEMPLATE,
        model_max_length=tiny.max_position_embeddings,
        **SPECIAL_TOKENS,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny base model: %d parameters, vocabulary %d", n_params, len(tokenizer))
    write_json(out_dir / "base.json", {"name_or_path": str(MODELS_DIR / "base"), "revision": None})
    return {"base_parameters": n_params, "vocab_size": len(tokenizer)}


def write_base_pointer(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Validate a hub id or local directory (its config must load) and record it, uncopied."""
    from transformers import AutoConfig

    base = Path(cfg.base).expanduser()
    looks_local = cfg.base.startswith((".", "/", "~")) or base.exists()
    if looks_local and not (base / "config.json").is_file():
        what = "is not a model directory (no config.json)" if base.exists() else "does not exist"
        raise ValueError(
            f"params.yaml: model.base: '{cfg.base}' {what} (give 'tiny', a hub id "
            "like 'Qwen/Qwen2.5-0.5B-Instruct', or a local model directory)"
        )
    name = str(base.resolve()) if looks_local else cfg.base
    try:
        config = AutoConfig.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"params.yaml: model.base: cannot load '{cfg.base}': {str(exc).splitlines()[0]}"
        ) from None
    write_json(out_dir / "base.json", {"name_or_path": name, "revision": cfg.revision})
    log.info("base model %s (%s), not copied", name, config.model_type)
    return {}


def base_model(models_dir: Path = MODELS_DIR) -> tuple[str, str | None]:
    """(name or path, revision) of the base model recorded by `prepare`."""
    path = models_dir / "base" / "base.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run `dvc repro prepare` first)")
    pointer = json.loads(path.read_text())
    return pointer["name_or_path"], pointer["revision"]


def device(setting: str) -> torch.device:
    """`common.device` → a torch device (`auto` takes a GPU when there is one)."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "params.yaml: common.device: 'cuda' but torch sees no GPU "
            "(use auto or cpu, or install a CUDA build of torch)"
        )
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def dtype(setting: str, dev: torch.device) -> torch.dtype:
    """`model.dtype` → a torch dtype (`auto` is bfloat16 on a GPU that has it, else float32)."""
    if setting == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, setting)
