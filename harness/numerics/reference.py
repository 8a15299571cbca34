"""The fp32 reference: base weights + adapter tensors combined by hand.

Every loading path is compared with this reference, never only with another path,
so two paths that are wrong the same way cannot agree their way to a pass. The
reference needs no PEFT object: it applies what PEFT will load (``harness.numerics.applied``:
modules ``target_modules`` resolves to on the base, ``modules_to_save`` the config names)
with the layer-kind rules of ``harness.model.layer_kinds`` (Linear, Conv1D, Embedding:
W' = W + s·B·A in the module's stored layout, s from the saved config; DoRA's
renormalisation; lora_B.bias), copies ``modules_to_save`` in, writes trainable token rows over
the embedding's rows (a tied head shares them, as PEFT ties its token adapter), and unties a weight
shared with another module before changing it otherwise. PLoRA's own Plora_A/Plora_B are left alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from harness.model.layer_kinds import CONV1D, LINEAR, TOKENS, LayerKind, kind_of_module
from harness.model.structure import input_embedding_name
from harness.numerics.applied import AdapterPlan, plan_adapter
from harness.numerics.probes import DETECT, ProbeBatch, mask_kwarg

# ---------------------------------------------------------------------------------------------
# Expected deltas from the raw adapter tensors


@dataclass
class ModuleDelta:
    """What merging should add to one module's weight: s·B·A (fp32, stored layout), or DoRA's rescaled result."""

    module: str  # e.g. "model.layers.0.attention.wqkv"
    delta: torch.Tensor  # s·B·A, fp32, in the layout the module's weight is stored in (before DoRA's rescaling)
    scaling: float
    rank: int
    magnitude: torch.Tensor | None = None  # DoRA's learned per-output magnitude
    fan_in_fan_out: bool = False  # the weight is stored [in, out] (kept for callers; ``kind`` decides)
    kind: LayerKind = field(default=LINEAR)
    bias_delta: torch.Tensor | None = None  # lora_bias: s·lora_B.bias, added to the base bias

    def __post_init__(self) -> None:
        if self.fan_in_fan_out and self.kind is LINEAR:
            self.kind = CONV1D
        self.fan_in_fan_out = self.kind.stored_in_out

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight a correct merge produces from ``base_weight``."""
        return self.kind.merged_weight(base_weight, self.delta, self.magnitude)

    def expected_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged_weight(base_weight) - base_weight.float()


def expected_deltas(config: dict, tensors: dict[str, torch.Tensor], **where) -> dict[str, ModuleDelta]:
    """ΔW per adapted module from the saved config and tensors alone (no PEFT object involved).

    The rank is the saved down part's, the alpha comes from ``alpha_pattern`` or ``lora_alpha``,
    matched like PEFT (first pattern that matches as a dotted suffix); rsLoRA uses alpha/sqrt(r).
    Holds every ΔW at once (full weight-sized fp32 matrices): use ``iter_expected_deltas`` to stream.
    ``where``: ``kinds`` / ``targets`` as for ``iter_expected_deltas``.
    """
    return {delta.module: delta for delta in iter_expected_deltas(config, tensors, **where)}


def iter_expected_deltas(config: dict, tensors: dict[str, torch.Tensor], *,
                         kinds: dict[str, LayerKind | None] | None = None, targets: set[str] | None = None):
    """``expected_deltas`` one module at a time, so only one ΔW is alive (memory: one weight).

    ``kinds``: the base's module -> layer kind (``layer_kinds_of(model)``); without it the kind is read from the
    saved parts (embedding or linear). ``targets``: the modules PEFT wraps; None: every module with tensors.
    """
    plan = plan_adapter(config, tensors, lambda key: tensors[key].shape, kinds=kinds, targets=targets)
    yield from _deltas(plan, tensors.__getitem__)


def _deltas(plan: AdapterPlan, get):
    for lora in plan.lora:
        yield ModuleDelta(module=lora.module, delta=lora.delta(get), scaling=lora.scaling, rank=lora.rank,
                          magnitude=lora.magnitude(get), kind=lora.kind, bias_delta=lora.bias_delta(get))


def layer_kinds_of(model: torch.nn.Module) -> dict[str, LayerKind | None]:
    """Every module of ``model`` -> the layer kind PEFT would give it (by type)."""
    return {name: kind_of_module(module) for name, module in model.named_modules() if name}


def resolved_targets(model: torch.nn.Module, config: dict) -> set[str] | None:
    """The modules ``target_modules`` resolves to on ``model``, as PEFT matches them; None when the config names
    none (PEFT's per-architecture defaults) or cannot be resolved, and then every module with tensors counts."""
    if not config.get("target_modules"):
        return None
    from harness.model.structure import describe_model
    from harness.model.targets import resolve_targets

    try:
        return set(resolve_targets(config, describe_model(model)).matched)
    except Exception:  # noqa: BLE001 - an unreadable config is config-valid's to report
        return None


