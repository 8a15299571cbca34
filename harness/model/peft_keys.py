"""PEFT's adapter key grammar: what each saved key is, and the names PEFT gives adapter tensors.

One home for ``base_model.model.`` and the LoRA tensor part names, read by the static checks,
the reference, the loading paths, the DeepSpeed conversion and the training audit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.model import families

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."


@functools.cache
def lora_parts() -> tuple[str, ...]:
    """The LoRA layer attributes that hold adapter tensors, as the installed PEFT names them
    (``LoraLayer.adapter_layer_names``: no ``lora_magnitude_vector`` before DoRA, peft 0.9).
    Asked on first use, so reading key names does not import PEFT."""
    from peft.tuners.lora import LoraLayer

    return tuple(LoraLayer.adapter_layer_names)


@functools.cache
def _saved_lora_key() -> re.Pattern:
    return re.compile(
        rf"^(?P<module>.+)\.(?P<part>{'|'.join(lora_parts())})\.(?P<adapter>[^.]+)(?:\.(?P<leaf>weight|bias))?$"
    )

# How each part is saved: Linear-backed parts as ".weight" (".bias" with lora_bias), raw Parameters bare,
# DoRA's magnitude bare (peft >= 0.12) or as ".weight" (earlier DoRA releases).
_LEAVES = {"lora_embedding_A": ([],), "lora_embedding_B": ([],), "lora_magnitude_vector": ([], ["weight"])}
_LINEAR_LEAVES = (["weight"], ["bias"])
# PEFT's own containers inside a wrapped model: adapter weights, saved copies, the frozen originals.
_PEFT_CONTAINERS = re.compile(
    r"\.(lora_[A-Za-z_]+|modules_to_save|original_module|token_adapter|trainable_tokens_[a-z]+)(\.|$)"
)

@dataclass
class KeyInfo:
    key: str
    kind: str  # lora | bias | modules_to_save | trainable_tokens | embedding_layer | branch | base_layer | unknown
    module: str = ""  # module path without the PEFT prefix
    lora_kind: str | None = None  # lora_A / lora_B / ... for kind == "lora"
    adapter_name: str | None = None  # a name left in the key (".default.")
    prefixes: int = 0  # how many times "base_model.model." starts the key


@dataclass
class KeyAnalysis:
    infos: list[KeyInfo] = field(default_factory=list)
    family: families.ModelFamily = families.GENERIC  # detected from the keys: whose branch the "branch" keys are

    def of(self, *kinds: str) -> list[KeyInfo]:
        return [i for i in self.infos if i.kind in kinds]

    @property
    def lora(self) -> list[KeyInfo]:
        return self.of("lora")



def as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [v for v in value if isinstance(v, str)]
    return [value] if isinstance(value, str) else []


@functools.cache
def _embedding_layer_names() -> tuple[str, ...]:
    try:
        from peft.utils.other import EMBEDDING_LAYER_NAMES
    except ImportError:  # pragma: no cover - other PEFT layouts
        EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
    return tuple(EMBEDDING_LAYER_NAMES)




def analyse(keys: Iterable[str], config: dict) -> KeyAnalysis:
    """Every saved key classified, against the model family the keys themselves show (without a base model they
    are the only evidence: e.g. XComposer's ``Plora_A`` weights saved by a name filter on ``lora_``)."""
    keys = list(keys)
    family = families.detect(names=[strip_prefix(key) for key in keys])
    return KeyAnalysis([classify_key(key, config, family) for key in keys], family)


def classify_key(key: str, config: dict, family: families.ModelFamily | None = None) -> KeyInfo:
    """Name one saved key by what it is, following PEFT's save format (``get_peft_model_state_dict``).

    Kinds: ``lora`` (lora_A/B, lora_embedding_A/B, lora_magnitude_vector, lora_B.bias), ``bias``
    (bias="all"/"lora_only"), ``modules_to_save``, ``trainable_tokens``, ``embedding_layer``
    (save_embedding_layers), ``base_layer`` (base weights: a full PeftModel state dict), ``branch``
    (the base model's own low-rank branch of ``family``, e.g. XComposer's PLoRA; ``family`` None: the family
    detected from this key alone) and ``unknown``.
    """
    rest, prefixes = key, 0
    while rest.startswith(PREFIX):
        rest, prefixes = rest[len(PREFIX) :], prefixes + 1
    parts = rest.split(".")
    info = KeyInfo(key=key, kind="unknown", prefixes=prefixes)

    # LoRA tensors first: target_parameters nests wrappers, so ".base_layer.lora_A.weight" is a LoRA key.
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in lora_parts():
            info.kind, info.lora_kind = "lora", parts[index]
            info.module = ".".join(p for p in parts[:index] if p != "base_layer")
            tail = parts[index + 1 :]
            if tail not in _LEAVES.get(parts[index], _LINEAR_LEAVES):
                if tail and tail[0] not in ("weight", "bias"):
                    info.adapter_name = tail[0]
                else:
                    info.kind = "unknown"
            return info
    # bias="all" / "lora_only": PEFT saves biases too, those of LoRA layers as "<module>.base_layer.bias".
    if parts[-1] == "bias" and config.get("bias") in ("all", "lora_only"):
        info.kind = "bias"
        info.module = ".".join(p for p in parts[:-1] if p != "base_layer")
        return info
    if "modules_to_save" in parts:
        index = parts.index("modules_to_save")
        info.kind, info.module = "modules_to_save", ".".join(parts[:index])
        if index + 1 < len(parts) - 1:
            info.adapter_name = parts[index + 1]
        return info
    if "trainable_tokens_delta" in parts or "token_adapter" in parts:
        # "<module>.token_adapter.trainable_tokens_delta" (layer_kinds.TOKENS); a model state dict adds ".<adapter>"
        info.kind = "trainable_tokens"
        index = parts.index("token_adapter") if "token_adapter" in parts else parts.index("trainable_tokens_delta")
        info.module = ".".join(parts[:index])
        tail = parts[index + 2:] if parts[index] == "token_adapter" else parts[index + 1:]
        if tail:
            info.adapter_name = tail[0]
        return info
    # save_embedding_layers (automatic when embed_tokens/lm_head are targeted): PEFT saves the embedding
    # weights themselves, as "<embed>.base_layer.weight" when wrapped, and restores them on load.
    if parts[-1] == "weight" and any(p in _embedding_layer_names() for p in parts[:-1]):
        info.kind = "embedding_layer"
        info.module = ".".join(p for p in parts[:-1] if p != "base_layer")
        return info
    if "base_layer" in parts or "original_module" in parts:
        info.kind = "base_layer"
        return info
    if (family or families.detect(names=[rest])).is_branch_param(rest):
        info.kind, info.module = "branch", rest
        return info
    for entry in as_list(config.get("modules_to_save")):
        for index in range(len(parts) - 1):
            sub = ".".join(parts[: index + 1])
            if sub == entry or sub.endswith("." + entry):
                info.kind, info.module = "modules_to_save", sub
                return info
    info.module = rest
    return info


def strip_prefix(name: str) -> str:
    """A module or parameter name as in the base model (PEFT's ``base_model.model.`` removed)."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def split_adapter_tensors(tensors: dict[str, torch.Tensor]):
    """(module -> {lora_A, lora_B, ...: tensor}, other tensors by base name)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = strip_prefix(key)
        for kind in lora_parts():
            marker = f".{kind}"
            if marker in name:
                lora.setdefault(name.split(marker)[0], {})[kind] = value
                break
        else:
            others[name] = value
    return lora, others



_SAVED_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<rest>.+)$")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta\.(?P<adapter>[^.]+)$")


