"""``zero-checkpoint``: what converting a DeepSpeed ZeRO checkpoint into an adapter found.

The conversion itself happens before any check runs (``harness.engine.run`` turns the checkpoint
into a temporary PEFT adapter directory with DeepSpeed's own ``zero_to_fp32``, after a
pickle scan); this check reports it: stage, world size, tag, tensors and notes.
"""

from __future__ import annotations

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped


def check_zero_checkpoint(ctx: CheckContext):
    if ctx.deepspeed_error is not None:
        return failed(ctx.deepspeed_error)
    zero = ctx.deepspeed
    if zero is None:
        return skipped("the adapter is not a DeepSpeed checkpoint")
    details = zero.to_dict()
    details.pop("log", None)
    if zero.n_tensors == 0:
        return failed(f"ZeRO-{zero.stage} checkpoint {zero.tag}: no LoRA tensors converted", **details)
    return passed(f"ZeRO-{zero.stage} checkpoint, world size {zero.world_size}, tag {zero.tag}: {zero.n_tensors} "
                  f"adapter tensors converted with zero_to_fp32 ({zero.dtype})", **details)


register(
    id="zero-checkpoint",
    group="deepspeed",
    summary="a DeepSpeed checkpoint directory given as the adapter: detected, vetted (pickle scan) and converted "
    "with DeepSpeed's zero_to_fp32; fails when the conversion is refused or yields no LoRA tensors",
    why="DeepSpeed checkpoints are pickles that zero_to_fp32 loads with weights_only=False, and ZeRO-3 shards "
    "every parameter across ranks; only a vetted conversion tells whether the training run holds the adapter",
    fix="pass the directory engine.save_checkpoint wrote (with 'latest' and every rank's shards) and an "
    "adapter_config.json beside it; or save the adapter with GatheredParameters on all ranks",
)(check_zero_checkpoint)
