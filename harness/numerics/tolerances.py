"""The tolerance policy: how far a result may be from the fp32 reference, per dtype (README table)."""

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


# One policy per dtype. fp32 covers summation-order noise (PEFT computes x·Aᵀ·Bᵀ, a merge computes
# (W + sBA)·x) through a few layers; bf16/fp16 cover running the whole model in that dtype against an
# fp32 reference, so they are looser, and only scaling errors well above rounding are caught there.
TOLERANCE_TABLE: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-5, 2.4e-7, 1e-5, "summation order only; a mis-scaled adapter is >1e-2"),
    "bfloat16": Tolerance(5e-2, 1e-2, 7.9e-3, 1.6e-2, "8-bit mantissa: ~4e-3 per rounding, compounded over layers"),
    "float16": Tolerance(1e-2, 2e-3, 9.8e-4, 2e-3, "11-bit mantissa: ~5e-4 per rounding, compounded over layers"),
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

