"""Resolve an adapter's ``target_modules`` against a base model, the way PEFT does.

Matching uses PEFT's own ``check_target_module_exists`` so the answer is the one
``get_peft_model`` would give; on top of it we attribute matches to each pattern,
to a tower (language / vision / projector) and flag targets inside PLoRA.

PEFT is handed the config's regexes only after each compiled and matched every module name within
a deadline here (``harness.inputs.patterns``); PEFT's own matching runs under a deadline too. An
invalid or too costly pattern gives an unresolved ``TargetResolution`` (``error`` says why), never a
hang or an exception.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from harness.inputs.patterns import (
    Expired,
    PatternTooCostly,
    bounded_matches,
    compile_problem,
    config_patterns,
    deadline,
)
from harness.model.structure import BaseModelInfo

PEFT_MATCH_BUDGET_S = 30.0  # PEFT's check_target_module_exists on every module name, after the screening


@dataclass
class TargetResolution:
    matched: list[str]
    per_pattern: dict[str, list[str]]
    per_tower: dict[str, int]
    unmatched_patterns: list[str]
    plora_inner: list[str]  # matched modules inside a branch module (PLoRA's Plora_A / Plora_B)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why the targets could not be resolved (an invalid or too costly pattern)


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


def unresolved(reason: str) -> TargetResolution:
    """No answer: the config's patterns cannot be matched (``reason`` names the pattern and why)."""
    return TargetResolution(matched=[], per_pattern={}, per_tower={}, unmatched_patterns=[], plora_inner=[],
                            notes=[reason], error=reason)


def screen_patterns(adapter_config: dict, names: list[str]) -> str | None:
    """Why PEFT must not be handed this config's regexes (invalid, or too costly on these names), or None."""
    for pattern in config_patterns(adapter_config):
        problem = compile_problem(pattern)
        if problem is not None:
            return problem
        try:
            bounded_matches(pattern, names)
        except PatternTooCostly as err:
            return str(err)
    return None


def resolve_targets(adapter_config: dict, base: BaseModelInfo) -> TargetResolution:
    names = base.module_names()
    problem = screen_patterns(adapter_config, names)
    if problem is not None:
        return unresolved(problem)
    try:
        config = lora_config_from_dict(adapter_config)
    except Exception as err:  # noqa: BLE001 - PEFT's own validation; config-valid reports it in full
        return unresolved(f"PEFT cannot build a LoraConfig from adapter_config.json ({type(err).__name__}: "
                          f"{str(err).strip()[:200]})")
    notes = []
    targets = config.target_modules
    if isinstance(targets, str) and targets == "all-linear":
        try:
            targets = _all_linear_suffixes(base)
        except ValueError as err:
            return unresolved(str(err))
        config = dataclasses.replace(config, target_modules=set(targets))
        notes.append(f"'all-linear' expands to {targets}")
    patterns = [targets] if isinstance(targets, str) else sorted(targets or [])
    try:
        with deadline(PEFT_MATCH_BUDGET_S):  # a backstop: the screening above already matched every regex
            matched = [n for n in names if _is_match(config, n)]
            per_pattern = {}
            for pattern in patterns:
                one = dataclasses.replace(config, target_modules=pattern if isinstance(targets, str) else {pattern})
                per_pattern[pattern] = [n for n in matched if _is_match(one, n)]
    except Expired:
        return unresolved(f"matching target_modules against {len(names)} module names with PEFT took over "
                          f"{PEFT_MATCH_BUDGET_S:g} s")
    branch_modules = base.branch_modules()
    inner = [n for n in matched if base.family.is_branch_inner(n, branch_modules)]
    return TargetResolution(
        matched=matched,
        per_pattern=per_pattern,
        per_tower=dict(Counter(base.family.tower_of(n) or "language" for n in matched)),
        unmatched_patterns=[p for p, hits in per_pattern.items() if not hits],
        plora_inner=inner,
        notes=notes,
    )
