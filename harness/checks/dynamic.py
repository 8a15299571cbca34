"""Dynamic checks: load base + adapter through every path and compare with the fp32 reference.

All heavy lifting lives in ``harness.checks.measure.dynamic_run.DynamicRun`` (one per context, cached);
these functions only judge its outcomes, so each check is a few lines to read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.numerics.tolerances import EFFECT_FLOOR, resolution_floor

if TYPE_CHECKING:
    from harness.checks.measure.dynamic_run import DynamicRun
    from harness.report import CheckResult

# A check that needs these to have passed cannot say anything useful when they failed.
PREREQUISITES = ("config-valid", "weights-readable", "unsafe-pickle", "empty-tensors")


@dataclass(frozen=True)
class Unavailable:
    """Why no dynamic run exists: a skip (missing input, blocked) or a failure (the base does not load)."""

    reason: str
    is_failure: bool = False
    fix: str | None = None  # None: the base does not load on its own (the usual cause of a failure)


def dynamic_run(ctx: CheckContext) -> DynamicRun | Unavailable:
    """The shared run, or why none can be made."""
    if ctx.base is None:
        return Unavailable("no --base-model given")
    blocked = [c for c in ctx.failed_prerequisites if c in PREREQUISITES]
    if blocked:
        return Unavailable(f"the adapter cannot be loaded until {', '.join(blocked)} pass(es)")
    from harness.checks.quantized import packed_reason

    if reason := packed_reason(ctx, "the loading paths' outputs against the fp32 reference read from its weights"):
        return Unavailable(reason)

    def start() -> DynamicRun:
        from harness.checks.measure.dynamic_run import DynamicRun

        run = DynamicRun(ctx.base.base_dir, ctx.adapter.root, dtype=ctx.options.dtype, device=ctx.options.device,
                         progress=ctx.say, init_buffers=ctx.base.init_buffers)
        ctx.cleanup.callback(run.close)
        return run

    run = ctx.cached("dynamic.run", start, name="the probes, fp32 reference and dtype noise on the base")
    if run.load_error:
        return Unavailable(f"the base model cannot be checked: {run.load_error}", is_failure=True)
    return run


def depth_slices(ctx: CheckContext) -> list | None | Unavailable:
    """The layers of each depth slice the dynamic checks run on when the base does not fit the memory budget
    (None: it fits, or the run over the whole base already exists). Slices are written only when their turn
    comes (``_slice_results``), so at most one is on disk."""
    if ctx.base is None or "dynamic.run" in ctx.cache:
        return None

    def plan():
        from harness.inputs.adapter_dir import read_adapter_tensors
        from harness.loading.slices import (
            SlicePlanError,
            adapted_layers,
            available_bytes,
            layer_layout,
            needed_bytes,
            plan_slices,
            run_dtypes,
            temporary_disk_free,
        )

        budget = ctx.options.max_memory or available_bytes(ctx.options.device)
        dtype, stored = run_dtypes(ctx.base, ctx.options.dtype)
        layout = layer_layout(ctx.base)
        if ctx.options.layers is not None:
            chosen = asked_slice(ctx.options.layers, layout)
            if isinstance(chosen, Unavailable) or chosen is None:
                return chosen
            ctx.note(f"the dynamic checks ran on the depth slice of layers {chosen[0][0]}-{chosen[0][-1]} only, as "
                     f"asked (layers=); the other layers' units check the rest (README, Depth slices)")
            return chosen
        try:
            adapted = adapted_layers(list(read_adapter_tensors(ctx.adapter.root)), layout) if layout else set()
            chosen = plan_slices(ctx.base, dtype, budget, adapted, disk=temporary_disk_free(), stored=stored)
        except SlicePlanError as err:
            return Unavailable(f"the base needs {needed_bytes(ctx.base, dtype) / 2**30:.1f} GiB in {dtype} for "
                               f"the dynamic checks and the memory budget is {budget / 2**30:.1f} GiB; depth "
                               f"slices cannot help: {err}", is_failure=True, fix=err.fix)
        if chosen is not None:
            ctx.note(f"the base needs {needed_bytes(ctx.base, dtype) / 2**30:.1f} GiB in {dtype} and the memory "
                     f"budget is {budget / 2**30:.1f} GiB ({temporary_disk_free() / 2**30:.1f} GiB of temporary disk "
                     f"free): the dynamic checks ran on {len(chosen)} depth slice(s) of {len(chosen[0])} layer(s) "
                     "covering every layer the adapter touches (README, Depth slices)")
        return chosen

    return ctx.cached("dynamic.slices", plan)


def asked_slice(layers: tuple[int, ...], layout) -> list[tuple[int, ...]] | None | Unavailable:
    """The one slice ``layers=`` asks for (None: it is the whole model), or why it cannot be cut."""
    if layout is None:
        return Unavailable(f"layers {layers[0]}-{layers[-1]} were asked for, but the base has no decoder layer list to "
                           "slice by depth", is_failure=True, fix="run without layers= (the whole model)")
    if layers[-1] >= layout.count:
        return Unavailable(f"layers {layers[0]}-{layers[-1]} were asked for, but the base has {layout.count} decoder "
                           f"layers (0-{layout.count - 1})", is_failure=True,
                           fix=f"ask for layers within 0-{layout.count - 1}")
    return None if len(layers) == layout.count else [tuple(layers)]


def _slice_results(ctx: CheckContext, chosen: list[tuple[int, ...]], check_id: str) -> list:
    """``check_id``'s result on every slice, as (DepthSlice, CheckResult) pairs. Slice by slice, not check by
    check: each slice is written, every planned dynamic check runs on it, its run is closed and its directory
    removed before the next, so memory and disk hold one slice at a time whatever the depth."""
    import contextlib
    import dataclasses
    import tempfile

    from harness.checks.registry import checks, get_check, run_check
    from harness.inputs.adapter_dir import read_adapter
    from harness.loading.slices import write_slice
    from harness.model.structure import inspect_base

    done: dict[str, list] = ctx.cache.setdefault("dynamic.slice_results", {})
    if check_id in done:
        return done[check_id]
    ids = [c.id for c in checks("dynamic") if (c.id in ctx.planned or c.id == check_id) and c.id not in done]
    for layers in chosen:
        first, last = layers[0], layers[-1]
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="plora-harness-slice-")))
            if problem := _disk_problem(ctx, layers, workdir):
                return _all_failed(done, ids, chosen, problem)
            ctx.say(f"writing the depth slice of layers {first}-{last}")
            depth_slice = write_slice(ctx.base, ctx.adapter.root, layers, workdir / f"layers-{first}")
            sliced = dataclasses.replace(ctx, base=inspect_base(depth_slice.base_dir),
                                         adapter=read_adapter(depth_slice.adapter_dir),
                                         cache=slice_cache(depth_slice),
                                         cleanup=stack.enter_context(contextlib.ExitStack()))
            for each in ids:
                body = _body_of(get_check(each).func)  # the check itself, not the slicing wrapper
                result = run_check(dataclasses.replace(get_check(each), func=lambda c, b=body: _releasing(b, c)),
                                   sliced)
                done.setdefault(each, []).append((depth_slice, result))
    return done[check_id]


def slice_cache(depth_slice) -> dict:
    """The memo a slice's checks start from: empty, so the slice's own run is measured (a test hands recorded runs
    in here instead of loading models: tests/test_dynamic_verdicts.py)."""
    return {}


def _disk_problem(ctx: CheckContext, layers: tuple[int, ...], workdir: Path) -> str | None:
    """The slice and the merge script's saved copy of it must fit the temporary disk (it was planned so, but the
    disk is shared): refuse in one line rather than fail deep inside a save."""
    import shutil

    from harness.loading.slices import disk_bytes, layer_layout, run_dtypes

    needed = disk_bytes(ctx.base, *run_dtypes(ctx.base, ctx.options.dtype), len(layers), layer_layout(ctx.base))
    free = shutil.disk_usage(workdir).free
    if free >= needed:
        return None
    return (f"the depth slice of layers {layers[0]}-{layers[-1]} needs about {needed / 2**30:.1f} GiB of temporary "
            f"disk and {workdir.parent} has {free / 2**30:.1f} GiB free")


def _all_failed(done: dict, ids: list[str], chosen: list, problem: str) -> list:
    from harness.loading.slices import DepthSlice

    for each in ids:
        done[each] = [(DepthSlice(chosen[0], Path(), Path()), failed(
            problem, fix="point TMPDIR at a disk with room (or pass a smaller --max-memory for smaller slices)"))]
    return done[ids[0]]


def over_depth_slices(body):
    """Run a dynamic check on the whole base, or on each depth slice when the base does not fit the budget; the
    verdict is the worst slice's, and says which layers it rests on."""

    @functools.wraps(body)
    def check(ctx: CheckContext):
        slices = depth_slices(ctx)
        if isinstance(slices, Unavailable):
            return _unavailable(slices)
        if not slices:
            return _releasing(body, ctx)
        return combine_slices(_slice_results(ctx, slices, _check_id_of(body)))

    return check


