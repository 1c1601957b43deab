"""The baseline of `stage_overhead.py`: one TRL stage's training as a bare script.

It does what `tasks/trainers.py: train` does for a stage — load tokenizer and model, read the
prepared JSONL with `datasets.load_dataset("json")`, build the TRL config from the stage's
`trainer:` params, train, evaluate, save — with nothing around it: no Prefect, no MLflow
(`report_to="none"`), no sample generation. It imports only torch, transformers, trl, datasets
(and peft for LoRA), never the pipeline's `tasks/` package: `stage_overhead.py` reads params.yaml
with `tasks.params.load_params` and the stage's spec (tasks/stages.py: trainer, TRL config,
dataset, head) and hands this script a JSON job, e.g.

    {"trainer_class": "trl:SFTTrainer", "config_class": "trl:SFTConfig", "dataset": "sft",
     "head": "causal_lm", "model": "models/base", "revision": null, "trust_remote_code": false,
     "seed": 42, "device": "auto", "dtype": "auto", "lora": null,
     "prepared_dir": "data/prepared", "output_dir": "/tmp/x/checkpoints",
     "save_dir": "/tmp/x/final", "trainer": {"num_train_epochs": 3, "learning_rate": 0.003}}

Usage: python benchmarks/bare_trl.py JOB.json   (prints one `BARE_RESULT {json}` line at the end)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
import warnings
from typing import Any

_START = time.perf_counter()


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def run(job: dict[str, Any]) -> dict[str, float]:
    # The same library settings the pipeline's flows/__init__.py applies (the caller's env wins).
    for key, value in {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        set_seed,
    )

    timings = {"import_s": time.perf_counter() - _START}
    scorer = job["head"] == "scorer"  # a 1-label reward model, else a causal LM
    t0 = time.perf_counter()
    set_seed(job["seed"])
    cuda = job["device"] != "cpu" and torch.cuda.is_available()
    if job["dtype"] == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, job["dtype"])
    kwargs = {"revision": job["revision"], "trust_remote_code": job["trust_remote_code"]}
    tokenizer = AutoTokenizer.from_pretrained(job["model"], **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if scorer:
        model = AutoModelForSequenceClassification.from_pretrained(
            job["model"], num_labels=1, dtype=dtype, **kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, **kwargs)
    args = _load(job["config_class"])(
        **job["trainer"],
        output_dir=job["output_dir"],
        report_to="none",
        seed=job["seed"],
        use_cpu=not cuda,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    files = {
        split: f"{job['prepared_dir']}/{job['dataset']}/{split}.jsonl"
        for split in ("train", "eval")
    }
    data = datasets.load_dataset("json", data_files=files)
    peft_config = None
    if job["lora"]:
        from peft import LoraConfig

        lora = job["lora"]
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="SEQ_CLS" if scorer else "CAUSAL_LM",
        )
    trainer = _load(job["trainer_class"])(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    timings["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = trainer.train()
    timings["train_s"] = time.perf_counter() - t0
    timings["train_runtime_s"] = result.metrics["train_runtime"]

    t0 = time.perf_counter()
    trainer.evaluate()
    timings["eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    final = trainer.model.merge_and_unload() if job["lora"] else trainer.model
    final.save_pretrained(job["save_dir"])
    tokenizer.save_pretrained(job["save_dir"])
    timings["save_s"] = time.perf_counter() - t0
    timings["total_in_process_s"] = time.perf_counter() - _START
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Train one TRL stage with no orchestration or tracking (the baseline of "
        "benchmarks/stage_overhead.py).",
    )
    parser.add_argument("job", help="JSON job file (see the module docstring)")
    args = parser.parse_args()
    with open(args.job, encoding="utf-8") as file:
        job = json.load(file)
    print("BARE_RESULT " + json.dumps(run(job)), flush=True)


if __name__ == "__main__":
    main()
