"""Checks of the adapter against the base model's structure (no weights loaded).

``ctx.base`` is a ``harness.base_model.BaseModelInfo``: the module tree from a
meta-device build and the weight index from the safetensors headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.checks.static import analyse_keys

if TYPE_CHECKING:
    from harness.model.targets import TargetResolution


def _needs_base(ctx: CheckContext) -> str | None:
    if ctx.base is None:
        return "no --base-model given"
    if not isinstance(ctx.adapter.config if ctx.adapter else None, dict):
        return "adapter_config.json unreadable (see config-valid)"
    return None


def target_resolution(ctx: CheckContext) -> TargetResolution:
    from harness.model.targets import resolve_targets

    return ctx.cached("base.targets", lambda: resolve_targets(ctx.adapter.config, ctx.base))


@register(
    id="targets-resolve",
    group="against-base",
    summary="target_modules patterns that match nothing, or only the wrong tower (vision instead of language)",
    why="PEFT raises only when no pattern matches at all; Llama names such as q_proj silently hit the CLIP tower",
    fix="use the base model's own module names (XComposer: attention.wqkv, attention.wo, feed_forward.w1/w2/w3)",
)
def check_targets_resolve(ctx: CheckContext):
    if reason := _needs_base(ctx):
        return skipped(reason)
    result = target_resolution(ctx)
    details = {
        "per_tower": result.per_tower,
        "per_pattern": {p: len(hits) for p, hits in result.per_pattern.items()},
        "notes": result.notes,
    }
    if not result.matched:
        return failed("no target pattern matches any module of the base model", **details)
    if result.unmatched_patterns:
        return failed(f"target pattern(s) {result.unmatched_patterns} match no module of the base model", **details)
    has_language = any(ctx.base.branch_modules()) or any(
        name.startswith(("model.", "language_model")) for name in ctx.base.module_names()
    )
    if has_language and not result.per_tower.get("language"):
        towers = ", ".join(f"{k}: {v}" for k, v in sorted(result.per_tower.items()))
        return failed(f"targets adapt no language-model module, only the {towers} part", **details)
    towers = ", ".join(f"{k} {v}" for k, v in sorted(result.per_tower.items()))
    return passed(f"{len(result.matched)} modules matched ({towers})", **details)


@register(
    id="lora-on-plora",
    group="against-base",
    summary="LoRA attached to the inner Plora_A / Plora_B linears of a PLoRA module",
    why="their effect on text tokens is exactly zero; peft <= 0.20's merge_and_unload skips modules named lora_* "
    "(the merged checkpoint then lacks Plora_A.weight and reloads it re-initialised), peft 0.21 merges them into "
    "PLoRA's own weights",
    fix="target the PLoRA modules themselves (attention.wqkv, ...), not Plora_A/Plora_B; avoid 'all-linear' and "
    "regexes that reach inside them",
)
def check_lora_on_plora(ctx: CheckContext):
    if reason := _needs_base(ctx):
        return skipped(reason)
    if not ctx.base.branch_modules():
        return passed("the base model has no PLoRA modules")
    inner = target_resolution(ctx).plora_inner
    if not inner:
        return passed("no target lies inside a PLoRA module")
    message = f"{len(inner)} target(s) are Plora_A/Plora_B inside PLoRA modules, e.g. {inner[0]}"
    details = {"modules": inner[:10], "count": len(inner)}
    if ctx.options.allow_plora_targets:
        return warned(message + " (allowed by --allow-plora-targets)", **details)
    return failed(message, **details)


@register(
    id="base-match",
    group="against-base",
    summary="adapted modules missing from the base model, or with other in/out dimensions",
    why="an adapter trained for another base fails loudly when shapes differ and silently when they match",
    fix="check base_model_name_or_path in adapter_config.json and load the adapter on the model it was trained on",
)
def check_base_match(ctx: CheckContext):
    if ctx.base is None:
        return skipped("no --base-model given")
    keys = analyse_keys(ctx)
    tensors = ctx.adapter.tensors
    by_module: dict[str, dict[str, tuple]] = {}
    for info in keys.lora:
        by_module.setdefault(info.module, {})[info.lora_kind] = tensors[info.key].shape
    if not by_module:
        return skipped("the adapter has no LoRA tensors to compare (see key-grammar)")
    names = set(ctx.base.module_names())
    missing = sorted(m for m in by_module if m not in names)
    mismatched = []
    for module, shapes in sorted(by_module.items()):
        if module in missing:
            continue
        dims = ctx.base.linear_dims(module)
        if dims is None:
            continue
        fan_in, fan_out = dims
        a, b = shapes.get("lora_A"), shapes.get("lora_B")
        if (a and len(a) == 2 and a[1] != fan_in) or (b and len(b) == 2 and b[0] != fan_out):
            mismatched.append(f"{module}: base in/out {fan_in}/{fan_out}, adapter A {a} B {b}")
    declared = (ctx.adapter.config or {}).get("base_model_name_or_path")
    details = {"modules": len(by_module), "missing": missing[:10], "mismatched": mismatched[:10],
               "adapter_base_model_name_or_path": declared}
    if missing or mismatched:
        share = (len(missing) + len(mismatched)) / len(by_module)
        kind = "a different base model" if share > 0.5 else "a base model with other modules"
        first = (missing or mismatched)[0]
        return failed(
            f"adapter looks trained for {kind}: {len(missing)} adapted module(s) missing, {len(mismatched)} with "
            f"other dimensions (first: {first})",
            **details,
        )
    return passed(f"all {len(by_module)} adapted modules exist in the base with matching dimensions", **details)