def _check_id_of(body) -> str:
    """The registered id of the check whose body is ``body`` (registered wrapped or not)."""
    from harness.checks.registry import REGISTRY

    return next(c.id for c in REGISTRY.values() if _body_of(c.func) is body)


def _body_of(func):
    return getattr(func, "__wrapped__", func)


def _releasing(body, ctx: CheckContext):
    """``body(ctx)``, then the base kept for the peft path is let go when the check did not use it (so the next
    slice's run, or a path that loads on its own, never meets a second model in memory)."""
    try:
        return body(ctx)
    finally:
        run = ctx.cache.get("dynamic.run")
        if hasattr(run, "release_pristine"):
            run.release_pristine()


def combine_slices(results: list) -> CheckResult:
    """One verdict from per-slice results: fail if any slice fails (naming its layers), else warn, else pass."""
    order = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}
    worst_slice, worst = min(results, key=lambda pair: order.get(pair[1].status, 0))
    labels = ", ".join(s.label for s, _ in results)
    details = {"depth_slices": {s.label: {"status": r.status, "message": r.message, **r.details} for s, r in results}}
    others = sum(1 for _, r in results if r.status == worst.status) - 1
    more = f" (+{others} more slice(s) {worst.status})" if others > 0 and worst.status in ("fail", "warn") else ""
    if worst.status == "fail":
        return failed(f"{worst_slice.label}: {worst.message}{more}", fix=worst.fix, **details)
    if worst.status == "warn":
        return warned(f"{worst_slice.label}: {worst.message}{more}", fix=worst.fix, **details)
    if worst.status == "skip":
        return skipped(worst.message, **details)
    if len(results) > 1:  # the figures of one slice: the one with the largest error where checks give one
        shown_slice, shown = max(((s, r) for s, r in results if r.status == "pass"),
                                 key=lambda pair: pair[1].details.get("max_rel", -1.0))
        return passed(f"on {len(results)} depth slice(s) ({labels}): {shown.message} (figures from "
                      f"{shown_slice.label})", **details)
    return passed(f"on {len(results)} depth slice(s) ({labels}): {worst.message}", **details)