def peft_key(key: str, adapter_name: str = "default") -> str | None:
    """The key PEFT's ``get_peft_model_state_dict`` saves for model key ``key``, or ``None`` if not this adapter's.

    ``m.lora_A.default.weight`` → ``m.lora_A.weight``; ``m.lora_embedding_A.default`` → ``m.lora_embedding_A``;
    DoRA ``m.lora_magnitude_vector.default.weight`` → ``m.lora_magnitude_vector``;
    ``m.modules_to_save.default.weight`` → ``m.weight``. Matching is by whole path components, so a base
    model's ``Plora_A`` is never taken for ``lora_A``.
    """
    if (m := _saved_lora_key().match(key)) and m["adapter"] == adapter_name:
        if m["part"] == "lora_magnitude_vector" or m["leaf"] is None:
            return f"{m['module']}.{m['part']}"
        return f"{m['module']}.{m['part']}.{m['leaf']}"
    if (m := _SAVED_KEY.match(key)) and m["adapter"] == adapter_name:
        return f"{m['module']}.{m['rest']}"
    if (m := _TOKENS_KEY.match(key)) and m["adapter"] == adapter_name:
        return f"{m['module']}.token_adapter.trainable_tokens_delta"
    return None


def extract_adapter_tensors(state_dict: dict, adapter_name: str = "default") -> tuple[dict, list[str]]:
    """``(adapter tensors under PEFT's saved names, model keys left out)``."""
    tensors, left_out = {}, []
    for key, value in state_dict.items():
        new = peft_key(key, adapter_name)
        if new is None:
            left_out.append(key)
        else:
            tensors[new] = value.detach().contiguous().clone()
    return tensors, left_out


def base_key(param_name: str) -> str | None:
    """The base checkpoint key of a PEFT model's base parameter (``.base_layer`` removed), or None for
    PEFT's own parameters (adapter weights, modules_to_save copies)."""
    name = param_name.removeprefix(PREFIX)
    if _PEFT_CONTAINERS.search(name):
        return None
    return name.replace(".base_layer.", ".").replace(".base_layer", "")