def trained_token_ids(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> list[int]:
    """The token ids whose embedding rows the adapter trains (trainable tokens PEFT applies to ``model``), for the
    probes: a random draw of ids rarely hits them."""
    plan = plan_adapter(config, tensors, lambda key: tensors[key].shape, kinds=layer_kinds_of(model),
                        input_embedding=input_embedding_name(model))
    return sorted({i for tokens in plan.tokens for i in tokens.indices})


def shared_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that more than one module uses (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, count in counts.items() if count > 1}


_RESOLVE = object()


class ReferenceFold:
    """What PEFT will load from the adapter, ready to fold by hand into a model's weights: all at once
    (``apply_adapter_reference``) or one unit of modules at a time, into fp32 copies (``numerics.streamed``).

    Built once from the model's module tree (layer kinds, resolved targets, the input embedding); ``notes`` holds one
    line per saved tensor that PEFT will not apply or that does not fit the base, ``changed`` the parameters or
    modules the fold changes, in the order ``apply_adapter_reference`` reports them.
    """

    def __init__(self, model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor], *,
                 targets: set[str] | None | object = _RESOLVE) -> None:
        if targets is _RESOLVE:
            targets = resolved_targets(model, config)
        self.tensors = tensors
        self.plan = plan_adapter(config, tensors, lambda key: tensors[key].shape, kinds=layer_kinds_of(model),
                                 targets=targets, input_embedding=input_embedding_name(model))
        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        self.notes: list[str] = self.plan.notes()
        self.copies = [c for c in sorted(self.plan.copies, key=lambda c: c.role == "modules_to_save")
                       if self._copy_fits(params, c)]
        self.tokens = [t for t in self.plan.tokens if self._tokens_fit(modules, t)]
        self.lora = [lora for lora in self.plan.lora if self._lora_fits(modules, lora)]
        self.changed = ([c.param for c in self.copies] + [t.module for t in self.tokens]
                        + [lora.module for lora in self.lora])

    def _copy_fits(self, params: dict, copy) -> bool:
        target, value = params.get(copy.param), self.tensors[copy.key]
        if target is None or tuple(target.shape) != tuple(value.shape):
            self.notes.append(f"{copy.key}: no base parameter {copy.param} of shape {list(value.shape)}")
            return False
        return True

    def _tokens_fit(self, modules: dict, tokens) -> bool:
        weight = modules[tokens.module].weight
        if problem := TOKENS.rows_problem(list(tokens.indices), tokens.rows(self.tensors.__getitem__).shape,
                                          weight.shape):
            self.notes.append(f"{tokens.module}: {problem}: PEFT cannot load it either (see shapes)")
            return False
        return True

    def _lora_fits(self, modules: dict, lora) -> bool:
        module = modules[lora.module]
        weight = module.weight
        shape = tuple(lora.delta(lambda key: torch.empty(self.tensors[key].shape, device="meta")).shape)  # no math
        if shape != tuple(weight.shape):
            dims = lora.kind.dims_from_weight(weight.shape)
            self.notes.append(f"{lora.module}: ΔW {list(shape)} does not fit its {lora.kind.module_type} weight "
                              f"{list(weight.shape)} (in/out {dims}): PEFT cannot load it either (see base-match)")
            return False
        if lora.bias_delta(self.tensors.__getitem__) is not None and getattr(module, "bias", None) is None:
            self.notes.append(f"{lora.module}: lora_B.bias but the base layer has no bias (PEFT refuses to merge it)")
        return True

    def apply(self, modules: dict[str, torch.nn.Module], params: dict[str, torch.nn.Parameter], *,
              shared: set[int] = frozenset(), tokens: bool = True) -> None:
        """Fold every entry whose module is in ``modules`` (name -> module, full names) into its weights in place.
        ``params``: name -> parameter for the copies; ``shared``: ids of tied weights (untied before a LoRA fold);
        ``tokens=False``: token rows are written elsewhere (the streamed run writes them by weight identity)."""
        get = self.tensors.__getitem__
        for copy in self.copies:
            if copy.module in modules or copy.param in params:
                _apply_copy(modules, params, copy, self.tensors[copy.key], [])
        for trained in self.tokens if tokens else ():
            if trained.module in modules:
                TOKENS.fold(modules[trained.module], trained.indices, trained.rows(get))
        for lora in self.lora:
            module = modules.get(lora.module)
            if module is None:
                continue
            bias_delta = lora.bias_delta(get)
            if bias_delta is not None and getattr(module, "bias", None) is None:
                bias_delta = None
            lora.kind.fold(module, lora.factors(get), magnitude=lora.magnitude(get), bias_delta=bias_delta,
                           untie=id(module.weight) in shared)


