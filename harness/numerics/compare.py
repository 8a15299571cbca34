"""Output comparison against the reference: max abs / rel error per row class, and where it is worst."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from harness.numerics.probes import ProbeBatch
from harness.numerics.tolerances import _dtype_name, policy_for, tolerance_for


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
    worst_row: tuple[str, int, int]  # (row class, batch, position) of the largest error; ("", -1, -1): none
    ok: bool
    non_finite: str | None = None  # where NaN/Inf outputs come from ("first produced by <module>"), when they occur
    cause: str | None = None  # a diagnosis of the difference, when the run found one (e.g. a re-tied LM head)
    bands: dict[str, float] | None = None  # per row class rel tolerance, when calibrated on the model (band())
    basis: str | None = None  # how the bands were calibrated, for the message

    def summary(self) -> str:
        verdict = "within" if self.ok else "OUTSIDE"
        if self.non_finite:
            text = f"{self.label}: non-finite outputs (NaN/Inf) in real rows, {self.non_finite}"
        else:
            row_class, b, t = self.worst_row
            where = f"; worst at {row_class} row batch {b} position {t}" if row_class else ""
            if self.bands:
                shown = ", ".join(f"{row} {value:.1e}" for row, value in self.bands.items())
                limit = f"{self.dtype} tolerance ({shown}{f': {self.basis}' if self.basis else ''})"
            else:
                limit = f"{self.dtype} tolerance {self.tolerance:.0e}"
            text = (f"{self.label}: image rows max abs {self.image_max_abs:.2e} (rel {self.image_max_rel:.2e}), "
                    f"text rows max abs {self.text_max_abs:.2e} (rel {self.text_max_rel:.2e}){where}; {verdict} the "
                    f"{limit}")
        return text + (f"; {self.cause}" if self.cause and not self.ok else "")

    def to_dict(self) -> dict:
        return asdict(self)


_REFERENCE_NOT_FINITE = "the outputs compared against hold NaN/Inf in real rows, so agreement cannot be judged"


def compare(outputs: torch.Tensor, reference: torch.Tensor, probe: ProbeBatch, *, dtype: torch.dtype,
            label: str, tolerance: float | dict[str, float] | None = None, non_finite: str | None = None,
            cause: str | None = None, basis: str | None = None) -> Comparison:
    """Max abs / rel error per row class (padding excluded); rel is relative to the reference's max on those rows.

    A row class passes when max abs <= max(atol, rel·scale); NaN/inf anywhere in real rows fails (``non_finite``:
    where they come from, for the message; ``cause``: a diagnosis the message adds when the comparison fails).
    ``tolerance``: None, the table's rel with its atol floor; a number, that rel and no floor; a dict, a rel per
    row class calibrated on the model (``tolerances.band``, with the atol floor; ``basis`` says how, for messages).
    """
    policy = policy_for(dtype)
    bands = tolerance if isinstance(tolerance, dict) else None
    tol = policy.rel if tolerance is None else max(bands.values()) if bands else tolerance
    if non_finite is None and not finite_rows(outputs, probe):
        non_finite = "source not located"
    if not finite_rows(reference, probe):  # an inf scale would make every error relative 0: nothing can be judged
        cause = _REFERENCE_NOT_FINITE
    diff = (outputs.float() - reference.float()).abs().amax(-1)  # [B, T]
    diff = torch.nan_to_num(diff, nan=float("inf"))
    stats = {}
    worst = ("", -1, -1)
    worst_rel = -1.0
    ok = True
    for row_class, rows in (("image", probe.image_rows.cpu()), ("text", probe.text_rows.cpu())):
        if not rows.any():
            stats[row_class] = (0.0, 0.0)
            continue
        scale = float(reference.float().abs().amax(-1)[rows].max().clamp_min(1e-12))
        masked = torch.where(rows, diff, torch.zeros_like(diff))
        max_abs = float(masked.max())
        rel = max_abs / scale
        stats[row_class] = (max_abs, rel)
        row_tol = bands.get(row_class, tol) if bands else tol
        ok = ok and max_abs <= max(policy.atol if tolerance is None or bands else 0.0, row_tol * scale)
        rel = rel if rel == rel else float("inf")  # a non-finite reference: still name where it is worst
        if rel > worst_rel:
            flat = int(masked.argmax())
            worst_rel, worst = rel, (row_class, flat // diff.shape[1], flat % diff.shape[1])
    return Comparison(
        label=label,
        dtype=_dtype_name(dtype),
        tolerance=tol,
        image_max_abs=stats["image"][0],
        image_max_rel=stats["image"][1],
        text_max_abs=stats["text"][0],
        text_max_rel=stats["text"][1],
        worst_row=worst,
        ok=ok and non_finite is None and cause != _REFERENCE_NOT_FINITE,
        non_finite=non_finite,
        cause=cause,
        bands=dict(bands) if bands else None,
        basis=basis if bands else None,
    )




def finite_rows(outputs: torch.Tensor, probe: ProbeBatch) -> bool:
    """No NaN/Inf at real (non-padding) positions of ``outputs`` [B, T, ...]."""
    real = probe.attention_mask.bool().cpu()
    return bool(torch.isfinite(outputs.float()[real]).all())


def pairwise_disagreements(outputs: dict[str, torch.Tensor], probe: ProbeBatch, *, dtype: torch.dtype,
                           bands: dict[str, float] | None = None) -> list[str]:
    """Every pair of paths compared with each other (twice the dtype tolerance, or twice the calibrated ``bands``:
    both carry rounding)."""
    problems = []
    names = list(outputs)
    doubled = {row: 2 * value for row, value in bands.items()} if bands else 2 * tolerance_for(dtype)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = compare(outputs[a], outputs[b], probe, dtype=dtype, label=f"{a} vs {b}", tolerance=doubled)
            if not pair.ok:
                problems.append(pair.summary())
    return problems
