"""One PPO run over several processes: replicated (DDP) or sharded (FSDP2), as it was launched.

Under `torchrun` / `accelerate launch` every process samples its own `rollout_batch_size`
prompts, and the statistics logged and steered by are means over the processes. How the models
are laid out comes from the launch, not from params.yaml (the same experiment on one device, N
replicas or N shards; switching rebuilds nothing in DVC):

- by default, accelerate's DDP: every process holds the four models whole;
- with accelerate's FSDP config (`accelerate launch --config_file fsdp.yaml`, or under torchrun
  the variables it sets, `ACCELERATE_USE_FSDP=true FSDP_VERSION=2`), every model — actor,
  critic, and the frozen reference and reward model when they are copies of their own — is
  sharded over the processes with torch's FSDP2 `fully_shard`: one unit per decoder layer, the
  rest (embeddings, final norm, heads) at the root, as accelerate shards a TRL stage's model.
  Each process keeps 1/N of every parameter, gradient and AdamW moment; a unit's weights are
  gathered for its forward (and `generate`) and freed after.

accelerate turns its FSDP on for GPU setups only (on a CPU its state stays MULTI_CPU, and the TRL
stages run DDP under this same config), so PPO reads the plugin and applies it itself: one code
path on a CPU, where it is tested, and on GPUs.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from tasks.errors import TrainingDiverged, UserError
from tasks.models import load_causal_lm, lora_config

log = logging.getLogger(__name__)


def fsdp_plugin(accelerator: Any) -> Any | None:
    """accelerate's FSDP plugin of this launch (its config file or FSDP_* variables), or None:
    no FSDP config, or a single process (nothing to shard over)."""
    from accelerate.utils import (
        FullyShardedDataParallelPlugin,
        disable_fsdp_ram_efficient_loading,
        parse_flag_from_env,
    )

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    if accelerator.num_processes == 1:
        log.info("ppo: FSDP config with one process: nothing to shard over, running unsharded")
        return None
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(
            f"ppo: FSDP version {plugin.fsdp_version} (fsdp_version in the accelerate config, "
            "FSDP_VERSION under torchrun): PPO shards with FSDP2; set fsdp_version: 2"
        )
    # With it on (accelerate launch's default), transformers would load only rank 0's weights
    # and leave the other processes placeholders for accelerate's prepare to broadcast into;
    # PPO shards each model itself, as soon as every process has loaded it whole.
    disable_fsdp_ram_efficient_loading()
    return plugin


def shard(model: Any, plugin: Any) -> Any:
    """Shard `model` over every process, in place: each decoder layer (the classes its
    transformers model lists in `_no_split_modules`, or the config's
    `fsdp_transformer_layer_cls_to_wrap`) an FSDP2 unit, the rest the root unit. `generate`
    gathers like `forward`; it must run with `synced_gpus=True`, since every process takes part
    in every gather until the last one has finished its responses."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers import PreTrainedModel

    options = {"reshard_after_forward": plugin.reshard_after_forward}
    options["offload_policy"] = plugin.cpu_offload
    inner = next(module for module in model.modules() if isinstance(module, PreTrainedModel))
    layers = set(plugin.transformer_cls_names_to_wrap or inner._no_split_modules or ())
    for module in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(module, **options)
    fully_shard(model, **options)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


# `run` below is a tasks.ppo.run.PPORun (not imported: run.py imports this module).


def mean_over_ranks(run: Any, stats: dict[str, float], iteration: int) -> dict[str, float]:
    """Each process's statistics of its own rollouts → their mean over processes, the same on
    every one: what is logged, summarised and steered by. One process: unchanged."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return stats
    log.info(
        "ppo: iteration %d, rank %d of %d (its own rollouts): score %.6f  kl %.6f",
        iteration + 1,
        accelerator.process_index,
        accelerator.num_processes,
        stats["objective/scores"],
        stats["objective/kl"],
    )
    keys = sorted(stats)
    local = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(local, "mean").tolist(), strict=True))


def unsharded_policy(run: Any) -> Any | None:
    """The trained actor as one ordinary module on rank 0 (None on the others), to be saved.
    DDP: rank 0's replica. FSDP (every process must call it): the shards gathered into a full
    state dict in rank 0's CPU memory, loaded into a model of models/sft's architecture (with
    the same adapters under LoRA)."""
    if not run.sharded:
        return run.accelerator.unwrap_model(run.actor) if run.accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0's alone
    weights = get_model_state_dict(run.actor, options=options)
    if not run.accelerator.is_main_process:
        return None
    policy = load_causal_lm("sft", run.params.model, torch.float32)
    if run.params.ppo.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(run.params.ppo.lora, "causal_lm"))
    policy.load_state_dict(weights, assign=True)  # strict: every key, no copy of the tensors
    policy.tie_weights()  # assigned tensors replace tied parameters one by one
    return policy


def check_replicas(run: Any, policy: Any | None) -> None:
    """What rank 0 is about to save must be what every process trained. DDP: each holds a
    replica, and all must be bit-identical (DDP averages the gradients, so the copies move
    together; a difference would make models/ppo/ rank 0's alone). FSDP: there are no replicas;
    the gathered `policy` must hold exactly the shards' weights (checksums Σ|w|, in float64)."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return
    if run.sharded:
        local = sum(p.to_local().detach().double().abs().sum() for p in run.actor.parameters())
        shards = accelerator.reduce(local.reshape(1).to(accelerator.device), "sum").item()
        if not accelerator.is_main_process:
            return
        gathered = sum(p.detach().double().abs().sum().item() for p in policy.parameters())
        if not math.isclose(gathered, shards, rel_tol=1e-9):
            raise TrainingDiverged(
                f"ppo: the gathered actor differs from its shards: checksum {gathered} != {shards}"
            )
        shards_count = accelerator.num_processes
        log.info("ppo: actor gathered from %d shards (checksum %.12e)", shards_count, gathered)
        return
    weights = accelerator.unwrap_model(run.actor).parameters()
    checksum = torch.stack([p.detach().double().abs().sum() for p in weights]).sum()
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    if len(set(checksums)) > 1:
        raise TrainingDiverged(f"ppo: the actor differs between processes: checksums {checksums}")
    if accelerator.is_main_process:
        log.info("ppo: actor identical on %d processes (checksum %.12e)", len(checksums), checksum)
