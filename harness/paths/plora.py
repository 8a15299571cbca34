"""LoRA on PLoRA's inner linears, and whether a merge left PLoRA itself intact.

PLoRA's ``Plora_A`` / ``Plora_B`` only ever see image rows, so a LoRA attached to them has
exactly zero effect on text tokens. Old PEFT (<= 0.20) skips every module whose *name*
contains ``lora_`` in ``merge_and_unload``: those wrappers stay, the saved "merged" checkpoint
has ``Plora_A.base_layer.weight`` instead of ``Plora_A.weight``, and a reload re-initialises
PLoRA. PEFT 0.21 matches structurally and merges them — into PLoRA's own image-only branch.
Either way PLoRA is no longer the base's. All functions here are structural (a module is
PLoRA-like when it has ``Plora_A`` and ``Plora_B`` children), never by class name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .raw import is_plora_key

INNER = ("Plora_A", "Plora_B")


def canonical_name(name: str) -> str | None:
    """A PEFT module/param name in base-model terms; None for PEFT internals (base_layer, lora_*)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    elif name == "base_model.model":
        name = ""
    parts = name.split(".") if name else []
    if any(p == "base_layer" or p.startswith("lora_") for p in parts):
        return None
    return name


def is_tuner_layer(module: torch.nn.Module) -> bool:
    """A PEFT wrapper (lora.Linear & co.), recognised by what it holds rather than by import."""
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "active_adapters"))


def plora_like(module: torch.nn.Module) -> bool:
    children = dict(module.named_children())
    if "base_layer" in children:  # a wrapped PLoRA: look inside
        children = dict(children["base_layer"].named_children())
    return all(name in children for name in INNER)


def lora_on_plora(model: torch.nn.Module) -> list[str]:
    """Canonical names of PEFT wrappers sitting at a PLoRA module's ``Plora_A`` / ``Plora_B``."""
    found = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not is_tuner_layer(module):
            continue
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in INNER:
            continue
        parent = modules.get(parent_name)
        if parent is not None and all(hasattr(parent, n) for n in INNER):
            found.append(canonical_name(name) or name)
    return found


@dataclass
class PloraIntegrity:
    """How a merged model (or its saved state dict) differs from the base in PLoRA-owned tensors."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)  # base PLoRA keys absent: re-initialised on reload
    changed: list[str] = field(default_factory=list)  # present but not bit-identical to the base
    leftover_wrappers: list[str] = field(default_factory=list)  # PEFT wrappers still in the "merged" model
    extra: list[str] = field(default_factory=list)  # keys such as Plora_A.base_layer.weight

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.leftover_wrappers or self.extra)

    def describe(self) -> str:
        if self.ok:
            return f"all {self.checked} PLoRA tensors bit-identical to the base, no PEFT wrappers left"
        lines = []
        if self.leftover_wrappers:
            lines.append(f"{len(self.leftover_wrappers)} PEFT wrapper(s) left unmerged, e.g. {self.leftover_wrappers[0]}")
        if self.missing:
            lines.append(f"{len(self.missing)} PLoRA tensor(s) missing (re-initialised on reload), e.g. {self.missing[0]}")
        if self.extra:
            lines.append(f"{len(self.extra)} wrapper tensor(s) saved in their place, e.g. {self.extra[0]}")
        if self.changed:
            lines.append(f"{len(self.changed)} PLoRA tensor(s) changed by the merge (LoRA folded into PLoRA's "
                         f"image-only branch), e.g. {self.changed[0]}")
        return "; ".join(lines)


def plora_integrity(merged: torch.nn.Module | Mapping[str, torch.Tensor],
                    base_state: Mapping[str, torch.Tensor]) -> PloraIntegrity:
    """Compare every PLoRA-owned tensor (``Plora_A/B``, ``plora_*_GN``) of ``merged`` with the base, bit for bit.

    ``merged`` may be a model (then leftover PEFT wrappers are reported too) or a state dict as
    saved / reloaded. Base tensors are cast to the merged tensor's dtype before the comparison.
    """
    found = PloraIntegrity()
    if isinstance(merged, torch.nn.Module):
        found.leftover_wrappers = [n for n, m in merged.named_modules() if is_tuner_layer(m)]
        state = merged.state_dict()
    else:
        state = merged
    for key, want in base_state.items():
        if not is_plora_key(key):
            continue
        found.checked += 1
        got = state.get(key)
        if got is None:
            found.missing.append(key)
        elif got.shape != want.shape or not torch.equal(got.detach().cpu(), want.detach().cpu().to(got.dtype)):
            found.changed.append(key)
    found.extra = [k for k in state if is_plora_key(k) and k not in base_state]
    return found
