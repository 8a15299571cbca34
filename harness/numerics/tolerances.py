"""The tolerance policy: how far a result may be from the fp32 reference, per dtype (README table).

A fixed relative tolerance cannot hold at depth in bf16/fp16: a 16-layer bf16 model already differs from its own
fp32 run by ~10% (REFERENCE.md §8), more than any fixed table allows and more than small mis-merges. So the band
a path must stay in is calibrated on the model itself (``band``): the larger of the table's ``rel`` (a floor),
``noise_factor`` times the dtype's own noise on this model and probe (the base in the check dtype against the
base in fp32, per row class), and ``effect_share`` of the adapter's own effect (a path's rounding grows with the
effect it computes). A path is judged against that band; an adapter whose effect is not above the band cannot
be told from rounding at this dtype, and ``effect`` warns naming fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tolerance:
    """How far a path may be from the fp32 reference, per row class (image rows, text rows).

    ``rel`` is relative to the output scale: max |out - ref| / max |ref| over that row class.
    ``atol`` is an absolute floor for row classes whose reference outputs are close to zero.
    ``weight_eps`` bounds merged-weight rounding: |W'_got - W'_want| <= rel_w·|ΔW| + weight_eps·|W|.
    ``merged_rel`` bounds a saved merged checkpoint: max |W'_got - W'_want| / max |W'_want| per tensor (a few
    units of rounding of that dtype: merges are computed in the model dtype, so two roundings can stack).
    """

    rel: float
    atol: float
    weight_eps: float
    merged_rel: float
    why: str
    noise_factor: float = 3.0  # a path may be this many times the dtype's own noise on the model being checked
    effect_share: float = 0.0  # ... or this share of the adapter's effect (its own rounding scales with it)


# Calibrated on correct adapters at depth (README, Tolerance policy): a correct path's error against the fp32
# reference stays below 2x the base's own noise; a 2x merge, a skipped layer or folded PLoRA is far above 3x.
NOISE_FACTOR_LOW_PRECISION = 3.0
EFFECT_SHARE_LOW_PRECISION = 2e-2

# One policy per dtype. fp32 covers summation-order noise (PEFT computes x·Aᵀ·Bᵀ, a merge computes
# (W + sBA)·x) through a few layers; bf16/fp16 cover running the whole model in that dtype against an
# fp32 reference, so they are looser, and only scaling errors well above rounding are caught there.
TOLERANCE_TABLE: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-5, 2.4e-7, 1e-5, "summation order only; a mis-scaled adapter is >1e-2",
                         noise_factor=10.0, effect_share=0.0),
    "bfloat16": Tolerance(5e-2, 1e-2, 7.9e-3, 1.6e-2, "8-bit mantissa: ~4e-3 per rounding, compounded over layers",
                          noise_factor=NOISE_FACTOR_LOW_PRECISION, effect_share=EFFECT_SHARE_LOW_PRECISION),
    "float16": Tolerance(1e-2, 2e-3, 9.8e-4, 2e-3, "11-bit mantissa: ~5e-4 per rounding, compounded over layers",
                         noise_factor=NOISE_FACTOR_LOW_PRECISION, effect_share=EFFECT_SHARE_LOW_PRECISION),
}
# max |Δlogits| / max |logits| of the fp32 reference below this is "no measurable effect" (effect check).
EFFECT_FLOOR = 1e-4


def tolerance_for(dtype: torch.dtype | str) -> float:
    """The relative output tolerance for ``dtype`` (fp32's for anything unlisted)."""
    return policy_for(dtype).rel


def policy_for(dtype: torch.dtype | str) -> Tolerance:
    """The policy for a torch dtype or its name ("bfloat16"); fp32's for anything unlisted."""
    return TOLERANCE_TABLE.get(_dtype_name(dtype), TOLERANCE_TABLE["float32"])


def merged_weight_tolerances() -> dict[str, float]:
    """``merged_rel`` by dtype name, as the merged-matches report states it."""
    return {name: policy.merged_rel for name, policy in TOLERANCE_TABLE.items()}


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")



def band(dtype: torch.dtype | str, *, noise: float = 0.0, effect: float = 0.0) -> float:
    """The relative error a path may have on one row class: the table's floor, ``noise_factor`` x the dtype's own
    noise on this model (base in ``dtype`` vs base in fp32), or ``effect_share`` x the adapter's effect."""
    policy = policy_for(dtype)
    return max(policy.rel, policy.noise_factor * noise, policy.effect_share * effect)


def resolution_floor(dtype: torch.dtype | str, noise: float = 0.0) -> float:
    """The smallest relative difference a path comparison can tell from rounding at ``dtype`` on a model whose own
    noise is ``noise``: the table's floor or ``noise_factor`` x the noise (an effect below 2x this is unresolved)."""
    policy = policy_for(dtype)
    return max(policy.rel, policy.noise_factor * noise)


def effect_resolved(dtype: torch.dtype | str, *, noise: float, effect: float) -> bool:
    """Whether an adapter's relative ``effect`` is clearly above what rounding does at ``dtype`` on a model whose own
    noise is ``noise`` (twice ``resolution_floor``): below it a mis-merge of that size cannot be told from rounding."""
    return effect >= 2 * resolution_floor(dtype, noise)
