"""The seed report's path: ``model.load_state_dict(adapter_state_dict)``, turned into a diagnosis.

An adapter file holds only ``lora_A`` / ``lora_B`` tensors under PEFT's key prefix, so a plain
(strict) ``load_state_dict`` into the base fails with every base key missing — including PLoRA's
own ``Plora_A`` / ``Plora_B`` and the HD separators ``plora_*_GN``, which is what users see and
misread as "the adapter lacks PLoRA weights". The harness answers with what the file is and how
to load it instead of a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

ADVICE = "this is a PEFT adapter, not a model state dict; load it with PeftModel.from_pretrained or merge it"
_ADAPTER_KEY = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B|magnitude_vector))(\.|$)")
_PLORA_KEY = re.compile(r"(^|\.)(Plora_A|Plora_B|plora_[A-Za-z0-9]+_GN)(\.|$)")


def is_plora_key(key: str) -> bool:
    """PLoRA-owned base tensors: ``*.Plora_A.*``, ``*.Plora_B.*``, ``plora_glb_GN``, ``plora_sub_GN``."""
    return bool(_PLORA_KEY.search(key))


def is_adapter_key(key: str) -> bool:
    """PEFT LoRA tensors, matched by whole name components (``Plora_A`` is not ``lora_A``)."""
    return bool(_ADAPTER_KEY.search(key))


@dataclass(frozen=True)
class RawLoadDiagnosis:
    loaded: bool  # the state dict loaded strictly: it *is* a model state dict
    is_peft_adapter: bool  # its keys are PEFT LoRA keys
    message: str
    missing_count: int
    unexpected_count: int
    missing_plora: list[str] = field(default_factory=list)  # PLoRA keys the model needs and the file lacks
    adapter_examples: list[str] = field(default_factory=list)
    error_type: str | None = None  # the exception class load_state_dict raised, if any

    def __str__(self) -> str:
        return self.message


def diagnose_keys(model_keys: Iterable[str], file_keys: Iterable[str], *, error_type: str | None = None,
                  loaded: bool = False) -> RawLoadDiagnosis:
    """The diagnosis from key sets alone (no model needed: usable on a weight index)."""
    model_keys, file_keys = list(model_keys), list(file_keys)
    missing = [k for k in model_keys if k not in set(file_keys)]
    unexpected = [k for k in file_keys if k not in set(model_keys)]
    adapter_like = [k for k in file_keys if is_adapter_key(k)]
    is_adapter = bool(file_keys) and len(adapter_like) >= max(1, len(file_keys) // 2)
    plora = [k for k in missing if is_plora_key(k)]
    if loaded:
        message = f"the file loads as a model state dict ({len(file_keys)} tensors); it is not a PEFT adapter"
    elif is_adapter:
        shown = ", ".join(_sorted_plora(plora)[:6]) + (f" (+{len(plora) - 6} more)" if len(plora) > 6 else "")
        message = (f"{ADVICE}. load_state_dict misses {len(missing)} base key(s)"
                   + (f", among them PLoRA's own {shown}" if plora else "")
                   + f", and finds {len(unexpected)} unexpected LoRA key(s) such as {adapter_like[0]}")
    else:
        message = (f"not a state dict of this model: {len(missing)} key(s) missing (e.g. {missing[:1]}), "
                   f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    return RawLoadDiagnosis(
        loaded=loaded, is_peft_adapter=is_adapter, message=message, missing_count=len(missing),
        unexpected_count=len(unexpected), missing_plora=plora, adapter_examples=adapter_like[:5],
        error_type=error_type,
    )


def _sorted_plora(keys: list[str]) -> list[str]:
    """GN separators first (they are the surprising ones), then layer keys in model order."""
    return sorted(keys, key=lambda k: (not k.startswith("plora_"), k))


def diagnose_raw_load(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> RawLoadDiagnosis:
    """Run ``model.load_state_dict(state_dict)`` (strict, as the seed report did) and explain the outcome.

    Call it on a model you may discard: a strict load still copies any tensors whose keys match.
    """
    error_type = None
    loaded = True
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as err:
        loaded, error_type = False, type(err).__name__
    return diagnose_keys(model.state_dict().keys(), state_dict.keys(), error_type=error_type, loaded=loaded)
