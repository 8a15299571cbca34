"""Quantized bases and QLoRA: the merge gap users never see, and merges into weights that cannot take them.

The measurements live in ``harness.checks.measure.qlora`` (outputs) and ``measure.quantized_merge``
(weights); these functions only judge them. ``packed_reason`` is what the other groups' checks say when a
base or merged checkpoint stores packed quantized weights they cannot read as weights.
"""

from __future__ import annotations

from pathlib import Path

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.model.quantization import Quantization, packs_weights, read_quantization

PREREQUISITES = ("config-valid", "weights-readable", "unsafe-pickle", "empty-tensors")
DEQUANT_MERGE_FIX = ("merge into the dequantized base: load the base quantized as in training, call "
                     "model.dequantize() (transformers), then PeftModel.from_pretrained(...).merge_and_unload() and "
                     "save that; or evaluate the 16-bit merge itself before releasing it")


def declared_quantization(ctx: CheckContext, directory: Path | None) -> Quantization | None:
    """The quantization ``directory`` declares, read once per run."""
    if directory is None:
        return None
    return ctx.cached(f"quantized.declared:{directory}", lambda: read_quantization(directory))


def packed_reason(ctx: CheckContext, what: str) -> str | None:
    """Why a check that reads the base's (and merged checkpoint's) tensors as weights cannot run: one of them is
    saved quantized. ``what``: what that check would have done. None when neither is."""
    for role, directory in (("base", ctx.base.base_dir if ctx.base is not None else None), ("merged checkpoint", ctx.merged)):
        q = declared_quantization(ctx, directory)
        if packs_weights(q):
            return (f"the {role} {directory} is saved quantized ({q.scheme}, {q.method}): its checkpoint holds packed "
                    f"integers and scales, not weights, so {what} cannot be checked on it; qlora-merge-gap and "
                    "merged-quantized measure a quantized base and its merges instead")
    return None


def _blocked(ctx: CheckContext) -> str | None:
    if ctx.base is None:
        return "no --base-model given"
    if ctx.adapter is None:
        return "the adapter could not be read (see the static checks)"
    blocked = [c for c in ctx.failed_prerequisites if c in PREREQUISITES]
    if blocked:
        return f"the adapter cannot be loaded until {', '.join(blocked)} pass(es)"
    return None


def check_qlora_merge_gap(ctx: CheckContext):
    from harness.checks.measure.qlora import DEQUANT, GIVEN, MERGE_GAP_LIMIT, SHIPPED16, measure_qlora_gap

    blocked = _blocked(ctx)
    if blocked:
        return skipped(blocked)
    measured = ctx.cached("quantized.qlora_gap", lambda: measure_qlora_gap(
        ctx.base.base_dir, ctx.adapter.root, ctx.merged, trained_on_choice=ctx.options.trained_on_quantized,
        progress=ctx.say))
    if measured.skipped:
        return skipped(measured.skipped)
    for note in measured.notes:
        ctx.note(f"qlora-merge-gap: {note}")
    details = {"quantization": measured.quantization.describe(), "limit_fraction_of_effect": MERGE_GAP_LIMIT,
               "effect": measured.effect, "given_is": measured.given_is,
               **{name: {"per_row_class": gap.per_class, "fraction_of_effect": round(gap.fraction, 4)}
                  for name, gap in measured.gaps.items()}}
    effect = max(measured.effect.values())
    merges = "; ".join(g.describe() for name, g in measured.gaps.items() if name != GIVEN)
    head = f"on the {measured.quantization.scheme} base the adapter's effect is {effect:.3g}; {merges}"
    given = measured.gaps.get(GIVEN)
    if given is not None:
        which = {"neither": "neither the 16-bit nor the dequantized merge", SHIPPED16: f"the {SHIPPED16}",
                 DEQUANT: f"the {DEQUANT}"}.get(measured.given_is, measured.given_is)
        text = f"{head}; the given --merged {ctx.merged} is {which}, {given.value:.3g} from what was evaluated " \
               f"({given.fraction:.2f}x the effect)"
        if given.fraction > MERGE_GAP_LIMIT:
            return failed(f"{text}: more than {MERGE_GAP_LIMIT}x the effect, so the released model is not the one "
                          "that was evaluated", **details)
        return passed(text, **details)
    shipped = measured.gaps.get(SHIPPED16)
    if shipped is not None and shipped.fraction > MERGE_GAP_LIMIT:
        return warned(f"{head}: the 16-bit merge users ship would differ from what was evaluated by more than "
                      f"{MERGE_GAP_LIMIT}x the effect (no --merged given to judge)", **details)
    return passed(head, **details)


