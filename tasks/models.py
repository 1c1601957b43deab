"""Models: the tiny base model built locally, the base-model pointer, and the one loader.

`models/base/base.json` always says where the base model lives, so later stages read one place
whatever `model.base` is: `models/base` itself for `tiny`, else the hub id or local directory
(resolved and validated here, never copied). Every model and tokenizer of every stage is loaded
by `load_tokenizer`, `load_causal_lm` and `load_scorer`, which honour `model.revision` (for the
base model), `model.trust_remote_code`, the dtype, the padding side and the pad-token fallback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import LoraConfig, ModelConfig
from tasks.errors import MissingInput, ParamsError
from tasks.io import write_json
from tasks.stages import MODELS_DIR

if TYPE_CHECKING:  # torch is imported where it is used: the CLI locates models without it
    import torch

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
    import torch
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
        raise ParamsError(
            f"model.base: '{cfg.base}' {what} (give 'tiny', a hub id like "
            "'Qwen/Qwen2.5-0.5B-Instruct', or a local model directory)",
            key="model.base",
        )
    name = str(base.resolve()) if looks_local else cfg.base
    try:
        config = AutoConfig.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ParamsError(
            f"model.base: cannot load '{cfg.base}': {str(exc).splitlines()[0]}", key="model.base"
        ) from None
    write_json(out_dir / "base.json", {"name_or_path": name, "revision": cfg.revision})
    log.info("base model %s (%s), not copied", name, config.model_type)
    return {}


def locate(model: str | Path) -> tuple[str, str | None]:
    """(name or path, revision) of a model: a stage name (`base` is what `prepare` recorded in
    models/base/base.json, any other is models/<stage>/), a model directory, or a hub id
    (`org/name`, a string with a slash: stage names have none)."""
    if isinstance(model, str) and "/" in model:
        return model, None
    if model == "base":
        pointer = MODELS_DIR / "base" / "base.json"
        if not pointer.is_file():
            raise MissingInput(f"{pointer.parent}: no model; run `dvc repro prepare`")
        recorded = json.loads(pointer.read_text())
        return recorded["name_or_path"], recorded["revision"]
    path = model if isinstance(model, Path) else MODELS_DIR / model
    if not (path / "config.json").is_file():
        raise MissingInput(f"{path}: no model; run `dvc repro {path.name}`")
    return str(path), None


def load_tokenizer(model: str | Path, cfg: ModelConfig, padding_side: str | None = None) -> Any:
    """The model's tokenizer (padding on `padding_side`, else its own default side); a model
    without a pad token pads with EOS, which is masked anyway."""
    from transformers import AutoTokenizer

    name, revision = locate(model)
    side = {"padding_side": padding_side} if padding_side else {}
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=cfg.trust_remote_code, **side
    )
    if tokenizer.pad_token is None:  # many chat models have none
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """A causal LM (its LM head included) in `dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM

    name, revision = locate(model)
    return AutoModelForCausalLM.from_pretrained(
        name, revision=revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype
    )


def load_scorer(model: str | Path, cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int) -> Any:
    """A 1-label sequence classifier: the reward model, or a new score head on a causal LM's
    backbone (what reward_model trains from models/sft, and PPO's critic starts from)."""
    from transformers import AutoModelForSequenceClassification

    name, revision = locate(model)
    scorer = AutoModelForSequenceClassification.from_pretrained(
        name,
        revision=revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
        num_labels=1,
    )
    scorer.config.pad_token_id = pad_token_id
    return scorer


def lora_config(lora: LoraConfig | None, head: str) -> Any:
    """peft's LoRA config for a causal LM or a scorer (`head`); None: full fine-tuning."""
    if lora is None:
        return None
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS" if head == "scorer" else "CAUSAL_LM",
    )


def device(setting: str) -> torch.device:
    """`common.device` → a torch device (`auto` takes a GPU when there is one)."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ParamsError(
            "common.device: 'cuda' but torch sees no GPU "
            "(use auto or cpu, or install a CUDA build of torch)",
            key="common.device",
        )
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def dtype(setting: str, dev: torch.device) -> torch.dtype:
    """`model.dtype` → a torch dtype (`auto` is bfloat16 on a GPU that has it, else float32)."""
    import torch

    if setting == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, setting)
