"""Reading generated sequences: which tokens are the response, where each row's positions start,
the logits that predicted the response, and the reward model's score — shared by PPO (experience),
evaluate and the held-out evaluations during training (`judge`), so none imports another.

Shapes: B rows, P prompt tokens (left-padded), T response tokens (right-padded after EOS). The
prompt and the response are one sequence `[B, P + T]`; the logits at positions `P - 1 … P + T - 2`
predict the response tokens, so every per-token tensor is `[B, T]`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tasks.errors import MissingInput

REWARD_STATS = "reward_stats.json"
"""In models/reward_model/: the mean and std of its eval scores, to normalise scores with."""


class Responses(NamedTuple):
    """The response part of `[B, P+T]` sequences, and the inputs to read them with."""

    mask: torch.Tensor  # [B, T] long: valid response tokens, up to and including the first stop
    has_eos: torch.Tensor  # [B] bool: the response ended by itself
    attention_mask: torch.Tensor  # [B, P+T] real prompt tokens and valid response tokens
    position_ids: torch.Tensor  # [B, P+T] counted from each row's first real token


class TokenScorer(torch.nn.Module):
    """A 1-label sequence classifier read at every position: `[B, L] ids → [B, L]` scores.

    The critic (values V(s_t) for each token) and the reward model (its score at the last valid
    token) are both this: the classifier's backbone and score head, without the classifier's
    pooling, which picks "the last non-pad token" and is wrong when pad == EOS. A module rather
    than a function so that accelerate/DDP wraps the forward that computes the gradients.
    """

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        # peft wraps the classifier; its LoRA layers live inside the base model it returns.
        inner = getattr(self.classifier, "get_base_model", lambda: self.classifier)()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids} - {None})


def response_mask(
    responses: torch.Tensor, stop_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` generated ids → (mask `[B, T]` long, has_eos `[B]` bool).

    The mask covers every token up to and including the first stop token; a row without one
    (cut at max_new_tokens) is valid to its end. Works when pad == EOS: only the first counts.
    """
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_eos = is_stop.any(dim=1)
    last = torch.where(has_eos, is_stop.int().argmax(dim=1), responses.shape[1] - 1)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions <= last.unsqueeze(1)).long(), has_eos


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def read_responses(
    sequences: torch.Tensor, prompt_mask: torch.Tensor, stop_ids: list[int]
) -> Responses:
    """`generate`'s `[B, P+T]` output and the `[B, P]` prompt mask → the response's mask and the
    attention mask / position ids that every later forward pass over the sequences uses."""
    mask, has_eos = response_mask(sequences[:, prompt_mask.shape[1] :], stop_ids)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    return Responses(mask, has_eos, attention_mask, positions_from_mask(attention_mask))


def response_logits(
    model: Any,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits `[B, T, V]` predicting the response tokens, divided by the sampling temperature
    so that log-probs are those of the distribution the tokens were sampled from."""
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_length + 1,  # the lm head only where it is needed
        use_cache=False,
    ).logits
    return logits[:, :-1].float() / temperature


def final_scores(
    scorer: TokenScorer, sequences: torch.Tensor, responses: Responses
) -> torch.Tensor:
    """`[B]` scores read at each row's last valid token (EOS, or the last one generated)."""
    prompt_length = sequences.shape[1] - responses.mask.shape[1]
    last = prompt_length + responses.mask.sum(dim=1) - 1
    scores = scorer(sequences, responses.attention_mask, responses.position_ids)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


def reward_texts(
    prompts: list[Any], completions: list[Any], tokenizer: Any, ended: list[bool] | None = None
) -> list[str]:
    """The text RewardTrainer scores: prompt + completion through the chat template for
    conversational rows, else the strings joined with the tokenizer's EOS appended — to the
    completions that `ended` (all by default; one cut at the length limit gets none, as PPO
    reads it at its last generated token)."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    texts = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        example = {"prompt": prompt, "completion": completion}
        finished = ended is None or ended[row]
        # the chat template closes an assistant turn with EOS itself
        eos = tokenizer.eos_token if finished and not is_conversational(example) else ""
        example = maybe_apply_chat_template(example, tokenizer)
        texts.append(example["prompt"] + example["completion"] + eos)
    return texts


@torch.no_grad()
def score_texts(classifier: Any, tokenizer: Any, texts: list[str], batch_size: int = 64) -> Any:
    """`[N]` scores of a 1-label classifier on `texts`, read as RewardTrainer trains it (its
    own pooling at the last non-pad token, right padding), in batches."""
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=True,
        ).to(classifier.device)
        scores.append(classifier(**batch).logits[:, 0].float().cpu())
    return torch.cat(scores)


def text_scorer(
    model: str | Path, params: Any
) -> Callable[[list[Any], list[Any], list[bool]], torch.Tensor]:
    """A reward model (a stage name, a model directory or a hub id), frozen on this process's
    device, scoring prompt + completion on the text RewardTrainer trains on, with its own
    tokenizer: `(prompts, completions, ended) → [N]` raw scores."""
    from accelerate import PartialState

    from tasks.models import device, dtype, load_scorer, load_tokenizer

    tokenizer = load_tokenizer(model, params.model)
    frozen = dtype(params.model.dtype, device(params.common.device))
    scorer = load_scorer(model, params.model, frozen, tokenizer.pad_token_id)
    scorer = scorer.requires_grad_(False).eval().to(PartialState().device)  # this process's

    def score(prompts: list[Any], completions: list[Any], ended: list[bool]) -> torch.Tensor:
        return score_texts(scorer, tokenizer, reward_texts(prompts, completions, tokenizer, ended))

    return score


def score_stats(reward_model_dir: Path) -> tuple[float, float]:
    """(mean, std) of the reward model's eval scores, written by the reward_model stage."""
    path = reward_model_dir / REWARD_STATS
    if not path.is_file():
        raise MissingInput(
            f"{path}: missing (run `dvc repro reward_model`, or turn score normalisation off)"
        )
    stats = json.loads(path.read_text())
    return stats["reward_mean"], stats["reward_std"]


def judge(
    policy: Any,
    reference: Any,
    reward: Any,
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    stop_ids: list[int],
) -> dict[str, torch.Tensor]:
    """Per row of `[B, P+T]` sequences: reward score at the last valid token, exact KL to the
    reference summed over the response (`Σ_t Σ_v π(v|s_t) log π(v|s_t)/π_ref(v|s_t)`),
    length (EOS included) and EOS flag."""
    responses = read_responses(sequences, prompt_mask, stop_ids)
    mask = responses.mask
    kl = torch.zeros(mask.shape[0])  # SFT and best-of-n judged by SFT: KL(π ‖ π) is 0 exactly
    if reference is not policy:
        inputs = (sequences, responses.attention_mask, responses.position_ids, mask.shape[1])
        logp = torch.log_softmax(response_logits(policy, *inputs), dim=-1)
        ref_logp = torch.log_softmax(response_logits(reference, *inputs), dim=-1)
        kl = ((logp.exp() * (logp - ref_logp)).sum(dim=-1) * mask).sum(dim=1)
    scores = final_scores(reward, sequences, responses)
    return {"score": scores, "kl": kl, "length": mask.sum(dim=1), "eos": responses.has_eos.float()}
