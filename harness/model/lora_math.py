"""LoRA arithmetic from a saved config, as PEFT applies it: rank, scaling and ΔW per module.

Kept free of PEFT model objects so the fp32 reference and the merged-checkpoint
check can compute what a merge *should* produce from the raw tensors alone.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from harness.model.layer_kinds import LayerKind


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches ``module`` as a dotted suffix, spliced as the
    installed PEFT splices it. Matching is bounded in time: a key that does not compile, or is too costly to
    match (PEFT would hang on it), counts as matching nothing here; ``config-valid`` fails on it."""
    from harness.inputs.patterns import ConfigPattern, PatternTooCostly, bounded_matches, pattern_key_source

    for pattern in patterns:
        candidate = ConfigPattern("rank_pattern", pattern, pattern_key_source(pattern), "match")
        try:
            if bounded_matches(candidate, [module]):
                return pattern
        except (PatternTooCostly, re.error, RecursionError, OverflowError):
            continue
    return None


def module_rank(config: dict, module: str) -> int | None:
    """The rank PEFT gives ``module`` (path without prefix): ``rank_pattern`` first, then ``r``; None when the
    config does not hold an integer there (config-valid reports it)."""
    pattern = config.get("rank_pattern") or {}
    key = pattern_key(list(pattern), module) if isinstance(pattern, dict) else None
    rank = pattern[key] if key is not None else config.get("r")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def module_alpha(config: dict, module: str) -> float:
    pattern = config.get("alpha_pattern") or {}
    key = pattern_key(list(pattern), module)
    return float(pattern[key]) if key is not None else float(config["lora_alpha"])


def module_scaling(config: dict, module: str, rank: int | None = None) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA; ``rank`` overrides the config (use the saved tensor's)."""
    r = rank if rank is not None else module_rank(config, module)
    alpha = module_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *, kind: LayerKind | None = None,
                 fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = scaling · B @ A in fp32, in the stored layout of ``kind`` (``harness.model.layer_kinds``; the rule lives
    there). Without a kind, ``fan_in_fan_out`` picks Conv1D's [in, out] layout: callers that know the base module
    pass its kind, which is what PEFT goes by."""
    from harness.model.layer_kinds import CONV1D, LINEAR

    return (kind or (CONV1D if fan_in_fan_out else LINEAR)).delta(lora_a, lora_b, scaling)
