"""Checks of the adapter against the base model's structure (no weights loaded).

``ctx.base`` is a ``harness.model.structure.BaseModelInfo``: the module tree from a
meta-device build and the weight index from the safetensors headers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.checks.static import analyse_keys, tokens_shape_problem

if TYPE_CHECKING:
    from harness.model.structure import BaseModelInfo
    from harness.model.targets import TargetResolution


def _needs_base(ctx: CheckContext) -> str | None:
    if ctx.base is None:
        return "no --base-model given"
    if not isinstance(ctx.adapter.config if ctx.adapter else None, dict):
        return "adapter_config.json unreadable (see config-valid)"
    return None


def target_resolution(ctx: CheckContext) -> TargetResolution:
    from harness.model.targets import resolve_targets

    return ctx.cached("base.targets", lambda: resolve_targets(ctx.adapter.config, ctx.base),
                      name="resolving target_modules on the base")


def check_targets_resolve(ctx: CheckContext):
    if reason := _needs_base(ctx):
        return skipped(reason)
    result = target_resolution(ctx)
    details = {
        "per_tower": result.per_tower,
        "per_pattern": {p: len(hits) for p, hits in result.per_pattern.items()},
        "notes": result.notes,
    }
    if result.error:
        return failed(f"target_modules cannot be resolved: {result.error}",
                      fix="write target_modules as module names or a simple regex PEFT can match quickly", **details)
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


register(
    id="targets-resolve",
    group="against-base",
    summary="target_modules patterns that match nothing, or only the wrong tower (vision instead of language)",
    why="PEFT raises only when no pattern matches at all; Llama names such as q_proj silently hit the CLIP tower",
    fix="use the base model's own module names (XComposer: attention.wqkv, attention.wo, feed_forward.w1/w2/w3)",
)(check_targets_resolve)


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


register(
    id="lora-on-plora",
    group="against-base",
    summary="LoRA attached to the inner Plora_A / Plora_B linears of a PLoRA module",
    why="their effect on text tokens is exactly zero; peft <= 0.20's merge_and_unload skips modules named lora_* "
    "(the merged checkpoint then lacks Plora_A.weight and reloads it re-initialised), peft 0.21 merges them into "
    "PLoRA's own weights",
    fix="target the PLoRA modules themselves (attention.wqkv, ...), not Plora_A/Plora_B; avoid 'all-linear' and "
    "regexes that reach inside them",
)(check_lora_on_plora)


def _lora_shapes(ctx: CheckContext) -> dict[str, dict[str, tuple[int, ...]]]:
    """module -> saved part ("lora_A", "lora_B.bias", "lora_embedding_A", ...) -> shape."""
    tensors = ctx.adapter.tensors
    by_module: dict[str, dict[str, tuple[int, ...]]] = {}
    for info in analyse_keys(ctx).lora:
        part = info.lora_kind + (".bias" if info.key.endswith(".bias") else "")
        by_module.setdefault(info.module, {})[part] = tuple(tensors[info.key].shape)
    return by_module


def _layer_problem(base: BaseModelInfo, module: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why the saved parts do not fit the base module (its layer kind's shape rule), or None."""
    from harness.model.layer_kinds import LINEAR, kind_of_parts

    layer = base.layer(module)
    if layer is None:  # no module tree (or a kind not modelled): the weight index alone, either orientation
        kind = kind_of_parts(shapes)
        shape = base.weights.get(base.checkpoint_key(f"{module}.weight"), ((),))[0]
        options = [kind.dims_from_weight(shape)] + ([LINEAR.dims_from_weight(shape[::-1])] if kind is LINEAR else [])
        fits = [dims for dims in options if dims is not None and _misfits(kind, dims, shapes) == []]
        if not options[0] or fits:
            return None
        kind, dims = kind, options[0]
    else:
        kind, dims = layer
        if not set(shapes) & set(kind.parts):
            return (f"{module}: a {kind.module_type} takes {'/'.join(kind.parts)}, the adapter has "
                    f"{'/'.join(sorted(shapes))}")
    bad = _misfits(kind, dims, shapes)
    if not bad:
        return None
    return (f"{module}: base {kind.module_type} in/out {dims.in_features}/{dims.out_features}, adapter "
            + ", ".join(bad))


