"""``merged-matches``: a merged checkpoint equals base + adapter, tensor by tensor, and ships whole.

Streams every tensor once (base, merged and adapter are mmapped views), so memory
stays at a few tensors whatever the model size. Expected adapted weights are
W + s·B·A computed in fp32; everything else must equal the base after the cast to
the merged dtype. Tolerances are relative to the tensor's magnitude, per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.checks.context import CheckContext
from harness.checks.registry import failed, passed, register, skipped, warned
from harness.checks.static import analyse_keys
from harness.inputs.errors import InputError
from harness.model import families
from harness.model.lora_math import delta_weight, module_scaling
from harness.numerics.tolerances import merged_weight_tolerances, policy_for

if TYPE_CHECKING:
    import torch

    from harness.inputs.model_dir import ModelDir


@dataclass
class MergedFindings:
    missing: list[str] = field(default_factory=list)  # base tensors absent from the merged checkpoint
    unexpected: list[str] = field(default_factory=list)
    wrong_delta: list[str] = field(default_factory=list)  # adapted weights that are not W + s·B·A
    unmerged: list[str] = field(default_factory=list)  # adapted weights equal to the base (layer skipped)
    plora_folded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # tensors that should equal the base but do not
    unresolved: list[str] = field(default_factory=list)  # ΔW below the dtype's resolution
    dtypes: set = field(default_factory=set)
    worst: tuple[float, str] = (0.0, "")


def _modules(ctx: CheckContext) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for info in analyse_keys(ctx).lora:
        found.setdefault(info.module, {})[info.lora_kind] = info.key
    return found


def _rel(err: torch.Tensor, scale: torch.Tensor) -> float:
    return float(err) / max(float(scale), 1e-12)


def compare_merged(ctx: CheckContext, base: ModelDir, merged: ModelDir) -> MergedFindings:
    import torch

    config = ctx.adapter.config or {}
    modules = _modules(ctx)
    found = MergedFindings()
    base_keys, merged_keys = set(base.keys), set(merged.keys)
    found.missing = sorted(base_keys - merged_keys)
    found.unexpected = sorted(merged_keys - base_keys)
    adapted = {f"{m}.weight": m for m, parts in modules.items() if {"lora_A", "lora_B"} <= set(parts)}
    for key in sorted(base_keys & merged_keys):
        got = merged.get(key)
        found.dtypes.add(str(got.dtype).replace("torch.", ""))
        rtol = policy_for(got.dtype).merged_rel
        want = base.get(key)
        if key in adapted:
            parts = modules[adapted[key]]
            lora_a = ctx.adapter.primary.get_tensor(parts["lora_A"])
            lora_b = ctx.adapter.primary.get_tensor(parts["lora_B"])
            scaling = module_scaling(config, adapted[key], rank=lora_a.shape[0])
            delta = delta_weight(lora_a, lora_b, scaling, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
            expected = want.float() + delta
            err = _rel((got.float() - expected).abs().max(), expected.abs().max())
            resolution = _rel(delta.abs().max(), expected.abs().max())
            if err > found.worst[0]:
                found.worst = (err, key)
            if resolution <= rtol:
                found.unresolved.append(key)
            elif err > rtol:
                if _rel((got.float() - want.float()).abs().max(), expected.abs().max()) <= rtol:
                    found.unmerged.append(key)
                elif _folds_plora(base, key, got, expected, rtol):
                    found.plora_folded.append(key)
                else:
                    found.wrong_delta.append(f"{key} (error {err:.2e} of max|W|, ΔW is {resolution:.2e})")
        elif got.shape != want.shape or not torch.equal(got, want.to(got.dtype)):
            same = got.shape == want.shape and _rel((got.float() - want.float()).abs().max(), want.abs().max()) <= rtol
            if not same:
                found.changed.append(key)
    return found


def _folds_plora(base: ModelDir, key: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    """Did the merge add the base model's own branch (PLoRA: Plora_B @ Plora_A · scale) into the weight too?"""
    for a_key, b_key in families.branch_weight_keys(key[: -len(".weight")]):
        if a_key not in base.keys or b_key not in base.keys:
            continue
        branch = base.get(b_key).float() @ base.get(a_key).float()
        residual = got.float() - expected
        # any positive scale: the residual is a multiple of the branch's own B @ A
        scale = float((residual * branch).sum() / (branch * branch).sum().clamp_min(1e-30))
        if scale > 0 and _rel((residual - scale * branch).abs().max(), expected.abs().max()) <= rtol:
            return True
    return False


