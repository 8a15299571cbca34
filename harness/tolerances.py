"""One tolerance policy per dtype for comparing a loading path against the fp32 reference.

Why a table and not ``torch.allclose`` defaults: the reference is always computed in fp32
from the stored tensors, so a bf16 or fp16 path differs from it by that dtype's rounding of
weights, activations and the merge (W + ΔW rounded once more), which is orders of magnitude
above fp32's. Each row below was calibrated by measuring the worst error of *correct*
paths over the property-test space (tiny models, 1-2 layers, random ranks, scalings,
masks; ``tests/test_reference.py`` re-measures it) and adding headroom; every row stays
far below the effect of a real adapter bug (a doubled scaling moves logits by O(0.1-1)).

Criterion, applied separately to image rows (``im_mask`` True) and text rows (False;
padding is never compared):

    max |got - ref|  <=  atol + rtol * max |ref|        (over all rows of that class)

The right-hand side is relative to the *scale* of the reference in that row class, not to
each element, so logits near zero do not produce meaningless huge relative errors. The
reported ``rel`` is ``max |got - ref| / max |ref|``.

Merged weights use ``weight_rtol``: max |W_merged - (W_base + s·B·A)| <= weight_rtol * max |W_base + s·B·A|
(the merge is computed in the model dtype, so two roundings can stack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    atol: float  # absolute slack on logits / module outputs
    rtol: float  # slack relative to max |reference| of the row class
    weight_rtol: float  # merged-weight slack relative to max |expected weight|
    why: str

    def allows(self, max_abs: float, scale: float) -> bool:
        return max_abs <= self.atol + self.rtol * scale

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"{self.dtype}: atol {self.atol:.0e} + rtol {self.rtol:.0e}·max|ref|"


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(
        "float32", atol=1e-5, rtol=2e-5, weight_rtol=2e-6,
        why="fp32 paths differ from the reference only by summation order (merge vs x·A·B): ~1e-7 measured",
    ),
    "bfloat16": Tolerance(
        "bfloat16", atol=2e-2, rtol=8e-2, weight_rtol=1.6e-2,
        why="8-bit mantissa: weights, activations and the merged W + ΔW each round to ~4e-3 relative; errors stack "
        "over the layers and the LM head",
    ),
    "float16": Tolerance(
        "float16", atol=3e-3, rtol=1e-2, weight_rtol=2e-3,
        why="11-bit mantissa: ~5e-4 relative per rounding, stacked as for bf16",
    ),
}


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def tolerance_for(dtype: torch.dtype | str) -> Tolerance:
    """The row of the table for ``dtype`` (KeyError names the dtypes that have a policy)."""
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance policy for {name}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[name]


def policy_table() -> str:
    """The table as Markdown, for the README and for failure reports."""
    lines = ["| dtype | atol | rtol (× max abs ref) | merged weight rtol | why |", "|---|---|---|---|---|"]
    for tol in TOLERANCES.values():
        lines.append(f"| {tol.dtype} | {tol.atol:.0e} | {tol.rtol:.0e} | {tol.weight_rtol:.0e} | {tol.why} |")
    return "\n".join(lines)
