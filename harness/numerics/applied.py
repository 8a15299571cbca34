"""What PEFT will apply from a saved adapter to one base: the single reading of adapter tensors that the reference
and ``merged-matches`` share.

PEFT loads with ``strict=False``: LoRA tensors of modules that ``target_modules`` does not name are dropped (the
module never gets a LoRA layer), a ``modules_to_save`` copy counts only for a module the config names, and an
``nn.Embedding``'s LoRA must be saved as ``lora_embedding_A/B``, and trainable token rows count only for a module
``trainable_token_indices`` names (a list names the input embedding). Tensors PEFT will not apply get no effect in the
reference and no expectation in a merged checkpoint; ``AdapterPlan.ignored`` says why for each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.model.layer_kinds import TOKENS, LayerKind, LowRank, kind_of_parts
from harness.model.lora_math import module_scaling
from harness.model.peft_keys import as_list, classify_key, strip_prefix

if TYPE_CHECKING:
    import torch

Getter = Callable[[str], "torch.Tensor"]
MAGNITUDE = "lora_magnitude_vector"


@dataclass
class LoraModule:
    """One module PEFT gives a LoRA layer, with the saved keys of its parts."""

    module: str  # base module name, e.g. "model.layers.0.self_attn.q_proj"
    kind: LayerKind
    keys: dict[str, str]  # part ("lora_A", "lora_B", "lora_B.bias", "lora_magnitude_vector", ...) -> saved key
    rank: int
    scaling: float
    kind_from_base: bool = True  # False: the base module is unknown, the kind was read from the saved parts

    def delta(self, get: Getter) -> torch.Tensor:
        """ΔW in the layout the base weight is stored in (fp32)."""
        down, up = self.kind.parts
        return self.kind.delta(get(self.keys[down]), get(self.keys[up]), self.scaling)

    def factors(self, get: Getter) -> LowRank:
        """ΔW as its factors (fp32 weights take them in one fused product: ``LayerKind.fold``)."""
        down, up = self.kind.parts
        return LowRank(get(self.keys[down]), get(self.keys[up]), self.scaling)

    def magnitude(self, get: Getter) -> torch.Tensor | None:
        return get(self.keys[MAGNITUDE]) if MAGNITUDE in self.keys else None

    def bias_delta(self, get: Getter) -> torch.Tensor | None:
        key = self.keys.get(f"{self.kind.parts[1]}.bias")
        return self.kind.bias_delta(get(key), self.scaling) if key else None

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias(self) -> str:
        return f"{self.module}.bias"


@dataclass
class SavedCopy:
    """A saved tensor that replaces a base parameter's value."""

    param: str  # the base parameter, e.g. "lm_head.weight"
    key: str  # the saved adapter key
    role: str  # "modules_to_save" (PEFT wraps a trained copy of the module), "embedding_layer" (loaded into the
    # base embedding, save_embedding_layers) or "bias" (bias="all"/"lora_only": loaded into the base bias)

    @property
    def module(self) -> str:
        return self.param.rsplit(".", 1)[0]


@dataclass
class TrainedTokens:
    """Trainable tokens (``layer_kinds.TOKENS``): saved rows that replace rows ``indices`` of a module's weight."""

    module: str  # e.g. "model.embed_tokens"
    key: str  # the saved "<module>.token_adapter.trainable_tokens_delta"
    indices: tuple[int, ...]

    def rows(self, get: Getter) -> torch.Tensor:
        return get(self.key)

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


@dataclass
class AdapterPlan:
    lora: list[LoraModule] = field(default_factory=list)
    copies: list[SavedCopy] = field(default_factory=list)
    tokens: list[TrainedTokens] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # saved key -> why PEFT will not apply it

    def lora_of(self, module: str) -> LoraModule | None:
        return next((m for m in self.lora if m.module == module), None)

    def notes(self, limit: int = 3) -> list[str]:
        """One line per reason, with examples, for a report."""
        by_reason: dict[str, list[str]] = {}
        for key, why in self.ignored.items():
            by_reason.setdefault(why, []).append(key)
        return [f"{len(keys)} saved tensor(s) get no effect in the reference: {why} (e.g. {keys[0]})"
                for why, keys in list(by_reason.items())[:limit]]


def names_module(entries: Iterable[str], module: str) -> bool:
    """``module`` is ``entry`` or ends with ``.entry`` (how PEFT matches ``modules_to_save`` names)."""
    return any(module == entry or module.endswith("." + entry) for entry in entries)


def token_indices(config: dict, module: str, input_embedding: str | None = None) -> tuple[list | None, str | None]:
    """``(indices, None)``: the rows ``trainable_token_indices`` trains in ``module``; ``(None, why not)`` when PEFT
    gives ``module`` no token adapter. A list names the input embedding (PEFT's ``get_input_embeddings``;
    ``input_embedding`` None: unknown, the saved module is taken to be it); a dict names modules as
    ``modules_to_save`` does."""
    value = config.get("trainable_token_indices")
    if value is None:
        return None, "trainable_token_indices is not set in adapter_config.json, so PEFT makes no token adapter"
    if isinstance(value, dict):
        entry = next((name for name in value if isinstance(name, str) and names_module([name], module)), None)
        if entry is None:
            return None, "trainable_token_indices does not name its module"
        return value[entry], None
    if input_embedding is not None and module != input_embedding:
        return None, (f"trainable_token_indices is a list, so PEFT trains tokens of the input embedding "
                      f"{input_embedding} only")
    return value, None


