"""Tasks of the `prepare` stage: raw sources → deduplicated, split TRL datasets (+ base model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import data, models, synthetic
from tasks.config import DataConfig, ModelConfig
from tasks.errors import DataError
from tasks.io import write_json, write_jsonl

log = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE)
def prepare_data(cfg: DataConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """Write `<out_dir>/{sft,preference,prompts}/{train,eval}.jsonl` and `stats.json`."""
    from trl.data_utils import is_conversational

    rows = _load(cfg, seed)
    if not rows["sft"]:  # only preferences given: SFT on prompt + chosen
        rows["sft"] = [
            (where, {"prompt": r["prompt"], "completion": r["chosen"]})
            for where, r in rows["preference"]
        ]
    if not rows["prompts"]:  # PPO and evaluation prompts are the preference prompts
        rows["prompts"] = [(where, {"prompt": r["prompt"]}) for where, r in rows["preference"]]
    stats: dict[str, Any] = {"source": cfg.source}
    for kind, kind_rows in rows.items():
        kept, duplicates, too_long, seen = [], 0, 0, set()
        # Repeats in real data are noise; the synthetic generator's repeats are samples of
        # its distribution (dropping them would skew the quality mix), so they stay.
        dedupe = cfg.source != "synthetic"
        for _, row in kind_rows:
            key = json.dumps(row, sort_keys=True)
            if dedupe and key in seen:
                duplicates += 1
            elif data.text_length(row) > cfg.max_chars:
                too_long += 1
            else:
                seen.add(key)
                kept.append(row)
        if not kept:
            raise DataError(
                f"data.{kind}: no example left after dropping {duplicates} "
                f"duplicates and {too_long} longer than data.max_chars"
            )
        splits = {"train": [], "eval": []}
        for row in kept:
            splits[
                "eval" if data.prompt_key(row["prompt"], seed) < cfg.eval_fraction else "train"
            ].append(row)
        for split, split_rows in splits.items():
            if not split_rows:
                raise DataError(
                    f"data.{kind}: the {split} split is empty with "
                    f"{len(kept)} examples (change data.eval_fraction)"
                )
            write_jsonl(out_dir / kind / f"{split}.jsonl", split_rows)
        stats[kind] = {
            "train": len(splits["train"]),
            "eval": len(splits["eval"]),
            "duplicates_dropped": duplicates,
            "too_long_dropped": too_long,
            "conversational": is_conversational(kept[0]),
        }
        log.info(
            "%s: %d train / %d eval examples (%d duplicates, %d too long dropped)",
            kind,
            len(splits["train"]),
            len(splits["eval"]),
            duplicates,
            too_long,
        )
    write_json(out_dir / "stats.json", stats)
    return stats


def _load(cfg: DataConfig, seed: int) -> dict[str, list[data.Row]]:
    if cfg.source == "synthetic":
        generated = synthetic.generate(cfg.synthetic, seed)
        return {
            kind: [(f"synthetic {kind}: row {i}", row) for i, row in enumerate(kind_rows)]
            for kind, kind_rows in generated.items()
        }
    rows = {}
    for kind in ("sft", "preference", "prompts"):
        src = getattr(cfg, kind)
        if (src.path if cfg.source == "local" else src.name) is None:
            rows[kind] = []
            continue
        raw = data.read_local(Path(src.path)) if cfg.source == "local" else data.read_hub(src)
        rows[kind] = data.to_trl(kind, raw, src.columns)
        log.info("read %d %s examples from %s", len(raw), kind, src.path or src.name)
    return rows


@task(cache_policy=NO_CACHE)
def build_base_model(
    cfg: ModelConfig, seed: int, prepared_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """`models/base/`: the tiny tokenizer + model, or a pointer to the validated hub/local model."""
    if cfg.base != "tiny":
        return models.write_base_pointer(cfg, out_dir)
    texts = []
    for file in sorted(prepared_dir.glob("*/train.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            texts += [
                v if isinstance(v, str) else "\n".join(m["content"] for m in v)
                for v in json.loads(line).values()
            ]
    return models.build_tiny(cfg, seed, texts, out_dir)