register(
    id="qlora-merge-gap",
    group="quantized",
    summary="a QLoRA adapter's released merge differing from the quantized base + LoRA it was evaluated as: the "
    "16-bit merge users ship against the merge into the dequantized weights, judged against the adapter's effect",
    why="QLoRA learns ΔW against dequant(W_q); folding it into the 16-bit W adds W − dequant(W_q) in every layer, "
    "often as large as the adapter's own effect, and nothing in the usual release flow measures it",
    fix=DEQUANT_MERGE_FIX,
)(check_qlora_merge_gap)


def check_merged_quantization(ctx: CheckContext):
    if ctx.merged is None:
        return skipped("no --merged given")
    q = declared_quantization(ctx, ctx.merged)
    config = ctx.merged / "config.json"
    if q is None:
        return passed(f"{config} declares no quantization: a plain merged checkpoint")
    if not q.is_bitsandbytes:
        return failed(f"{config}: declares a {q.scheme} quantization_config, so a LoRA merge cannot have been "
                      f"written into it ({q.method} stores packed integers that merge_and_unload cannot add ΔW to, "
                      "and a checkpoint that claims it while holding merged float weights does not load)",
                      fix=f"merge the adapter into the 16-bit base the {q.method} model was made from, then quantize "
                      f"the merged model with {q.method} again; or ship the adapter beside the quantized base",
                      quantization=q.describe())
    if not q.four_bit:
        return skipped(f"{config} declares bitsandbytes int8: a merge into int8 weights is not measured "
                       "(4-bit only)")
    blocked = _blocked(ctx)
    if blocked:
        return skipped(blocked)
    from harness.model.quantization import bnb_unavailable_reason

    reason = bnb_unavailable_reason()
    if reason is not None:
        return skipped(f"{config} declares bitsandbytes {q.scheme} and {reason}")
    from harness.checks.measure.quantized_merge import REQUANT_MISMATCH, measure_quantized_merge

    ctx.say("merged-quantized: comparing the 4-bit merged weights with requant(dequant(W) + ΔW)")
    found = ctx.cached("quantized.merge", lambda: measure_quantized_merge(ctx.base.base_dir, ctx.adapter.root,
                                                                          ctx.merged, q))
    details = {"quantization": q.describe(), "modules": found.modules, "mismatched": found.mismatched,
               "delta_lost": round(found.lost, 4)}
    weights = ctx.merged / "model.safetensors"
    if found.error:
        return failed(f"{weights}: the 4-bit merged checkpoint could not be compared with base + adapter: "
                      f"{found.error}", **details)
    if found.mismatched:
        name, share = next(iter(found.mismatched.items()))
        return failed(f"{weights}: {len(found.mismatched)} of {found.modules} adapted 4-bit weight(s) are not what "
                      f"dequant(W) + ΔW requantizes to (e.g. {name}: {share:.0%} of its elements differ, more than "
                      f"{REQUANT_MISMATCH:.0%}): not a merge of this adapter into this base",
                      fix="re-merge into the 16-bit or dequantized base from the base and adapter you checked, and "
                      "quantize the merged model afterwards if you must ship 4 bits", **details)
    if found.lost > 0.5:
        return failed(f"{weights}: merge_and_unload into packed {q.scheme} weights requantized dequant(W) + ΔW and "
                      f"lost {found.lost:.0%} of ΔW (‖merged − (dequant(W) + ΔW)‖ / ‖ΔW‖ over {found.modules} "
                      "adapted weights): the saved model is close to the base, not base + adapter", **details)
    return passed(f"{weights}: {q.scheme} merge equals requant(dequant(W) + ΔW) in {found.modules} weights and kept "
                  f"ΔW within {found.lost:.0%}", **details)


register(
    id="merged-quantized",
    group="quantized",
    summary="merges that cannot work: a merged checkpoint claiming a GPTQ/AWQ (packed integer) quantization, a "
    "merge_and_unload into packed 4-bit weights that rounded ΔW away, a 4-bit merged directory that is not "
    "requant(dequant(W) + ΔW)",
    why="a LoRA cannot be written into GPTQ/AWQ integers without re-running the quantizer; a merge into bitsandbytes "
    "4-bit weights requantizes dequant(W) + ΔW and a fine-tune's ΔW is mostly below one 4-bit step",
    fix="merge into the 16-bit (or dequantized) base and quantize the merged model afterwards if needed, or ship "
    "the adapter beside the quantized base",
)(check_merged_quantization)
