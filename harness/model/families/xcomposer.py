"""InternLM-XComposer2 (IXC2, 4KHD, 2.5): PLoRA, its HD separators, ``im_mask`` and the official recipe.

PLoRA ("Partial LoRA") is the base model's own low-rank branch: ``Plora_A``/``Plora_B`` children of
every ``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``, applied only to image rows
(``im_mask``), plus the top-level separators ``plora_glb_GN``/``plora_sub_GN`` of the HD variants.
A PEFT adapter goes beside it, never into it: its weights are not adapter tensors, a merge must not
change them, and a target inside ``Plora_A``/``Plora_B`` never acts on text tokens.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from harness.model.families import register
from harness.model.families.hf import HuggingFace

if TYPE_CHECKING:
    import torch

BRANCH_CHILDREN = ("Plora_A", "Plora_B")
SEPARATORS = ("plora_glb_GN", "plora_sub_GN")
MASK_KWARG = "im_mask"
# The official fine-tuning recipe's LoRA targets (finetune/finetune.py), by the model's own module names.
OFFICIAL_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
_SEPARATOR = re.compile(r"(^|\.)plora_[A-Za-z0-9]+_GN$")


class XComposer(HuggingFace):
    """Detected by its PLoRA modules (structure) or by its config (model_type / auto_map naming XComposer);
    its towers are named as in Hugging Face models."""

    name = "xcomposer"
    branch_label = "PLoRA"
    mask_kwarg = MASK_KWARG
    branch_kind_labels = {"plora": "PLoRA Plora_A/Plora_B", "plora-separator": "plora_*_GN separator"}
    merge_advice = {
        "missing": "peft <= 0.20's merge_and_unload skips modules whose name contains lora_ (LoRA on Plora_A/Plora_B), "
                   "so their PLoRA weights are not saved: keep PLoRA modules out of target_modules, re-merge and save "
                   "the whole model",
        "folded": "merge only the adapter's ΔW: PLoRA's own branch (Plora_B·Plora_A) applies to image tokens only and "
                  "must stay a separate module; PeftModel.merge_and_unload leaves it alone",
        "unmerged": "; peft <= 0.20 skips modules whose name contains lora_ (Plora_A/Plora_B)",
    }
    branch_key_note = ": a name filter on 'lora_' also matches Plora_A/Plora_B/plora_*_GN"
    training_fix = ("freeze PLoRA before training (p.requires_grad_(False) for every parameter under Plora_A/Plora_B "
                    "and plora_*_GN: peft <= 0.20 leaves them trainable because their names contain 'lora_'), or "
                    "upgrade to peft >= 0.21; if they were meant to train, ship a full merged checkpoint instead")

    def detect(self, config: Mapping | None, names: Collection[str]) -> bool:
        if config and _names_xcomposer(config):
            return True
        return any(self.is_branch_param(name) for name in names)

    def is_branch_module(self, module: torch.nn.Module) -> bool:
        children = {name for name, _ in module.named_children()}
        return set(BRANCH_CHILDREN) <= children

    def branch_modules_from_keys(self, keys: Iterable[str]) -> set[str]:
        suffix = f".{BRANCH_CHILDREN[0]}.weight"
        return {key[: -len(suffix)] for key in keys if key.endswith(suffix)}

    def is_branch_param(self, name: str) -> bool:
        return self.branch_param_kind(name) is not None

    def branch_param_kind(self, name: str) -> str | None:
        parts = name.split(".")
        if any(part in BRANCH_CHILDREN for part in parts):
            return "plora"
        if _SEPARATOR.search(name) or parts[-1].startswith("plora_"):
            return "plora-separator"
        return None

    def is_branch_inner(self, module_name: str, branch_modules: set[str]) -> bool:
        parent, _, leaf = module_name.rpartition(".")
        return leaf in BRANCH_CHILDREN and parent in branch_modules

    def branch_weight_keys(self, module: str) -> tuple[str, str] | None:
        return f"{module}.{BRANCH_CHILDREN[0]}.weight", f"{module}.{BRANCH_CHILDREN[1]}.weight"

    def branch_key_examples(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        picks = []
        for kind in (*BRANCH_CHILDREN, *SEPARATORS):
            found = next((k for k in keys if kind in k), None)
            if found:
                picks.append(found)
        return picks


def _names_xcomposer(config: Mapping) -> bool:
    """config.json of an XComposer checkpoint: model_type ``internlmxcomposer2`` or auto_map naming its classes."""
    auto_map = config.get("auto_map") or {}
    named = [str(config.get("model_type") or ""), *map(str, auto_map.values() if isinstance(auto_map, Mapping) else [])]
    return any("xcomposer" in text.lower() for text in named)


register(XComposer())