@torch.no_grad()
def apply_adapter_reference(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor], *,
                            targets: set[str] | None | object = _RESOLVE, notes: list[str] | None = None) -> list[str]:
    """Fold what PEFT will load from the adapter into ``model``'s weights in place, by hand; returns what changed.

    ``targets``: the modules PEFT wraps (default: ``target_modules`` resolved on ``model``; None: every module with
    tensors). Saved tensors that PEFT will not apply, or that do not fit the base, change nothing; ``notes``
    receives one line per reason. (The dynamic run folds the same ``ReferenceFold`` one layer at a time instead,
    into fp32 copies: ``harness.numerics.streamed``.)
    """
    fold = ReferenceFold(model, config, tensors, targets=targets)
    fold.apply(dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False)),
               shared=shared_parameters(model))
    if notes is not None:
        notes.extend(f"reference: {line}" for line in fold.notes)
    return fold.changed


def _apply_copy(modules: dict, params: dict, copy, value: torch.Tensor, skipped: list[str]) -> bool:
    """A ``modules_to_save`` copy becomes the module's own parameter (PEFT wraps a copy of the module, so a tied
    partner keeps the base value); an ``embedding_layer`` / ``bias`` tensor is loaded into the base parameter."""
    target = params.get(copy.param)
    if target is None or tuple(target.shape) != tuple(value.shape):
        skipped.append(f"{copy.key}: no base parameter {copy.param} of shape {list(value.shape)}")
        return False
    if copy.role == "modules_to_save":
        owner, _, leaf = copy.param.rpartition(".")
        setattr(modules[owner], leaf, torch.nn.Parameter(value.to(target.device, target.dtype), requires_grad=False))
    else:
        target.copy_(value.to(target.dtype))
    return True


# ---------------------------------------------------------------------------------------------
# Running probes


def probe_inputs(model: torch.nn.Module, probe: ProbeBatch, *, mask: str | None = DETECT,
                 dtype: torch.dtype | None = None) -> dict:
    """The forward kwargs of ``probe`` for ``model``, by the probe's ``feed`` (cast to its dtype and device;
    ``dtype``: to this one instead, e.g. fp32 for the streamed reference of a bf16 model). ``mask``: the keyword
    that carries the probe's image-row mask (None: none), by default the model family's (``probes.mask_kwarg``)."""
    param = next(model.parameters())
    dtype = dtype or param.dtype
    kwargs: dict = {"attention_mask": probe.attention_mask.to(param.device)}
    if probe.feed == "input_ids":
        kwargs["input_ids"] = probe.input_ids.to(param.device)
    elif probe.feed == "model-embeds":
        text = model.get_input_embeddings()(probe.input_ids.to(param.device))
        image = probe.inputs_embeds.to(text.device, text.dtype)
        kwargs["inputs_embeds"] = torch.where(probe.im_mask.to(text.device)[..., None], image, text).to(dtype)
    else:
        kwargs["inputs_embeds"] = probe.inputs_embeds.to(param.device, dtype)
    if mask == DETECT:
        mask = mask_kwarg(model)
    if mask:
        kwargs[mask] = probe.im_mask.to(param.device)
    return kwargs


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probe: ProbeBatch, *, mask: str | None = DETECT,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 CPU logits of ``model`` on the probe (inputs cast to the model's dtype and device, or to ``dtype``)."""
    return model(**probe_inputs(model, probe, mask=mask, dtype=dtype)).logits.float().cpu()


@torch.no_grad()
def first_non_finite_module(model: torch.nn.Module, probe: ProbeBatch, *, mask: str | None = DETECT,
                            dtype: torch.dtype | None = None) -> str | None:
    """The first module, in execution order, whose output holds NaN/Inf at a real (non-padding) position.

    Reruns the probe with a forward hook on every module (only called once outputs are known to be non-finite).
    A PEFT wrapper's names are reported as the base module's (``base_model.model.`` dropped, the LoRA part named).
    """
    real = probe.attention_mask.bool()
    found: list[str] = []

    def hook(name: str):
        def check(_module, _inputs, output) -> None:
            if not found and not _finite_output(output, real):
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        model(**probe_inputs(model, probe, mask=mask, dtype=dtype))
    except Exception:  # noqa: BLE001 - the locator must not turn a non-finite output into a crash
        pass
    finally:
        for handle in handles:
            handle.remove()
    return _base_module_name(found[0]) if found else None


def _finite_output(output, real: torch.Tensor) -> bool:
    tensor = output if isinstance(output, torch.Tensor) else next(
        (t for t in (output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list))
                     else ()) if isinstance(t, torch.Tensor)), None)
    if tensor is None or not tensor.is_floating_point():
        return True
    if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(real.shape):
        tensor = tensor[real.to(tensor.device)]
    return bool(torch.isfinite(tensor).all())


def _base_module_name(name: str) -> str:
    """``base_model.model.m.q_proj.lora_B.default`` -> ``m.q_proj (its lora_B)``."""
    from harness.model.peft_keys import strip_prefix

    parts = strip_prefix(name).split(".")
    for index, part in enumerate(parts):
        if part.startswith("lora_") or part in ("base_layer", "modules_to_save", "original_module"):
            return ".".join(parts[:index]) + (f" (its {part})" if part != "base_layer" else "")
    return ".".join(parts)