def _misfits(kind, dims, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    down, up = kind.parts
    rank = kind.rank_of(shapes) or (shapes[up][-1] if len(shapes.get(up, ())) == 2 else None)
    if rank is None:
        return []
    want = kind.lora_shapes(dims, rank)
    bad = []
    for part, shape in sorted(shapes.items()):
        if part not in want:
            continue
        # the matrices exactly; a magnitude / bias vector by size (DoRA once saved it with extra unit dims)
        wrong = tuple(shape) != want[part] if part in (down, up) else math.prod(shape) != math.prod(want[part])
        if wrong:
            bad.append(f"{part} {list(shape)} (want {list(want[part])})")
    return bad


def _copy_problems(ctx: CheckContext) -> list[str]:
    """modules_to_save tensors whose shape differs from the base parameter they replace."""
    from harness.model.peft_keys import strip_prefix

    problems = []
    for info in analyse_keys(ctx).of("modules_to_save"):
        param = strip_prefix(info.key).replace(f".modules_to_save.{info.adapter_name}.", ".")
        held = ctx.base.weights.get(ctx.base.checkpoint_key(param))
        saved = tuple(ctx.adapter.tensors[info.key].shape)
        if held is not None and tuple(held[0]) != saved:
            problems.append(f"{param}: modules_to_save copy {list(saved)}, base {list(held[0])}")
    return problems


def _token_problems(ctx: CheckContext) -> list[str]:
    """Trainable token rows that do not fit the base weight they are written into (width, vocab)."""
    return [problem for info in analyse_keys(ctx).of("trainable_tokens") if info.adapter_name is None
            and (problem := tokens_shape_problem(ctx.base, ctx.adapter.config or {}, info.module,
                                                 tuple(ctx.adapter.tensors[info.key].shape)))]


def _fan_in_fan_out_corrections(ctx: CheckContext, modules) -> dict[str, list[str]]:
    """What PEFT corrects per module when the config's fan_in_fan_out contradicts the module type -> modules."""
    from harness.model.layer_kinds import fan_in_fan_out_correction

    configured = bool((ctx.adapter.config or {}).get("fan_in_fan_out"))
    found: dict[str, list[str]] = {}
    for module in modules:
        layer = ctx.base.layer(module)
        note = fan_in_fan_out_correction(layer[0], configured) if layer else None
        if note:
            found.setdefault(note, []).append(module)
    return found


def check_base_match(ctx: CheckContext):
    if ctx.base is None:
        return skipped("no --base-model given")
    by_module = _lora_shapes(ctx)
    token_problems = _token_problems(ctx)
    if not by_module and not token_problems:
        return skipped("the adapter has no LoRA tensors to compare (see key-grammar)")
    names = set(ctx.base.module_names())
    missing = sorted(m for m in by_module if m not in names)
    mismatched = [p for m, shapes in sorted(by_module.items()) if m not in missing
                  and (p := _layer_problem(ctx.base, m, shapes))]
    mismatched += _copy_problems(ctx) + token_problems
    declared = (ctx.adapter.config or {}).get("base_model_name_or_path")
    corrections = _fan_in_fan_out_corrections(ctx, [m for m in by_module if m not in missing])
    details = {"modules": len(by_module), "missing": missing[:10], "mismatched": mismatched[:10],
               "adapter_base_model_name_or_path": declared,
               "fan_in_fan_out_corrected": {note: mods[:10] for note, mods in corrections.items()},
               "layer_kinds": _kind_counts(ctx.base, by_module)}
    if missing or mismatched:
        share = (len(missing) + len(mismatched)) / max(len(by_module), 1)
        kind = "a different base model" if share > 0.5 else "a base model with other modules"
        first = (missing or mismatched)[0]
        return failed(
            f"adapter looks trained for {kind}: {len(missing)} adapted module(s) missing, {len(mismatched)} with "
            f"other dimensions (first: {first})",
            **details,
        )
    if corrections:
        note, modules = next(iter(corrections.items()))
        return warned(f"{note} ({len(modules)} module(s), e.g. {modules[0]}); the adapter loads and merges right, "
                      "but tools that read the config literally would not",
                      fix="set fan_in_fan_out in adapter_config.json to match the modules (true for Conv1D, false "
                      "for nn.Linear)", **details)
    return passed(f"all {len(by_module)} adapted modules exist in the base with matching dimensions", **details)


register(
    id="base-match",
    group="against-base",
    summary="adapted modules missing from the base model, or with other in/out dimensions; trainable token rows "
    "narrower or wider than the embedding, or token indices outside its vocab",
    why="an adapter trained for another base fails loudly when shapes differ and silently when they match",
    fix="check base_model_name_or_path in adapter_config.json and load the adapter on the model it was trained on",
)(check_base_match)


def _kind_counts(base: BaseModelInfo, by_module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in by_module:
        layer = base.layer(module)
        name = layer[0].name if layer else "unknown"
        counts[name] = counts.get(name, 0) + 1
    return counts


# Loaders that read adapter_config.json's base_model_name_or_path to find the base themselves.
BASE_NAME_READERS = ("AutoPeftModelForCausalLM.from_pretrained(adapter_dir)",
                     "AutoModelForCausalLM.from_pretrained(adapter_dir)", "pipeline(model=adapter_dir)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class DeclaredBase:
    """What adapter_config.json's base_model_name_or_path names, relative to the base being checked."""

    kind: str  # "same" | "other-dir" | "missing-path" | "hub-id" | "unset"
    declared: str | None
    resolved: Path | None = None  # for a local path: where it points (relative to the working directory)


def declared_base(declared: object, base_dir: Path) -> DeclaredBase:
    """Classify ``declared`` the way loaders read it: an existing local directory first, else a hub id."""
    if not isinstance(declared, str) or not declared.strip():
        return DeclaredBase("unset", None if declared is None else str(declared))
    path = Path(declared).expanduser()
    if path.exists():
        resolved = path.resolve()
        same = resolved == Path(base_dir).resolve()
        return DeclaredBase("same" if same else "other-dir", declared, resolved)
    if _HUB_ID.match(declared) and not declared.startswith((".", "~")):
        return DeclaredBase("hub-id", declared)
    return DeclaredBase("missing-path", declared, path.absolute())


def check_base_name(ctx: CheckContext):
    if reason := _needs_base(ctx):
        return skipped(reason)
    base_dir = Path(ctx.base.base_dir)
    found = declared_base(ctx.adapter.config.get("base_model_name_or_path"), base_dir)
    readers = ", ".join(BASE_NAME_READERS)
    details = {"declared": found.declared, "resolved": str(found.resolved) if found.resolved else None,
               "checked_base": str(base_dir.resolve()), "kind": found.kind, "loaders_reading_it": list(BASE_NAME_READERS)}
    if found.kind == "same":
        return passed(f"base_model_name_or_path names the base being checked ({found.declared})", **details)
    if found.kind == "hub-id":
        named = ctx.base.config.get("_name_or_path")
        also = f"; the base's config.json names {named!r}" if named else ""
        return passed(f"note: base_model_name_or_path is the hub id {found.declared!r}: {readers} download that model, "
                      f"not the local base checked ({base_dir}); make sure they are the same weights{also}", **details)
    if found.kind == "unset":
        return warned(f"adapter_config.json has no base_model_name_or_path: {readers} cannot find a base for it "
                      f"(checked against {base_dir})", **details)
    where = ("another local directory, " + str(found.resolved) if found.kind == "other-dir"
             else f"a path that does not exist here ({found.resolved})")
    return warned(f"base_model_name_or_path {found.declared!r} names {where}, not the base being checked "
                  f"({base_dir.resolve()}): {readers} load that one instead", **details)


register(
    id="base-name",
    group="against-base",
    summary="adapter_config.json's base_model_name_or_path names another base than the one checked (another "
    "local directory, a path that no longer exists, or nothing)",
    why="AutoPeftModelForCausalLM.from_pretrained(adapter_dir), AutoModelForCausalLM.from_pretrained(adapter_dir) "
    "and pipelines load the base that field names, not the one the harness checked",
    fix="set base_model_name_or_path in adapter_config.json to the base the adapter was trained and checked on "
    "(its hub id when it is published), or load the base yourself and use PeftModel.from_pretrained(base, "
    "adapter_dir)",
)(check_base_name)
