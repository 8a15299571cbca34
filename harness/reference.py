"""The fp32 reference: base weights + adapter tensors combined by hand, and the tolerance policy.

Every loading path is compared with this reference, never only with another path,
so two paths that are wrong the same way cannot agree their way to a pass. The
reference needs no PEFT object: W' = W + s·B·A with s from the saved config
(alpha/r, rank_pattern, alpha_pattern, rsLoRA), DoRA's column renormalisation,
and modules_to_save tensors copied in. PLoRA's own Plora_A/Plora_B are left alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .lora_math import delta_weight, module_scaling
from .probes import ProbeBatch

PREFIX = "base_model.model."

# Tolerance policy: max |out - reference| / max |reference|, measured separately on image rows and
# on text rows of the probe (padding excluded). fp32 covers summation-order noise through a few
# layers; bf16/fp16 cover running the whole model in that dtype against an fp32 reference (so they
# are much looser, and a mis-scaled merge is caught by comparing with the adapter's own effect).
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tolerance_for(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


@torch.no_grad()
def apply_adapter_reference(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Fold the adapter into ``model``'s weights in place, by hand; returns the modules changed."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    lora: dict[str, dict[str, torch.Tensor]] = {}
    changed = []
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
            marker = f".{kind}"
            if marker in name:
                lora.setdefault(name.split(marker)[0], {})[kind] = value
                break
        else:
            if name in params:  # modules_to_save / bias tensors replace the base values
                params[name].copy_(value.to(params[name].dtype))
                changed.append(name)
    for module_name, parts in sorted(lora.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            continue
        weight = modules[module_name].weight
        scaling = module_scaling(config, module_name, rank=parts["lora_A"].shape[0])
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        merged = weight.float() + delta_weight(parts["lora_A"], parts["lora_B"], scaling, fan_in_fan_out=fan_in_fan_out)
        if "lora_magnitude_vector" in parts:  # DoRA: rescale each output row to the learned magnitude
            norm = merged.norm(p=2, dim=1 if not fan_in_fan_out else 0)
            factor = parts["lora_magnitude_vector"].float().flatten() / norm
            merged = merged * (factor.view(-1, 1) if not fan_in_fan_out else factor.view(1, -1))
        weight.copy_(merged.to(weight.dtype))
        changed.append(module_name)
    return changed


def reference_model(base_dir: Path, adapter_dir: Path, *, device: str = "cpu") -> torch.nn.Module:
    """The base loaded in fp32 with the adapter folded in by hand (see ``apply_adapter_reference``)."""
    import json

    from .paths import load_base, read_adapter_tensors

    model = load_base(base_dir, dtype=torch.float32, device=device)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    apply_adapter_reference(model, config, read_adapter_tensors(Path(adapter_dir)))
    return model


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: ProbeBatch, *, im_mask: bool = True) -> torch.Tensor:
    """fp32 CPU logits of ``model`` on the probe (inputs cast to the model's dtype and device)."""
    param = next(model.parameters())
    kwargs = {"inputs_embeds": probe.inputs_embeds.to(param.device, param.dtype),
              "attention_mask": probe.attention_mask.to(param.device)}
    if im_mask:
        kwargs["im_mask"] = probe.im_mask.to(param.device)
    return model(**kwargs).logits.float().cpu()


@dataclass
class Comparison:
    """How far ``label``'s outputs are from the reference, on image rows and on text rows."""

    label: str
    dtype: str
    tolerance: float
    image_max_abs: float
    image_max_rel: float
    text_max_abs: float
    text_max_rel: float
    worst_row: tuple[str, int, int]  # (row class, batch, position) of the largest relative error
    ok: bool

    def summary(self) -> str:
        row_class, b, t = self.worst_row
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{self.label}: image rows max abs {self.image_max_abs:.2e} (rel {self.image_max_rel:.2e}), "
                f"text rows max abs {self.text_max_abs:.2e} (rel {self.text_max_rel:.2e}); worst at {row_class} "
                f"row batch {b} position {t}; {verdict} the {self.dtype} tolerance {self.tolerance:.0e}")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(outputs: torch.Tensor, reference: torch.Tensor, probe: ProbeBatch, *, dtype: torch.dtype,
            label: str, tolerance: float | None = None) -> Comparison:
    """Max abs / rel error per row class; rel is relative to the reference's max magnitude on those rows."""
    tol = tolerance_for(dtype) if tolerance is None else tolerance
    diff = (outputs.float() - reference.float()).abs().amax(-1)  # [B, T]
    stats = {}
    worst = ("none", -1, -1)
    worst_rel = -1.0
    for row_class, rows in (("image", probe.image_rows.cpu()), ("text", probe.text_rows.cpu())):
        if not rows.any():
            stats[row_class] = (0.0, 0.0)
            continue
        scale = reference.float().abs().amax(-1)[rows].max().clamp_min(1e-12)
        masked = torch.where(rows, diff, torch.zeros_like(diff))
        max_abs = float(masked.max())
        rel = max_abs / float(scale)
        stats[row_class] = (max_abs, rel)
        if rel > worst_rel:
            flat = int(masked.argmax())
            worst_rel, worst = rel, (row_class, flat // diff.shape[1], flat % diff.shape[1])
    return Comparison(
        label=label,
        dtype=str(dtype).replace("torch.", ""),
        tolerance=tol,
        image_max_abs=stats["image"][0],
        image_max_rel=stats["image"][1],
        text_max_abs=stats["text"][0],
        text_max_rel=stats["text"][1],
        worst_row=worst,
        ok=max(stats["image"][1], stats["text"][1]) <= tol and bool(torch.isfinite(outputs).all()),
    )


@torch.no_grad()
def compare_module_weights(model: torch.nn.Module, reference: torch.nn.Module, *, dtype: torch.dtype,
                           label: str) -> tuple[bool, str]:
    """Merged weights against the reference's, naming the worst module (for merged paths)."""
    ref = dict(reference.named_parameters())
    worst_name, worst_rel = "", 0.0
    for name, param in model.named_parameters():
        if name not in ref or ref[name].shape != param.shape:
            continue
        want = ref[name].float()
        rel = float((param.float().cpu() - want.cpu()).abs().max() / want.abs().max().clamp_min(1e-12))
        if rel > worst_rel:
            worst_name, worst_rel = name, rel
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
    layer = worst_name.rsplit(".weight", 1)[0]
    return worst_rel <= tol, f"{label}: worst weight {layer} off by {worst_rel:.2e} of its max (tolerance {tol:.0e})"
