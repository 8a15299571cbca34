"""The fp32 reference: base weights + adapter tensors combined by hand, and the tolerance policy.

Every loading path is compared with this reference, never only with another path,
so two paths that are wrong the same way cannot agree their way to a pass. The
reference needs no PEFT object: W' = W + s·B·A with s from the saved config
(alpha/r, rank_pattern, alpha_pattern, rsLoRA), DoRA's column renormalisation,
and modules_to_save tensors copied in. PLoRA's own Plora_A/Plora_B are left alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .lora_math import delta_weight, module_scaling
from .probes import ProbeBatch

PREFIX = "base_model.model."
_LORA_KINDS = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class Tolerance:
    """How far a path may be from the fp32 reference, per row class (image rows, text rows).

    ``rel`` is relative to the output scale: max |out - ref| / max |ref| over that row class.
    ``atol`` is an absolute floor for row classes whose reference outputs are close to zero.
    ``weight_eps`` bounds merged-weight rounding: |W'_got - W'_want| <= rel_w·|ΔW| + weight_eps·|W|.
    """

    rel: float
    atol: float
    weight_eps: float
    why: str


# One policy per dtype. fp32 covers summation-order noise (PEFT computes x·Aᵀ·Bᵀ, a merge computes
# (W + sBA)·x) through a few layers; bf16/fp16 cover running the whole model in that dtype against an
# fp32 reference, so they are looser, and only scaling errors well above rounding are caught there.
TOLERANCE_TABLE: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-4, 1e-5, 2.4e-7, "summation order only; a mis-scaled adapter is >1e-2"),
    torch.bfloat16: Tolerance(5e-2, 1e-2, 7.9e-3, "8-bit mantissa: ~4e-3 per rounding, compounded over layers"),
    torch.float16: Tolerance(1e-2, 2e-3, 9.8e-4, "11-bit mantissa: ~5e-4 per rounding, compounded over layers"),
}
TOLERANCES: dict[torch.dtype, float] = {dtype: tol.rel for dtype, tol in TOLERANCE_TABLE.items()}


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative output tolerance for ``dtype`` (fp32's for anything unlisted)."""
    return TOLERANCE_TABLE.get(dtype, TOLERANCE_TABLE[torch.float32]).rel


def policy_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCE_TABLE.get(dtype, TOLERANCE_TABLE[torch.float32])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Expected deltas from the raw adapter tensors


