"""Resolve an adapter's ``target_modules`` against a base model, the way PEFT does.

Matching uses PEFT's own ``check_target_module_exists`` so the answer is the one
``get_peft_model`` would give; on top of it we attribute matches to each pattern,
to a tower (language / vision / projector) and flag targets inside PLoRA.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from harness.model import families
from harness.model.structure import BaseModelInfo


@dataclass
class TargetResolution:
    matched: list[str]
    per_pattern: dict[str, list[str]]
    per_tower: dict[str, int]
    unmatched_patterns: list[str]
    plora_inner: list[str]  # matched modules inside a branch module (PLoRA's Plora_A / Plora_B)
    notes: list[str] = field(default_factory=list)


def lora_config_from_dict(config: dict) -> LoraConfig:
    """A LoraConfig from a parsed adapter_config.json, keeping only fields this PEFT knows."""
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in config.items() if k in known})


def _is_match(config: LoraConfig, name: str) -> bool:
    found = check_target_module_exists(config, name)
    return bool(found) and type(found).__name__ != "_ExcludedModule"


def _all_linear_suffixes(base: BaseModelInfo) -> list[str]:
    """PEFT's "all-linear": every nn.Linear's last name part, except the LM head's."""
    if base.modules is None:
        raise ValueError("target_modules='all-linear' needs the module tree, and the meta build failed")
    head = base.output_head.rsplit(".", 1)[-1] if base.output_head else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in base.modules.items() if m.is_linear} - {head})


def resolve_targets(adapter_config: dict, base: BaseModelInfo) -> TargetResolution:
    config = lora_config_from_dict(adapter_config)
    notes = []
    targets = config.target_modules
    if isinstance(targets, str) and targets == "all-linear":
        targets = _all_linear_suffixes(base)
        config = dataclasses.replace(config, target_modules=set(targets))
        notes.append(f"'all-linear' expands to {targets}")
    names = base.module_names()
    matched = [n for n in names if _is_match(config, n)]
    patterns = [targets] if isinstance(targets, str) else sorted(targets or [])
    per_pattern = {}
    for pattern in patterns:
        one = dataclasses.replace(config, target_modules=pattern if isinstance(targets, str) else {pattern})
        per_pattern[pattern] = [n for n in matched if _is_match(one, n)]
    branch_modules = base.branch_modules()
    inner = [n for n in matched if families.is_branch_inner(n, branch_modules)]
    return TargetResolution(
        matched=matched,
        per_pattern=per_pattern,
        per_tower=dict(Counter(families.tower_of(n) for n in matched)),
        unmatched_patterns=[p for p, hits in per_pattern.items() if not hits],
        plora_inner=inner,
        notes=notes,
    )
