"""The fix for each ``merged-matches`` finding, by its cause and by the model's family.

A merged ΔW off by a clean ratio names the scaling (lora_alpha, r, rsLoRA), a dtype other than the base's
names the dtypes, missing tensors name the tensors; advice about PLoRA (XComposer's own branch) is given only
for a base that has that branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

RATIO_RTOL = 1e-3  # how close a measured ΔW ratio must be to a candidate to name it


@dataclass(frozen=True)
class DeltaRatio:
    """A merged weight whose change from the base is exactly ``ratio`` times the adapter's s·B·A."""

    key: str
    ratio: float
    rank: int
    scaling: float


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RATIO_RTOL * max(abs(b), 1e-12)


def _fraction(value: float) -> Fraction | None:
    """``value`` as p/q with small p, q (1/2, 2, 3/2, ...), or None."""
    if value <= 0:
        return None
    candidate = Fraction(value).limit_denominator(8)
    return candidate if candidate.numerator <= 64 and _close(value, float(candidate)) else None


def scaling_cause(ratios: list[DeltaRatio], wrong: int, config: dict) -> str | None:
    """Why ``wrong`` adapted weights differ from W + s·B·A when ``ratios`` (the ones off by a clean factor) say."""
    if not ratios:
        return None
    rs = bool(config.get("use_rslora"))
    patterns = [name for name in ("alpha_pattern", "rank_pattern") if config.get(name)]
    first = ratios[0]
    same = all(_close(r.ratio, first.ratio) for r in ratios)
    if not same and patterns:
        return (f"ΔW is off by different factors per module ({', '.join(f'{r.ratio:.3g}x' for r in ratios[:3])}): "
                f"the merge ignored {' / '.join(patterns)} in adapter_config.json; merge with a PEFT that applies them "
                "(PeftModel.from_pretrained → merge_and_unload)")
    if not same:
        return None
    ratio, rank, scaling = first.ratio, first.rank, first.scaling
    causes = []
    if _close(ratio * scaling, 1.0) and not _close(scaling, 1.0):
        causes.append(f"the merge added B·A without the scaling s = {'lora_alpha/sqrt(r)' if rs else 'lora_alpha/r'}"
                      f" = {scaling:g}")
    if not rs and rank > 1 and _close(ratio, math.sqrt(rank)):
        causes.append(f"the merge used rsLoRA scaling (lora_alpha/sqrt(r)) but adapter_config.json has use_rslora "
                      f"false (lora_alpha/r = {scaling:g})")
    if rs and rank > 1 and _close(ratio, 1 / math.sqrt(rank)):
        causes.append("the merge used lora_alpha/r but the adapter uses rsLoRA (use_rslora true: lora_alpha/sqrt(r)); "
                      "the merging PEFT ignored use_rslora (it needs peft >= 0.7)")
    fraction = _fraction(ratio)
    if fraction is not None and fraction != 1:
        alpha = config.get("lora_alpha")
        what = ("twice" if fraction == 2 else "half" if fraction == Fraction(1, 2) else f"{fraction}x")
        implied = f" (as if lora_alpha were {float(alpha) * ratio:g}, not {alpha:g})" if isinstance(
            alpha, (int, float)) else ""
        causes.append(f"the merged ΔW is {what} the adapter's s·B·A{implied}: the merge used another lora_alpha or r "
                      "than adapter_config.json, or added ΔW more than once")
    if not causes:
        return None
    share = "every" if len(ratios) == wrong else f"{len(ratios)} of {wrong}"
    return f"{share} wrong weight is exactly {ratio:.4g}x off: " + "; or ".join(causes)


def dtype_cause(base_dtypes: set[str], merged_dtypes: set[str]) -> str | None:
    """The merged checkpoint stores floats in another dtype than the base: name both."""
    base_f = sorted(d for d in base_dtypes if "float" in d)
    merged_f = sorted(d for d in merged_dtypes if "float" in d)
    if not base_f or not merged_f or base_f == merged_f:
        return None
    return (f"the merged weights are stored as {', '.join(merged_f)}, the base's as {', '.join(base_f)}: merge in "
            f"float32 and save in the base's dtype (model.to(torch.{base_f[0]}).save_pretrained(...)); float16 "
            "overflows where bfloat16 does not, and float32 doubles the size")


def fixes(found, *, family, plora: bool, scaling: str | None, dtype: str | None, ties: list[str]) -> list[str]:
    """One fix per cause found, in the order of the problems (no advice for causes that are absent)."""
    out: list[str] = []
    if found.missing:
        branch = plora and "missing" in family.merge_advice and any(family.is_branch_param(k) for k in found.missing)
        out.append(family.merge_advice["missing"] if branch else
                   f"save the whole merged model with save_pretrained, not a filtered state dict ({len(found.missing)} "
                   f"tensor(s) missing, e.g. {found.missing[0]})")
    if found.plora_folded:
        out.append(family.merge_advice.get("folded", "merge only the adapter's ΔW: the base model's own branch must "
                                           "stay a separate module; PeftModel.merge_and_unload leaves it alone"))
    if found.unmerged:
        out.append(f"merge every adapted module (e.g. {found.unmerged[0]} was left at the base): "
                   "PeftModel.from_pretrained(base, adapter).merge_and_unload(), then save_pretrained"
                   + (family.merge_advice.get("unmerged", "") if plora else ""))
    if found.wrong_delta:
        out.append(scaling or dtype or "re-merge in float32 with PeftModel.from_pretrained(base, adapter)."
                   "merge_and_unload() (a merge into a bfloat16/float16 or quantized base rounds ΔW; DoRA needs "
                   "the magnitude renormalisation)")
    if found.copies_dropped or found.copies_wrong:
        out.append("write the trained modules_to_save copies into the merged model (merge_and_unload does; a hand "
                   "merge must copy them)")
    if found.tokens_dropped or found.tokens_wrong:
        out.append("write the trained token rows into the embedding (merge_and_unload does; a hand merge must copy "
                   "exactly those rows)")
    if ties:
        out.append("save the tied pair untied (tie_word_embeddings: false and a separate weight for each)")
    if found.changed:
        out.append(dtype or f"leave every tensor the adapter does not touch at the base's value (e.g. "
                            f"{found.changed[0]}); check that --base-model is the base the merge was made from")
    if found.unexpected:
        out.append(f"remove tensors the base does not have (e.g. {found.unexpected[0]}), or check that --base-model is "
                   "the base the merge was made from")
    if dtype and dtype not in out:
        out.append(dtype)
    return out