def plan_adapter(config: dict, keys: Iterable[str], shape_of: Callable[[str], tuple], *,
                 kinds: Mapping[str, LayerKind | None] | None = None, targets: set[str] | None = None,
                 input_embedding: str | None = None) -> AdapterPlan:
    """Read saved adapter ``keys`` the way PEFT applies them to a base.

    ``kinds``: module name -> layer kind of the base's modules (None for a module of a kind PEFT's LoRA has but this
    harness does not model); without it, modules are taken to exist and their kind is read from the saved parts.
    ``targets``: the modules ``target_modules`` resolves to on the base (``harness.model.targets``); None: every
    module with tensors. ``input_embedding``: the base's input embedding (where a list of trainable tokens goes).
    """
    plan = AdapterPlan()
    grouped: dict[str, dict[str, str]] = {}
    saved_modules = as_list(config.get("modules_to_save"))
    for key in keys:
        info = classify_key(key, config)
        if info.kind == "lora" and info.adapter_name is not None:
            plan.ignored[key] = f"the adapter name {info.adapter_name!r} is left in the key"
        elif info.kind == "lora":
            part = info.lora_kind + (".bias" if key.endswith(".bias") else "")
            grouped.setdefault(info.module, {})[part] = key
        elif info.kind == "modules_to_save" or (info.kind == "embedding_layer" and ".base_layer." not in key
                                                 and names_module(saved_modules, info.module)):
            # a bare "lm_head.weight" is the trained copy when modules_to_save names lm_head (PEFT loads it into
            # the wrapper); save_embedding_layers writes "<embedding>.base_layer.weight" instead
            param = strip_prefix(key).replace(f".modules_to_save.{info.adapter_name}.", ".")
            if names_module(saved_modules, info.module):
                plan.copies.append(SavedCopy(param, key, "modules_to_save"))
            else:
                plan.ignored[key] = "modules_to_save in adapter_config.json does not name its module"
        elif info.kind == "embedding_layer":
            plan.copies.append(SavedCopy(f"{info.module}.weight", key, "embedding_layer"))
        elif info.kind == "bias":
            plan.copies.append(SavedCopy(f"{info.module}.bias", key, "bias"))
        elif info.kind == "trainable_tokens":
            _plan_tokens(plan, config, key, info, shape_of, kinds, input_embedding)
        else:
            plan.ignored[key] = f"a {info.kind} key, not applied by a LoRA load"
    for module, parts in sorted(grouped.items()):
        _plan_module(plan, config, module, parts, shape_of, kinds, targets)
    return plan


def _plan_module(plan: AdapterPlan, config: dict, module: str, parts: dict[str, str], shape_of, kinds, targets) -> None:
    def ignore(why: str) -> None:
        plan.ignored.update({key: why for key in parts.values()})

    if kinds is not None and module not in kinds:
        return ignore("the base has no such module")
    if targets is not None and module not in targets:
        return ignore("target_modules does not name the module, so PEFT gives it no LoRA layer and drops the tensors")
    kind = kinds.get(module) if kinds is not None else kind_of_parts(parts)
    if kind is None:
        return ignore("a layer kind this harness does not model")
    down, up = kind.parts
    if down not in parts or up not in parts:
        other = sorted(set(parts) - {MAGNITUDE})
        return ignore(f"a {kind.module_type} is saved as {down}/{up}, the adapter has {other}")
    shape = tuple(shape_of(parts[down]))
    if len(shape) != 2 or shape[0] == 0:
        return ignore(f"{down} is not a non-empty matrix {list(shape)}")
    rank = int(shape[0])
    plan.lora.append(LoraModule(module, kind, dict(parts), rank, module_scaling(config, module, rank=rank),
                                kind_from_base=kinds is not None))


def _plan_tokens(plan: AdapterPlan, config: dict, key: str, info, shape_of, kinds, input_embedding) -> None:
    """One saved ``trainable_tokens_delta``: applied when PEFT gives its module a token adapter with these rows."""
    if info.adapter_name is not None:
        plan.ignored[key] = f"the adapter name {info.adapter_name!r} is left in the key"
        return
    indices, why = token_indices(config, info.module, input_embedding)
    if indices is None:
        plan.ignored[key] = why
        return
    if kinds is not None and info.module not in kinds:
        plan.ignored[key] = "the base has no such module"
        return
    kind = kinds.get(info.module) if kinds is not None else None
    if kinds is not None and (kind is None or kind.name not in TOKENS.module_types):
        plan.ignored[key] = "trainable tokens on a module that is neither an embedding nor a linear layer"
        return
    if problem := TOKENS.rows_problem(indices, shape_of(key)):
        plan.ignored[key] = problem
        return
    plan.tokens.append(TrainedTokens(info.module, key, tuple(indices)))
