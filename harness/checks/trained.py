"""Checks run at the end of training: is the saved adapter the model that was trained?

``trained-vs-shipped`` reloads base + saved adapter and compares outputs with the in-memory trained
model; ``trained-params-saved`` names every parameter that training could change or did change but
that the adapter file does not carry. Both read ``harness.checks.measure.training_audit.audit_trained`` (computed once).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned

if TYPE_CHECKING:
    from harness.checks.measure.training_audit import ParamFinding, TrainedAudit

_KIND_WORDS = {  # a model family's branch kinds come with their own words (ModelFamily.branch_kind_labels)
    "projector": "projector (vision_proj)",
    "vision": "vision tower",
    "language": "language model",
    "other": "other",
}
_SAVE_FIX = ("add the module to LoraConfig(modules_to_save=[...]) so save_pretrained ships it (the official recipe "
             "unfreezes vision_proj without it), or freeze it before training")


def _audit(ctx: CheckContext) -> TrainedAudit:
    from harness.checks.measure.training_audit import audit_trained

    trained = ctx.trained
    return ctx.cached("trained.audit", lambda: audit_trained(
        trained.model, trained.saved_dir, trained.base_dir, adapter_name=trained.adapter_name,
        dtype=trained.dtype, device=ctx.options.device), name="reloading base + saved adapter, auditing parameters")


def _by_kind(findings: list[ParamFinding], family) -> str:
    counts = Counter(f.kind for f in findings)
    words = {**_KIND_WORDS, **family.branch_kind_labels}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in counts.most_common())


def _fix_for(findings: list[ParamFinding], family) -> str:
    kinds = {f.kind for f in findings}
    branch = set(family.branch_kind_labels)
    fixes = ([family.training_fix] if kinds & branch else []) + ([_SAVE_FIX] if kinds - branch else [])
    return "; ".join(fixes)


def check_trained_vs_shipped(ctx: CheckContext):
    audit = _audit(ctx)
    if audit.reload_error:
        if audit.base_dir is None:
            return skipped(audit.reload_error)
        return failed(f"base + saved adapter could not be reloaded with {audit.reload_path}: {audit.reload_error}",
                      fix="fix the saved directory so PeftModel.from_pretrained loads it (see the static checks)")
    comparison = audit.comparison
    details = {"comparison": comparison.to_dict(), "not_saved": [f.name for f in audit.not_saved],
               "weight_mismatches": [{"name": n, "max_abs": d} for n, d in audit.weight_mismatches]}
    tolerance = comparison.tolerance
    off = [(n, d) for n, d in audit.weight_mismatches if d > tolerance * 1e-2]  # beyond dtype rounding of a reload
    if comparison.ok and off:
        name, worst = max(off, key=lambda item: item[1])
        return failed(
            f"outputs agree on the probe ({comparison.summary()}) but {len(off)} parameter(s) of the reloaded model "
            f"differ from the trained ones, e.g. {name} (max abs {worst:.2e}): the probe does not reach them, "
            "users' inputs will",
            fix=_fix_for(audit.not_saved, audit.family) or None, **details)
    if not comparison.ok:
        cause = ""
        if audit.changed_not_saved:
            cause = (f"; {len(audit.changed_not_saved)} parameter(s) changed in training are not in the adapter "
                     f"({_by_kind(audit.changed_not_saved, audit.family)}, e.g. {audit.changed_not_saved[0].name})")
        return failed(f"the saved adapter does not reproduce the trained model: {comparison.summary()}{cause}",
                      fix=_fix_for(audit.changed_not_saved, audit.family) or None, **details)
    return passed(f"base + saved adapter reproduce the trained model: {comparison.summary()}", **details)


register(
    id="trained-vs-shipped",
    group="trained",
    summary="the saved adapter, reloaded on a fresh base, does not reproduce the trained model's outputs (weights "
    "trained but not saved, a save under ZeRO-3 without gathering, a wrong adapter name or config)",
    why="the model evaluated at the end of training is not the one users get; nothing in PEFT reports it",
    fix="save every trained weight in the adapter (modules_to_save for full modules; freeze PLoRA on peft <= 0.20) "
    "and reload-test the directory before shipping",
)(check_trained_vs_shipped)


def check_trained_params_saved(ctx: CheckContext):
    audit = _audit(ctx)
    details = {
        "changed_not_saved": [{"name": f.name, "max_abs_change": f.max_abs_change, "kind": f.kind}
                              for f in audit.changed_not_saved],
        "trainable_not_saved": [f.name for f in audit.trainable_not_saved],
        "trainable": audit.trainable_count, "compared_with_base": audit.compared_count,
        "base_dir": str(audit.base_dir) if audit.base_dir else None,
    }
    changed = audit.changed_not_saved
    if changed:
        worst = max(changed, key=lambda f: f.max_abs_change or 0.0)
        idle = [f for f in audit.trainable_not_saved if not f.changed]
        more = f"; {len(idle)} more trainable but unchanged so far: {_by_kind(idle, audit.family)}" if idle else ""
        return failed(
            f"{len(changed)} parameter(s) changed during training but are not in the adapter: {_by_kind(changed, audit.family)} "
            f"(e.g. {worst.name}, max change {worst.max_abs_change:.2e}){more}",
            fix=_fix_for(audit.not_saved, audit.family), **details)
    loose = audit.trainable_not_saved
    if loose:
        head = f"{len(loose)} trainable parameter(s) are not in the adapter: {_by_kind(loose, audit.family)} (e.g. {loose[0].name})"
        if audit.base_dir is None:  # cannot tell whether they moved: assume the worst
            return failed(f"{head}; no base files to tell whether training changed them", fix=_fix_for(loose, audit.family),
                          **details)
        return warned(f"{head}; unchanged so far, but more training would lose their updates", fix=_fix_for(loose, audit.family),
                      **details)
    scope = f", {audit.compared_count} base parameters unchanged" if audit.base_dir else ""
    return passed(f"all {audit.trainable_count} trainable parameters are in the adapter{scope}", **details)


register(
    id="trained-params-saved",
    group="trained",
    summary="parameters that were trainable or changed during training (compared with the base files) but are not "
    "in the saved adapter: PLoRA weights and plora_*_GN trained through the 'lora_' name collision of "
    "peft <= 0.20, a vision_proj unfrozen without modules_to_save",
    why="save_pretrained writes only the adapter's own weights: anything else the optimiser moved is silently lost",
    fix="freeze what should not train; list modules that should in modules_to_save",
)(check_trained_params_saved)