def _unavailable(why: Unavailable):
    if why.is_failure:
        return failed(why.reason, fix=why.fix or "make the base directory load on its own first: the message names the file "
                      "and line in its code; AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) shows "
                      "the full traceback")
    return skipped(why.reason)


def check_key_coverage(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    outcome = run.outcome("peft")
    details = {"raw_load_state_dict": run.raw_load.message if run.raw_load else None}
    if outcome.error:
        return failed(f"PeftModel.from_pretrained failed: {outcome.error}", **details)
    record = outcome.record
    details.update(missing=record.missing_keys[:10], unexpected=record.unexpected_keys[:10],
                   not_loaded=record.not_loaded[:10], warnings=record.warnings[:10])
    if not record.clean:
        return failed(f"after PeftModel.from_pretrained: {len(record.missing_keys)} missing, "
                      f"{len(record.unexpected_keys)} unexpected, {len(record.not_loaded)} not loaded adapter keys "
                      f"(e.g. {(record.missing_keys + record.unexpected_keys + record.not_loaded)[0]})", **details)
    return passed("every saved adapter key loads into its LoRA layer (0 missing, 0 unexpected)", **details)


register(
    id="key-coverage",
    group="dynamic",
    summary="adapter keys that PEFT drops or leaves unfilled when loading (missing, unexpected or not loaded)",
    why="PEFT loads with strict=False: unexpected keys are silent and missing ones only warn, so a LoRA layer "
    "can stay at its initialisation while everything looks fine",
    fix="save with peft_model.save_pretrained() and load with PeftModel.from_pretrained(); do not rename keys or "
    "use model.load_state_dict() on an adapter file",
)(over_depth_slices(check_key_coverage))


def check_effect(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    if run.non_finite:  # an effect of NaN is no effect to measure: say where the NaN/Inf come from
        return failed(run.non_finite, fix="see finite for NaN/Inf adapter tensors; retrain or take an earlier "
                      "checkpoint", non_finite=run.non_finite)

    def relative_effect(base, adapted, rows) -> float:
        if not rows.any():
            return 0.0
        diff = (adapted - base).abs().amax(-1)[rows].max()
        return float(diff / base.abs().amax(-1)[rows].max().clamp_min(1e-12))

    # Image rows from the mixed probe; text rows from a probe with no image rows at all, so that
    # text positions cannot pick the adapter up through attention to image positions.
    effects = {
        "image": relative_effect(run.base_logits, run.reference_logits, run.probe.image_rows),
        "text": relative_effect(run.text_base_logits, run.text_reference_logits, run.text_probe.text_rows),
    }
    details = {"relative_effect": effects, "floor": EFFECT_FLOOR, "dtype_tolerance": run.tolerance,
               "dtype_noise": run.noise, "dtype": run.dtype_name}
    weak = [row for row, value in effects.items() if value < EFFECT_FLOOR]
    if weak:
        hint = ("; an adapter acting only through PLoRA's image branch (LoRA on Plora_A/Plora_B) never changes text "
                "tokens" if weak == ["text"] else "")
        return failed(f"the adapter has no measurable effect on {' and '.join(weak)} rows "
                      f"(relative change image {effects['image']:.1e}, text {effects['text']:.1e}){hint}", **details)
    # what rounding alone does at this dtype on this model: an effect not clearly above it cannot be resolved
    resolvable = {row: resolution_floor(run.dtype, run.noise[row]) for row in effects}
    unresolved = [row for row, value in effects.items() if value < 2 * resolvable[row]]
    if unresolved:
        row = min(unresolved, key=lambda r: effects[r] / resolvable[r])
        if run.dtype_name != "float32":
            return warned(f"the adapter's effect on {row} rows ({effects[row]:.1e}) is within what {run.dtype_name} "
                          f"rounding does to this model ({resolvable[row]:.1e}: the base in {run.dtype_name} against "
                          f"fp32 differs by {run.noise[row]:.1e}): mis-merges of that size cannot be told from "
                          "rounding at this dtype", fix="rerun with --dtype float32, which resolves it", **details)
        return warned(f"the adapter's effect ({effects[row]:.1e}) is close to the float32 tolerance "
                      f"({resolvable[row]:.0e}): mis-merges of that size cannot be told from rounding",
                      fix="check lora_alpha / r and that training updated the LoRA weights: the effect is at the "
                      "level of fp32 summation noise", **details)
    return passed(f"the adapter changes outputs by {effects['image']:.1e} on image rows and {effects['text']:.1e} "
                  "on text rows (relative)", **details)


register(
    id="effect",
    group="dynamic",
    summary="an adapter that changes nothing measurable on image rows or on text rows",
    why="an adapter with no effect (nothing matched, LoRA only inside PLoRA, zero-scaled) passes every loading "
    "test while doing nothing; text rows see the LoRA only when it sits outside PLoRA's image-only branch",
    fix="check target_modules and lora_alpha; targets inside Plora_A/Plora_B never act on text tokens",
)(over_depth_slices(check_effect))


def _calibration(run: DynamicRun) -> dict:
    """The numbers every output verdict rests on (README, Tolerance policy)."""
    return {"dtype": run.dtype_name, "noise": run.noise, "effect": run.effect, "bands": run.bands,
            "basis": run.basis, "reference": run.reference_mode}


def _path_problem(outcome) -> str | None:
    if outcome.error:
        return f"{outcome.name} failed to load: {outcome.error}"
    if not outcome.comparison.ok:
        return outcome.comparison.summary()
    return None


def check_merge_equivalence(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    from harness.loading.paths import merging_in_memory

    outcomes = [run.outcome(name) for name in ("peft", *merging_in_memory())]
    problems = [p for p in map(_path_problem, outcomes) if p]
    details = {o.name: (o.comparison.to_dict() if o.comparison else o.error) for o in outcomes}
    wrappers = sorted({w for o in outcomes[1:] for w in o.unmerged_wrappers})
    if wrappers:
        problems.insert(0, f"merge_and_unload left {len(wrappers)} LoRA wrapper(s) unmerged, e.g. {wrappers[0]}")
        details["unmerged_wrappers"] = wrappers[:10]
    if not any(o.error or o.non_finite for o in outcomes):  # NaN/Inf outputs are reported per path above
        from harness.numerics.compare import compare

        # per row class, padding excluded, as every output comparison (a text-row gap is not measured against
        # the image rows' larger scale)
        between = compare(outcomes[1].logits, outcomes[0].logits, run.probe, dtype=run.dtype,
                          label=f"{outcomes[1].name} vs peft", tolerance=run.bands, basis=run.basis)
        rel = max(between.image_max_rel, between.text_max_rel)
        details["merged_vs_unmerged_rel"] = rel
        if not between.ok:
            row_class, b, t = between.worst_row
            problems.append(f"merged and unmerged outputs differ by {rel:.2e} (tolerance {run.tolerance:.1e}: "
                            f"{run.basis}; worst at {row_class} row batch {b} position {t})")
    if problems and (ctx.adapter.config or {}).get("use_dora") and run.base_plora:
        problems[0] += ("; DoRA's magnitude rescales the whole PLoRA output (image branch included) when unmerged "
                        "but only the base weight when merged, so the two cannot agree on image rows")
    if problems:
        return failed(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""), **details)
    worst = max(max(o.comparison.image_max_rel, o.comparison.text_max_rel) for o in outcomes)
    details["calibration"], details["max_rel"] = _calibration(run), worst
    return passed(f"unmerged, merged and safe-merged match the fp32 reference (max rel {worst:.1e}, "
                  f"{run.dtype_name} tolerance {run.tolerance:.1e})", **details)


register(
    id="merge-equivalence",
    group="dynamic",
    summary="merged outputs (merge_and_unload, safe_merge) that differ from unmerged ones or from the fp32 reference, "
    "and LoRA wrappers that merge_and_unload leaves in place",
    why="users test the unmerged adapter and ship the merged model; dropout, rsLoRA / rank_pattern / alpha_pattern "
    "scaling, DoRA or LoRA on Plora_* make the two differ",
    fix="merge in fp32 (then cast), keep targets outside Plora_A/Plora_B, and use the PEFT version that trained "
    "the adapter",
)(over_depth_slices(check_merge_equivalence))


def check_reload_roundtrip(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    outcome = run.outcome("merge-script")
    if outcome.error:
        return failed(f"the merge script path failed: {outcome.error}")
    record = outcome.record
    details = {"missing_on_reload": record.missing_keys[:10], "unexpected_on_reload": record.unexpected_keys[:10],
               "comparison": outcome.comparison.to_dict(), "files": record.files_used}
    if record.missing_keys:
        return failed(f"the reloaded merged checkpoint lacks {len(record.missing_keys)} tensor(s), re-initialised on "
                      f"load, e.g. {record.missing_keys[0]}", **details)
    if record.unexpected_keys:
        return failed(f"the merged checkpoint has {len(record.unexpected_keys)} tensor(s) the model does not use, "
                      f"e.g. {record.unexpected_keys[0]}", **details)
    if not outcome.comparison.ok:
        return failed(outcome.comparison.summary(), **details)
    details["max_rel"] = max(outcome.comparison.image_max_rel, outcome.comparison.text_max_rel)
    return passed(f"merged → saved → reloaded: no missing or unexpected tensors, outputs match "
                  f"(max rel {details['max_rel']:.1e})", **details)


register(
    id="reload-roundtrip",
    group="dynamic",
    summary="the official merge script's output (merge, save_pretrained, fresh trust_remote_code load) that loses "
    "or re-initialises weights or answers differently",
    why="a merged checkpoint that lacks a tensor (e.g. Plora_A.weight after LoRA on Plora_A) reloads with fresh "
    "random values and no error",
    fix="merge with PeftModel.from_pretrained → merge_and_unload → save_pretrained and copy the base's *.py and "
    "tokenizer files; keep targets outside PLoRA",
)(over_depth_slices(check_reload_roundtrip))


def check_plora_preserved(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    if not run.base_plora:
        return skipped("the base model has no PLoRA weights")
    from harness.loading.paths import merging

    outcomes = [run.outcome(name) for name in merging()]
    changed = sorted({p for o in outcomes for p in o.plora_changed})
    classes = sorted({c for o in outcomes for c in o.class_changes})
    details = {"plora_changed": changed[:10], "class_changes": classes[:10], "plora_tensors": len(run.base_plora),
               "paths": [o.name for o in outcomes]}
    if errors := [o for o in outcomes if o.error]:
        return failed(f"{errors[0].name} failed to load: {errors[0].error}", **details)
    if changed:
        return failed(f"{len(changed)} PLoRA tensor(s) differ from the base after merging, e.g. {changed[0]}", **details)
    if classes:
        return failed(f"{len(classes)} PLoRA module(s) are not the original class after merging: {classes[0]}",
                      **details)
    return passed(f"all {len(run.base_plora)} PLoRA tensors bit-identical to the base after every merge; "
                  f"{len(run.base_classes)} PLoRA modules keep their class", **details)


register(
    id="plora-preserved",
    group="dynamic",
    summary="a merge that changes PLoRA's own weights (Plora_A/B, plora_*_GN) or leaves PLoRA modules replaced",
    why="PLoRA is the base model's image-only branch: the LoRA merge must fold into the base weight only and give "
    "back the original PLoRA modules, or image tokens are processed differently",
    fix="target the PLoRA modules (attention.wqkv, ...) not their Plora_A/Plora_B children; never fold PLoRA into "
    "the base weight",
)(over_depth_slices(check_plora_preserved))


def check_path_agreement(ctx: CheckContext):
    run = dynamic_run(ctx)
    if isinstance(run, Unavailable):
        return _unavailable(run)
    from harness.loading.paths import PATHS

    problems, table = [], {}
    for name in PATHS:
        outcome = run.outcome(name)
        if outcome.error:
            problems.append(f"{name} failed to load: {outcome.error}")
            table[name] = {"error": outcome.error}
            continue
        record = outcome.record
        table[name] = {"image_max_rel": outcome.comparison.image_max_rel,
                       "text_max_rel": outcome.comparison.text_max_rel,
                       "missing": len(record.missing_keys), "unexpected": len(record.unexpected_keys),
                       "not_loaded": len(record.not_loaded)}
        if not record.clean:
            problems.append(f"{name}: {len(record.missing_keys)} missing, {len(record.unexpected_keys)} unexpected, "
                            f"{len(record.not_loaded)} not loaded keys")
        elif not outcome.comparison.ok:
            problems.append(outcome.comparison.summary())
    details = {"paths": table, "tolerance": run.tolerance, "dtype": run.dtype_name, "calibration": _calibration(run),
               "raw_load_state_dict": run.raw_load.message if run.raw_load else None}
    if problems:
        return failed(f"{len(problems)} of {len(PATHS)} loading paths disagree: {problems[0]}", **details)
    return passed(f"all {len(PATHS)} loading paths agree with the fp32 reference; plain load_state_dict is "
                  "correctly refused (a PEFT adapter is not a state dict)", **details)


register(
    id="path-agreement",
    group="dynamic",
    summary="any loading path (peft, merged, merge script, load_adapter, set_peft_model_state_dict, .bin, "
    ".safetensors) that loads with problems or disagrees with the fp32 reference",
    why="users reach the adapter through different paths; each must give the same model, and agreeing with a "
    "hand-computed reference rules out paths that are wrong the same way",
    fix="see the failing path's record in the details: missing/unexpected keys point at key names, output "
    "differences at scaling or dtype",
)(over_depth_slices(check_path_agreement))
