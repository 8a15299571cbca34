"""The seed report's path, plain ``model.load_state_dict(adapter)``, turned into a diagnosis."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.adapter_dir import read_adapter_tensors
from harness.loading.base import load_base
from harness.model import families


@dataclass
class RawLoadDiagnosis:
    """What plain ``base.load_state_dict(adapter)`` does: it must fail, and this says why (no traceback)."""

    failed: bool
    message: str
    missing_plora: list[str]  # Plora_A/B and plora_*_GN keys the adapter file does not have
    missing_total: int
    unexpected_total: int
    unexpected_examples: list[str] = field(default_factory=list)
    error_type: str | None = None  # the exception class load_state_dict raised


Diagnosis = RawLoadDiagnosis

PEFT_NOT_STATE_DICT = ("this is a PEFT adapter, not a model state dict; load it with PeftModel.from_pretrained "
                       "or merge it")


def diagnose_raw_load(model_or_base_dir: torch.nn.Module | Path | str, adapter_dir: Path | str) -> RawLoadDiagnosis:
    """The seed report's path: ``model.load_state_dict(adapter_tensors)``, turned into a diagnosis.

    Takes a loaded base model (its weights are never overwritten)
    or a base directory (loaded fresh in fp32). A strict ``load_state_dict`` copies matching keys
    before raising, so a given model is first checked for key overlap and only loaded into when
    the file shares no key with it.
    """
    adapter_dir = Path(adapter_dir)
    if isinstance(model_or_base_dir, (str, Path)):
        model = load_base(Path(model_or_base_dir), dtype=torch.float32, device="cpu")
    else:
        model = model_or_base_dir
    saved = read_adapter_tensors(adapter_dir)
    own = set(model.state_dict())
    missing = sorted(own - set(saved))
    unexpected = sorted(set(saved) - own)
    error_type = None
    if own & set(saved):  # would overwrite real weights: judge by keys instead of loading
        error_type = "RuntimeError" if (missing or unexpected) else None
    else:
        try:
            model.load_state_dict(saved)  # strict: exactly what the user ran
        except RuntimeError as err:
            error_type = type(err).__name__
    if error_type is None:
        return RawLoadDiagnosis(False, "load_state_dict accepted the adapter file: it is a full state dict", [], 0, 0)
    family = families.family_of(model)
    plora = [k for k in missing if family.is_branch_param(k)]
    message = f"{PEFT_NOT_STATE_DICT} (load_state_dict: {len(missing)} missing keys"
    if plora:
        message += (f", including {len(plora)} {family.branch_label} keys such as "
                    f"{', '.join(family.branch_key_examples(plora))}")
    message += f"; {len(unexpected)} unexpected adapter keys"
    message += f" such as {unexpected[0]})" if unexpected else ")"
    return RawLoadDiagnosis(True, message, plora, len(missing), len(unexpected), unexpected[:5], error_type)