@dataclass
class ModuleDelta:
    """What merging should add to one module's weight: s·B·A (fp32), or DoRA's rescaled result."""

    module: str  # e.g. "model.layers.0.attention.wqkv"
    delta: torch.Tensor  # s·B·A, fp32 [out, in] (before DoRA's rescaling)
    scaling: float
    rank: int
    magnitude: torch.Tensor | None = None  # DoRA's learned per-row magnitude
    fan_in_fan_out: bool = False

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight a correct merge produces from ``base_weight``."""
        merged = base_weight.float() + self.delta.to(base_weight.device)
        if self.magnitude is not None:
            dim = 0 if self.fan_in_fan_out else 1
            factor = self.magnitude.float().flatten().to(merged.device) / merged.norm(p=2, dim=dim)
            merged = merged * (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1))
        return merged

    def expected_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(base_weight) - base_weight.float()


def strip_prefix(name: str) -> str:
    """A module or parameter name as in the base model (PEFT's ``base_model.model.`` removed)."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def split_adapter_tensors(tensors: dict[str, torch.Tensor]):
    """(module -> {lora_A, lora_B, lora_magnitude_vector}, other tensors by base name)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = strip_prefix(key)
        for kind in _LORA_KINDS:
            marker = f".{kind}"
            if marker in name:
                lora.setdefault(name.split(marker)[0], {})[kind] = value
                break
        else:
            others[name] = value
    return lora, others


def expected_deltas(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, ModuleDelta]:
    """ΔW per adapted module from the saved config and tensors alone (no PEFT object involved).

    The rank is the saved ``lora_A``'s, the alpha comes from ``alpha_pattern`` or ``lora_alpha``,
    matched like PEFT (first pattern that matches as a dotted suffix); rsLoRA uses alpha/sqrt(r).
    Holds every ΔW at once (full weight-sized fp32 matrices): use ``iter_expected_deltas`` to stream.
    """
    return {delta.module: delta for delta in iter_expected_deltas(config, tensors)}


def iter_expected_deltas(config: dict, tensors: dict[str, torch.Tensor]):
    """``expected_deltas`` one module at a time, so only one ΔW is alive (memory: one weight)."""
    lora, _ = split_adapter_tensors(tensors)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, parts in sorted(lora.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            continue  # nothing a loader could apply either: key-coverage / base-match report these
        rank = parts["lora_A"].shape[0]
        scaling = module_scaling(config, module, rank=rank)
        yield ModuleDelta(
            module=module,
            delta=delta_weight(parts["lora_A"], parts["lora_B"], scaling, fan_in_fan_out=fan_in_fan_out),
            scaling=scaling,
            rank=rank,
            magnitude=parts.get("lora_magnitude_vector"),
            fan_in_fan_out=fan_in_fan_out,
        )


@torch.no_grad()
def apply_adapter_reference(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Fold the adapter into ``model``'s weights in place, by hand; returns the modules changed."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    _, others = split_adapter_tensors(tensors)
    changed = []
    for name, value in others.items():
        if name in params:  # modules_to_save / bias tensors replace the base values
            params[name].copy_(value.to(params[name].dtype))
            changed.append(name)
    for delta in iter_expected_deltas(config, tensors):
        module_name = delta.module
        if module_name not in modules or getattr(modules[module_name], "weight", None) is None:
            continue  # an adapter module the base lacks: key-coverage / base-match report these
        weight = modules[module_name].weight
        if weight.shape != delta.delta.shape:
            continue  # a different base: reported by base-match, not folded in here
        if delta.magnitude is None and weight.dtype == torch.float32:
            weight.add_(delta.delta.to(weight.device))  # the same fp32 sum as merged_weight, without a copy
        else:
            weight.copy_(delta.merged_weight(weight).to(weight.dtype))
        changed.append(module_name)
    return changed


@dataclass
class Reference:
    """The fp32 reference model and the per-module deltas it was built from."""

    model: torch.nn.Module
    deltas: dict[str, ModuleDelta]
    changed: list[str]
    base_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # fp32 base weights of changed modules


def build_reference_from_model(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> Reference:
    """Turn ``model`` (the base, fp32, modified in place) into the reference."""
    deltas = expected_deltas(config, tensors)
    state = model.state_dict()
    base_state = {f"{m}.weight": state[f"{m}.weight"].detach().float().clone() for m in deltas if f"{m}.weight" in state}
    changed = apply_adapter_reference(model, config, tensors)
    return Reference(model=model.eval(), deltas=deltas, changed=changed, base_state=base_state)


def build_reference(base_dir: Path, adapter_dir: Path, *, device: str = "cpu") -> Reference:
    """The base loaded in fp32 with the adapter folded in by hand, plus the expected deltas."""
    import json

    from .paths import load_base, read_adapter_tensors

    model = load_base(Path(base_dir), dtype=torch.float32, device=device)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return build_reference_from_model(model, config, read_adapter_tensors(Path(adapter_dir)))


def reference_model(base_dir: Path, adapter_dir: Path, *, device: str = "cpu") -> torch.nn.Module:
    """The base loaded in fp32 with the adapter folded in by hand (see ``apply_adapter_reference``)."""
    return build_reference(base_dir, adapter_dir, device=device).model


# ---------------------------------------------------------------------------------------------
# Running probes


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: ProbeBatch, *, im_mask: bool = True) -> torch.Tensor:
    """fp32 CPU logits of ``model`` on the probe (inputs cast to the model's dtype and device)."""
    param = next(model.parameters())
    kwargs = {"inputs_embeds": probe.inputs_embeds.to(param.device, param.dtype),
              "attention_mask": probe.attention_mask.to(param.device)}
    if im_mask:
        kwargs["im_mask"] = probe.im_mask.to(param.device)
    return model(**kwargs).logits.float().cpu()


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, probe: ProbeBatch, *, max_new_tokens: int = 4) -> torch.Tensor:
    """Greedy continuation: prefill from ``inputs_embeds`` + ``im_mask``, then one token at a time.

    Written out by hand because ``generate(inputs_embeds=..., im_mask=...)`` passes the prefill
    im_mask to every decoding step (the real remote code fails there too); decoding steps embed
    ``input_ids`` themselves, so im_mask is all False after the prefill, as in XComposer.
    """
    param = next(model.parameters())
    attention = probe.attention_mask.to(param.device)
    out = model(inputs_embeds=probe.inputs_embeds.to(param.device, param.dtype), attention_mask=attention,
                im_mask=probe.im_mask.to(param.device), use_cache=True)
    tokens = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].float().argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 == max_new_tokens:
            break
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        attention = torch.cat([attention, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=attention, past_key_values=cache, use_cache=True)
    return torch.cat(tokens, dim=1).cpu()


# ---------------------------------------------------------------------------------------------
# Output comparison


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
    worst_row: tuple[str, int, int]  # (row class, batch, position) of the largest relative error
    ok: bool

    def summary(self) -> str:
        row_class, b, t = self.worst_row
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{self.label}: image rows max abs {self.image_max_abs:.2e} (rel {self.image_max_rel:.2e}), "
                f"text rows max abs {self.text_max_abs:.2e} (rel {self.text_max_rel:.2e}); worst at {row_class} "
                f"row batch {b} position {t}; {verdict} the {self.dtype} tolerance {self.tolerance:.0e}")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(outputs: torch.Tensor, reference: torch.Tensor, probe: ProbeBatch, *, dtype: torch.dtype,
            label: str, tolerance: float | None = None) -> Comparison:
    """Max abs / rel error per row class (padding excluded); rel is relative to the reference's max on those rows.

    A row class passes when max abs <= max(atol, rel·scale); NaN/inf anywhere in real rows fails.
    """
    policy = policy_for(dtype)
    tol = policy.rel if tolerance is None else tolerance
    diff = (outputs.float() - reference.float()).abs().amax(-1)  # [B, T]
    diff = torch.nan_to_num(diff, nan=float("inf"))
    stats = {}
    worst = ("none", -1, -1)
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
        ok = ok and max_abs <= max(policy.atol if tolerance is None else 0.0, tol * scale)
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
        ok=ok,
    )


