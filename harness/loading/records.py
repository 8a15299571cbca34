"""What a loading path records: missing, unexpected and not-loaded adapter keys, warnings, files.

PEFT loads with ``strict=False`` (unexpected keys are silent, missing keys only warn), so every path
records both by comparing the saved adapter keys with the adapter the model ended up holding,
independent of the PEFT version's own reporting.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from harness.model.peft_keys import lora_parts


@dataclass
class LoadRecord:
    path: str
    missing_keys: list[str] = field(default_factory=list)  # adapter keys the model expected but did not get
    unexpected_keys: list[str] = field(default_factory=list)  # saved keys the model had no place for
    not_loaded: list[str] = field(default_factory=list)  # keys present but whose values differ from the file
    warnings: list[str] = field(default_factory=list)
    files_used: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def is_clean(self) -> bool:
        """No key missing, unexpected or not loaded (a plain method: mutmut leaves ``@property`` bodies unmutated)."""
        return not (self.missing_keys or self.unexpected_keys or self.not_loaded)

    clean = property(is_clean)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    record: LoadRecord




@contextmanager
def capture_warnings(into: list[str]):
    """Collect Python warnings and transformers/PEFT log records (what users would see scroll by)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.WARNING:  # quietened (set_verbosity_error): still hear warnings
            logger.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(handler)
                logger.setLevel(level)
    into.extend(
        f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, FutureWarning))  # library churn, not the adapter
    )
    into.extend(f"{r.levelname}: {r.getMessage().splitlines()[0][:300]}" for r in records)


def _record_coverage(record: LoadRecord, model, saved: dict[str, torch.Tensor], adapter_name: str,
                     held_prefix: str = "") -> None:
    """Compare the file's keys and values with the adapter the PEFT model now holds (``held_prefix``: what the
    saved keys have in front of the model's own names, "base_model.model." for a model transformers' PEFT
    integration adapted in place, which has no PeftModel wrapper)."""
    from peft.utils import get_peft_model_state_dict

    held = {held_prefix + k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    record.missing_keys = sorted(set(record.missing_keys) | (set(held) - set(saved)))
    record.unexpected_keys = sorted(set(record.unexpected_keys) | (set(saved) - set(held)))
    for key in sorted(set(held) & set(saved)):
        value, want = held[key].detach().cpu(), saved[key]
        # Loaded means equal to the file's value, or to it rounded to the dtype the model holds it in
        # (PEFT before ~0.12 casts adapter weights to a bf16/fp16 base's dtype; later ones keep them fp32).
        if value.shape != want.shape or not (same_values(value.float(), want.float())
                                              or same_values(value, want.to(value.dtype))):
            record.not_loaded.append(key)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element by element, NaN equal to NaN: a loaded NaN is loaded (``finite`` reports it), and
    ``torch.equal`` would call it "not loaded"."""
    if a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a == b) | both_nan).all())


def _adapter_owned(model, adapter_name: str) -> set[str]:
    """Names of the parameters that belong to ``adapter_name``'s LoRA layers (structural, not by substring).

    A name filter on ``"lora_"`` also matches PLoRA's ``Plora_A`` and ``plora_glb_GN``; PEFT's own
    ``load_result.missing_keys`` does exactly that, so it is filtered here by module ownership.
    """
    from peft.tuners.lora import LoraLayer

    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for attr in lora_parts():
                container = getattr(module, attr, None)
                if container is not None and adapter_name in container:
                    sub = container[adapter_name]
                    params = sub.named_parameters() if isinstance(sub, torch.nn.Module) else [("", sub)]
                    owned.update(f"{name}.{attr}.{adapter_name}" + (f".{p}" if p else "") for p, _ in params)
    return owned


def _note_load_result(record: LoadRecord, model, result, adapter_name: str) -> None:
    """PEFT's own load result, reduced to adapter keys (it loads with strict=False and does not raise)."""
    from harness.model.peft_keys import peft_key

    owned = _adapter_owned(model, adapter_name)
    # PEFT names keys as the model holds them (".lora_A.<adapter>.weight"); the record names them as saved.
    missing = sorted(peft_key(k, adapter_name) or k for k in getattr(result, "missing_keys", []) or [] if k in owned)
    unexpected = sorted(peft_key(k, adapter_name) or k for k in getattr(result, "unexpected_keys", []) or [])
    noise = [k for k in getattr(result, "missing_keys", []) or [] if k not in owned and "lora_" in k]
    record.notes.append(f"load_result: {len(missing)} missing adapter keys, {len(unexpected)} unexpected keys")
    if noise:
        record.notes.append(f"PEFT also lists {len(noise)} non-adapter key(s) containing 'lora_' as missing "
                            f"(e.g. {noise[0]}): PLoRA names, ignored")
    record.missing_keys = sorted(set(record.missing_keys) | set(missing))
    record.unexpected_keys = sorted(set(record.unexpected_keys) | set(unexpected))


def find_unmerged_lora_wrappers(model: torch.nn.Module) -> list[str]:
    """Modules still wrapped by PEFT after a merge (``merge_and_unload`` skips names containing ``lora_``)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