def _config_problems(base: ModelDir, merged: ModelDir, found: MergedFindings) -> list[str]:
    problems = []
    for field_name in ("architectures", "auto_map", "model_type", "tie_word_embeddings"):
        if base.config.get(field_name) != merged.config.get(field_name):
            problems.append(f"config {field_name} is {merged.config.get(field_name)!r}, base has "
                            f"{base.config.get(field_name)!r}")
    declared = merged.declared_dtype()
    floats = {d for d in found.dtypes if "float" in d}
    if declared and floats and floats != {declared}:
        problems.append(f"config declares dtype {declared} but the weights are {sorted(floats)}")
    lost_code = sorted(set(base.custom_code_files()) - set(merged.custom_code_files()))
    if lost_code:
        problems.append(f"custom code files not copied: {lost_code} (trust_remote_code loading will fail)")
    lost_tok = sorted(set(base.tokenizer_files()) - set(merged.tokenizer_files()))
    if lost_tok:
        problems.append(f"tokenizer files not copied: {lost_tok}")
    return problems


@register(
    id="merged-matches",
    group="merged",
    summary="a merged checkpoint that is not base + adapter: mis-scaled or skipped layers, PLoRA folded into the "
    "base weight, changed or missing tensors (re-initialised on reload), re-tied weights, wrong dtype, "
    "drifted architectures/auto_map, custom code or tokenizer files not copied",
    why="merge scripts do no validation; a broken merged model loads without error and answers differently",
    fix="re-merge with PeftModel.from_pretrained(base) → merge_and_unload() → save_pretrained, copying the "
    "base's *.py and tokenizer files; keep PLoRA modules out of target_modules",
)
def check_merged_matches(ctx: CheckContext):
    if ctx.merged is None:
        return skipped("no --merged given")
    if ctx.base is None:
        return skipped("--merged needs --base-model to compare against")
    if ctx.adapter is None or ctx.adapter.primary is None or not isinstance(ctx.adapter.config, dict):
        return skipped("the adapter's tensors or config are unreadable (see the static checks)")
    from harness.inputs.model_dir import ModelDir

    try:
        base, merged = ModelDir(ctx.base.base_dir), ModelDir(ctx.merged)
    except InputError as err:  # unreadable, corrupt or escaping files: say which, never a traceback
        return failed(str(err))
    ctx.say("comparing the merged checkpoint with base + adapter, tensor by tensor")
    found = compare_merged(ctx, base, merged)
    problems = []
    if found.missing:
        plora = [k for k in found.missing if families.is_branch_param(k)]
        problems.append(f"{len(found.missing)} base tensor(s) missing from the merged checkpoint (re-initialised "
                        f"on load), e.g. {(plora or found.missing)[0]}")
    if found.plora_folded:
        problems.append(f"PLoRA branch folded into the base weight of {len(found.plora_folded)} module(s), e.g. "
                        f"{found.plora_folded[0]} (text-token outputs change)")
    if found.unmerged:
        problems.append(f"{len(found.unmerged)} adapted weight(s) equal the base (layer not merged), e.g. "
                        f"{found.unmerged[0]}")
    if found.wrong_delta:
        problems.append(f"{len(found.wrong_delta)} adapted weight(s) differ from W + s·B·A, e.g. {found.wrong_delta[0]}")
    if found.changed:
        problems.append(f"{len(found.changed)} tensor(s) that the adapter does not touch changed, e.g. "
                        f"{found.changed[0]}")
    if found.unexpected:
        problems.append(f"{len(found.unexpected)} tensor(s) not in the base, e.g. {found.unexpected[0]}")
    problems += _config_problems(base, merged, found)
    details = {
        "missing": found.missing[:10], "unexpected": found.unexpected[:10], "changed": found.changed[:10],
        "wrong_delta": found.wrong_delta[:10], "unmerged": found.unmerged[:10], "plora_folded": found.plora_folded[:10],
        "max_rel_error": found.worst[0], "worst_tensor": found.worst[1], "dtypes": sorted(found.dtypes),
        "tolerance": merged_weight_tolerances(), "problems": problems,
    }
    if problems:
        return failed(problems[0] + (f" (+{len(problems) - 1} more problem(s))" if len(problems) > 1 else ""),
                      **details)
    if found.unresolved and len(found.unresolved) == sum(1 for k in base.keys if k.endswith(".weight")
                                                          and k[: -len('.weight')] in _modules(ctx)):
        return warned(f"ΔW is below the {sorted(found.dtypes)} resolution in every adapted weight; the merge cannot "
                      "be verified from weights alone", **details)
    return passed(f"{len(merged.keys)} tensors match base + adapter (max rel error {found.worst[0]:.1e}); config, "
                  "code and tokenizer files intact", **details)