# ---------------------------------------------------------------------------------------------
# Weight-level comparison: which module / layer is off


@dataclass
class DeltaComparison:
    """Actual vs expected ΔW per adapted module; names the worst one."""

    label: str
    dtype: str
    per_module: dict[str, float]  # module -> error / allowed (<= 1 passes)
    missing: list[str]  # expected modules the model has no weight for
    worst_module: str
    worst_error: float  # max |ΔW_got - ΔW_want| / max |ΔW_want|
    ok: bool

    @property
    def worst_layer(self) -> int | None:
        found = re.search(r"layers\.(\d+)\.", self.worst_module)
        return int(found.group(1)) if found else None

    def summary(self) -> str:
        verdict = "within" if self.ok else "OUTSIDE"
        missing = f"; {len(self.missing)} adapted module(s) not found, e.g. {self.missing[0]}" if self.missing else ""
        return (f"{self.label}: worst module {self.worst_module} (layer {self.worst_layer}) has ΔW off by "
                f"{self.worst_error:.2e} of its max; {verdict} the {self.dtype} weight tolerance{missing}")


def _effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a module applies: a plain Linear's, or PEFT base weight + active unmerged deltas."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return module.weight.detach().float()
    weight = module.get_base_layer().weight.detach().float()
    if module.merged:
        return weight
    active = module.active_adapters if not module.disable_adapters else []
    for name in active:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name).detach().float()
    return weight


@torch.no_grad()
def compare_module_deltas(model: torch.nn.Module, base_state: dict[str, torch.Tensor],
                          expected: dict[str, ModuleDelta], *, dtype: torch.dtype = torch.float32,
                          label: str = "model") -> DeltaComparison:
    """Each adapted module's applied ΔW (merged or not) against the expected s·B·A.

    ``base_state`` maps ``<module>.weight`` to the base weight (any dtype). An entry passes when
    max |ΔW_got - ΔW_want| <= rel·max|ΔW_want| + weight_eps·max|W| (rounding of the stored weight).
    """
    policy = policy_for(dtype)
    modules = {strip_prefix(name): m for name, m in model.named_modules()}
    per_module, missing = {}, []
    worst_module, worst_ratio, worst_error = "", -1.0, 0.0
    for name, want in expected.items():
        module, base = modules.get(name), base_state.get(f"{name}.weight")
        if module is None or base is None or not hasattr(module, "weight") and not hasattr(module, "base_layer"):
            missing.append(name)
            continue
        got_weight = _effective_weight(module).cpu()
        if got_weight.shape != base.shape:
            missing.append(name)
            continue
        base32 = base.float().cpu()
        want_delta = want.expected_delta(base32)
        err = float(torch.nan_to_num((got_weight - base32 - want_delta).abs(), nan=float("inf")).max())
        scale = float(want_delta.abs().max())
        allowed = policy.rel * 0.1 * scale + policy.weight_eps * float(base32.abs().max()) + 1e-12
        ratio = err / allowed
        per_module[name] = ratio
        if ratio > worst_ratio:
            worst_module, worst_ratio, worst_error = name, ratio, err / max(scale, 1e-12)
    return DeltaComparison(
        label=label,
        dtype=_dtype_name(dtype),
        per_module=per_module,
        missing=missing,
        worst_module=worst_module or (missing[0] if missing else "none"),
        worst_error=worst_error,
        ok=not missing and worst_ratio <= 1.0,
    )


