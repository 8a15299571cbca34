"""The fp32 reference: base weights + adapter tensors combined by hand, and the tolerance policy.

Every loading path is compared with this reference, never only with another path,
so two paths that are wrong the same way cannot agree their way to a pass. The
reference needs no PEFT object: W' = W + s·B·A with s from the saved config
(alpha/r, rank_pattern, alpha_pattern, rsLoRA), DoRA's column renormalisation,
and modules_to_save tensors copied in. PLoRA's own Plora_A/Plora_B are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.model.lora_math import delta_weight, module_scaling
from harness.model.peft_keys import split_adapter_tensors
from harness.numerics.probes import ProbeBatch

# ---------------------------------------------------------------------------------------------
# Expected deltas from the raw adapter tensors


@dataclass
class ModuleDelta:
    """What merging should add to one module's weight: s·B·A (fp32), or DoRA's rescaled result."""

    module: str  # e.g. "model.layers.0.attention.wqkv"
    delta: torch.Tensor  # s·B·A, fp32 [out, in] (before DoRA's rescaling)
    scaling: float
    rank: int
    magnitude: torch.Tensor | None = None  # DoRA's learned per-row magnitude
    fan_in_fan_out: bool = False

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight a correct merge produces from ``base_weight``."""
        merged = base_weight.float() + self.delta.to(base_weight.device)
        if self.magnitude is not None:
            dim = 0 if self.fan_in_fan_out else 1
            factor = self.magnitude.float().flatten().to(merged.device) / merged.norm(p=2, dim=dim)
            merged = merged * (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1))
        return merged

    def expected_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(base_weight) - base_weight.float()




def expected_deltas(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, ModuleDelta]:
    """ΔW per adapted module from the saved config and tensors alone (no PEFT object involved).

    The rank is the saved ``lora_A``'s, the alpha comes from ``alpha_pattern`` or ``lora_alpha``,
    matched like PEFT (first pattern that matches as a dotted suffix); rsLoRA uses alpha/sqrt(r).
    Holds every ΔW at once (full weight-sized fp32 matrices): use ``iter_expected_deltas`` to stream.
    """
    return {delta.module: delta for delta in iter_expected_deltas(config, tensors)}


def iter_expected_deltas(config: dict, tensors: dict[str, torch.Tensor]):
    """``expected_deltas`` one module at a time, so only one ΔW is alive (memory: one weight)."""
    lora, _ = split_adapter_tensors(tensors)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in sorted(lora.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            continue  # nothing a loader could apply either: key-coverage / base-match report these
        rank = parts["lora_A"].shape[0]
        scaling = module_scaling(config, module, rank=rank)
        yield ModuleDelta(
            module=module,
            delta=delta_weight(parts["lora_A"], parts["lora_B"], scaling, fan_in_fan_out=fan_in_fan_out),
            scaling=scaling,
            rank=rank,
            magnitude=parts.get("lora_magnitude_vector"),
            fan_in_fan_out=fan_in_fan_out,
        )


@torch.no_grad()
def apply_adapter_reference(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Fold the adapter into ``model``'s weights in place, by hand; returns the modules changed."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    _, others = split_adapter_tensors(tensors)
    changed = []
    for name, value in others.items():
        if name in params:  # modules_to_save / bias tensors replace the base values
            params[name].copy_(value.to(params[name].dtype))
            changed.append(name)
    for delta in iter_expected_deltas(config, tensors):
        module_name = delta.module
        if module_name not in modules or getattr(modules[module_name], "weight", None) is None:
            continue  # an adapter module the base lacks: key-coverage / base-match report these
        weight = modules[module_name].weight
        if weight.shape != delta.delta.shape:
            continue  # a different base: reported by base-match, not folded in here
        if delta.magnitude is None and weight.dtype == torch.float32:
            weight.add_(delta.delta.to(weight.device))  # the same fp32 sum as merged_weight, without a copy
        else:
            weight.copy_(delta.merged_weight(weight).to(weight.dtype))
        changed.append(module_name)
    return changed



# ---------------------------------------------------------------------------------------------
# Running probes


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: ProbeBatch, *, im_mask: bool = True) -> torch.Tensor:
    """fp32 CPU logits of ``model`` on the probe (inputs cast to the model's dtype and device)."""
    param = next(model.parameters())
    kwargs = {"inputs_embeds": probe.inputs_embeds.to(param.device, param.dtype),
              "attention_mask": probe.attention_mask.to(param.device)}
    if im_mask:
        kwargs["im_mask"] = probe.im_mask.to(param.device)
    return model(**kwargs).logits.float().cpu()


