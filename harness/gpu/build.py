"""Build the synthetic family straight on a device, and give it a deterministic LoRA adapter.

At 7B dims a CPU build would allocate and initialise 28 GB of fp32 first; here the model is
instantiated on the meta device, materialised with ``to_empty`` on the target device in the
target dtype, and filled there by ``fill_deterministic`` (a seeded generator per tensor name).
Because every tensor's values are a function of its name, any base weight can be regenerated
later (``regenerate_param``) instead of being kept: that is how the merge check compares every
merged weight at 7B size without holding a second copy of the model.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..synthetic.adapters import official_lora_config
from ..synthetic.family import Dims, _std_for, fill_deterministic, make_config, name_seed
from ..synthetic.modeling.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM


def build_on_device(variant: str, dims: Dims, *, device: str | torch.device, dtype: torch.dtype,
                    seed: int = 0, **overrides) -> InternLMXComposer2ForCausalLM:
    """The synthetic model built on the meta device, materialised on ``device`` in ``dtype``, filled there.

    ``device="meta"`` stops after the meta build (shapes and names only, no memory). The values are
    those of ``harness.synthetic.build_model`` on the same device type (same per-name generators).
    """
    config = make_config(variant, dims, **overrides)
    with torch.device("meta"):
        model = InternLMXComposer2ForCausalLM(config)
    model = model.to(dtype)  # on meta: only changes the recorded dtype
    if torch.device(device).type == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    restore_buffers(model)
    fill_deterministic(model, seed)
    return model.eval()


@torch.no_grad()
def restore_buffers(model: torch.nn.Module) -> None:
    """Give back the buffers ``to_empty`` left uninitialised (CLIP's ``position_ids``).

    Buffers are computed in ``__init__`` (not learned), so the owning module is rebuilt from its
    own config on the CPU and its buffers copied over. An owner without a config cannot be rebuilt:
    that raises, naming it, rather than leave garbage in the model.
    """
    for name, module in model.named_modules():
        own = {key: buf for key, buf in module._buffers.items() if buf is not None}
        if not own:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot restore buffers {sorted(own)} of {name or 'the model'} "
                               f"({type(module).__name__}): it has no config to rebuild it from")
        with torch.device("cpu"):
            fresh = type(module)(config)
        for key, buf in own.items():
            buf.copy_(fresh._buffers[key].to(buf.dtype))


def regenerate_param(name: str, shape: torch.Size | tuple[int, ...], *, seed: int, device: str | torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """The value ``fill_deterministic`` gives parameter ``name`` (same generator, same ops, same rounding)."""
    mean, std = _std_for(name, torch.Size(shape))
    gen = torch.Generator(device=device).manual_seed(name_seed(name, seed))
    values = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    return values.mul_(std).add_(mean).to(dtype)


def estimate_bytes(variant: str, dims: Dims, dtype: torch.dtype) -> int:
    """Bytes the model's parameters take in ``dtype`` (from a meta build: no memory used)."""
    model = build_on_device(variant, dims, device="meta", dtype=dtype)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def attach_lora(model: torch.nn.Module, *, r: int, lora_alpha: int | None = None, seed: int = 0,
                effect_scale: float = 0.2, **lora_overrides):
    """Wrap ``model`` with the official-recipe LoRA (wqkv, wo, w1, w2, w3) and fill it deterministically.

    The LoRA weights are created without an init pass where PEFT allows it (``low_cpu_mem_usage``:
    meta, then materialised next to each base weight), and filled from per-name generators on that
    device. ``lora_B`` is not zero: each ΔW = s·B·A has about ``effect_scale`` times the standard
    deviation of its base weight, a trained-adapter-sized change that a mis-merge cannot hide in.
    """
    from peft import get_peft_model

    config = official_lora_config(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, **lora_overrides)
    on_meta = next(model.parameters()).is_meta
    if "low_cpu_mem_usage" in inspect.signature(get_peft_model).parameters:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    elif on_meta:  # older PEFT: create the LoRA layers on meta too
        with torch.device("meta"):
            peft_model = get_peft_model(model, config)
    else:
        peft_model = get_peft_model(model, config)
    if not on_meta:
        fill_lora(peft_model, seed=seed, effect_scale=effect_scale)
    return peft_model.eval()


@torch.no_grad()
def fill_lora(peft_model: torch.nn.Module, *, seed: int, effect_scale: float, adapter: str = "default") -> int:
    """Materialise (if on meta) and fill every LoRA A/B next to its base weight; returns the count filled."""
    from peft.tuners.lora import LoraLayer

    filled = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer().weight
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        for part in (lora_a, lora_b):
            if part.weight.is_meta:
                part.to_empty(device=base.device)
        rank = lora_a.weight.shape[0]
        std_b = effect_scale / (module.scaling[adapter] * math.sqrt(rank))
        for part, std in ((lora_a, lora_a.weight.shape[1] ** -0.5), (lora_b, std_b)):
            key = f"{name}.{'lora_A' if part is lora_a else 'lora_B'}.{adapter}.weight"
            gen = torch.Generator(device=base.device).manual_seed(name_seed(key, seed))
            values = torch.randn(part.weight.shape, generator=gen, device=base.device, dtype=torch.float32)
            part.weight.copy_(values.mul_(std))
        filled += 1
    return filled
