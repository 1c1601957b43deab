"""Random tiny Llamas for the generation and scoring tests (no tokenizer: ids are the tokens)."""

from __future__ import annotations

from typing import Any

import torch

PAD, BOS, EOS = 0, 1, 2
VOCAB = 8  # small: a random model stops by itself (EOS ~ 1/8 per token) in about half the rows
MAX_NEW = 8


def tiny_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": PAD,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        }
        | overrides
    )


def init_std(model: Any, std: float) -> Any:
    """Larger random weights than HF's 0.02, so logits, values and scores are far from flat."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, std)
    return model.eval()