@torch.no_grad()
def compare_module_weights(model: torch.nn.Module, reference: torch.nn.Module, *, dtype: torch.dtype,
                           label: str) -> tuple[bool, str]:
    """Merged weights against the reference's, naming the worst module (for merged paths)."""
    ref = dict(reference.named_parameters())
    worst_name, worst_rel = "", 0.0
    for name, param in model.named_parameters():
        if name not in ref or ref[name].shape != param.shape:
            continue
        want = ref[name].float()
        rel = float((param.float().cpu() - want.cpu()).abs().max() / want.abs().max().clamp_min(1e-12))
        if rel > worst_rel:
            worst_name, worst_rel = name, rel
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
    layer = worst_name.rsplit(".weight", 1)[0]
    return worst_rel <= tol, f"{label}: worst weight {layer} off by {worst_rel:.2e} of its max (tolerance {tol:.0e})"


@torch.no_grad()
def first_divergent_layer(model: torch.nn.Module, reference: torch.nn.Module, probe: ProbeBatch, *,
                          dtype: torch.dtype = torch.float32) -> str | None:
    """The first decoder layer whose output leaves the tolerance, with its rows and error (or None).

    Works for merged and unmerged models alike (hooks on ``...layers.<i>``), so a failure can
    name a layer even when the path keeps PEFT wrappers.
    """
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)$")
    captured: dict[str, dict[int, torch.Tensor]] = {"got": {}, "want": {}}
    handles = []
    for key, net in (("got", model), ("want", reference)):
        for name, module in net.named_modules():
            found = pattern.search(strip_prefix(name))
            if found and "vit" not in name and "vision" not in name:
                index = int(found.group(1))
                handles.append(module.register_forward_hook(
                    lambda _m, _i, out, key=key, index=index: captured[key].__setitem__(
                        index, (out[0] if isinstance(out, tuple) else out).detach().float().cpu())))
    try:
        probe_logits(model, probe)
        probe_logits(reference, probe)
    finally:
        for handle in handles:
            handle.remove()
    tol = tolerance_for(dtype)
    for index in sorted(captured["want"]):
        if index not in captured["got"]:
            continue
        comparison = compare(captured["got"][index], captured["want"][index], probe, dtype=dtype,
                             label=f"layer {index}", tolerance=tol)
        if not comparison.ok:
            return comparison.summary()
    return None


@dataclass
class Verdict:
    """One model (a loading path's result) judged against the reference: outputs, weights, first bad layer."""

    label: str
    comparison: Comparison
    deltas: DeltaComparison | None
    divergent_layer: str | None

    @property
    def ok(self) -> bool:
        return self.comparison.ok and (self.deltas is None or self.deltas.ok)

    def report(self) -> str:
        """Readable, one line per aspect: which path, which rows, how far off, which module/layer."""
        lines = [f"path {self.label}: {'OK' if self.ok else 'MISMATCH against the fp32 reference'}",
                 f"  outputs: {self.comparison.summary()}"]
        if self.deltas is not None:
            lines.append(f"  weights: {self.deltas.summary()}")
        if self.divergent_layer:
            lines.append(f"  first divergent decoder layer: {self.divergent_layer}")
        return "\n".join(lines)


@torch.no_grad()
def judge(label: str, model: torch.nn.Module, reference: Reference, probe: ProbeBatch, *, dtype: torch.dtype,
          reference_logits: torch.Tensor | None = None, locate: bool = True) -> Verdict:
    """Compare ``model`` with the reference on the probe and per module; locate the first bad layer on failure."""
    ref_logits = probe_logits(reference.model, probe) if reference_logits is None else reference_logits
    comparison = compare(probe_logits(model, probe), ref_logits, probe, dtype=dtype, label=label)
    deltas = None
    if reference.base_state:
        deltas = compare_module_deltas(model, reference.base_state, reference.deltas, dtype=dtype, label=label)
    divergent = None
    if locate and not (comparison.ok and (deltas is None or deltas.ok)):
        divergent = first_divergent_layer(model, reference.model, probe, dtype=dtype)
    return Verdict(label, comparison, deltas, divergent)


def pairwise_disagreements(outputs: dict[str, torch.Tensor], probe: ProbeBatch, *, dtype: torch.dtype) -> list[str]:
    """Every pair of paths compared with each other (twice the dtype tolerance: both carry rounding)."""
    problems = []
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = compare(outputs[a], outputs[b], probe, dtype=dtype, label=f"{a} vs {b}",
                           tolerance=2 * tolerance_for(dtype))
            if not pair.ok:
                problems.append(pair.summary())
    return problems
