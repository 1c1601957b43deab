"""Random tiny Llamas for the generation and scoring tests (no tokenizer: ids are the tokens),
left-padded batches of them, and a brute-force response mask."""

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


def tiny_lm(seed: int) -> Any:
    """A random tiny causal LM (weights std 0.3), the same for the same seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return init_std(LlamaForCausalLM(tiny_config()), 0.3)


def tiny_classifier(seed: int) -> Any:
    """A random tiny 1-label sequence classifier, the critic or reward model of TokenScorer."""
    # pad_token_id None: the classifier's own pooling then reads the last position of a single
    # unpadded row, which makes it an independent brute-force reference for TokenScorer.
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return init_std(
        LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=None)), 0.3
    )


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids of different lengths as one left-padded batch → (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def brute_response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[list, list]:
    """`tasks.scoring.response_mask` row by row in plain Python: (mask rows, has-stop flags)."""
    masks, has_eos = [], []
    for row in responses.tolist():
        first = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        has_eos.append(first is not None)
        end = len(row) if first is None else first + 1
        masks.append([1] * end + [0] * (len(row) - end))
    return masks, has_eos


def random_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random prompts of 1 to 6 tokens (BOS first), left-padded → (ids, attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (batch,), generator=gen).tolist()
    rows = [[BOS, *torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist()] for n in lengths]
    assert len(set(lengths)) > 1  # some rows are left-padded
    return left_pad(rows)
