"""Loading a base (or merged) model directory the way users do: AutoModelForCausalLM, remote code when trusted."""

from __future__ import annotations

import contextlib
import contextvars
import shutil
from pathlib import Path

import torch
import transformers

from harness.compat import ATTN_IMPLEMENTATION_KWARG, DTYPE_KW, FLASH_ATTENTION, flash_attn_installed
from harness.loading.model_code import building_model, refuse_untrusted_code, remote_code_allowed
from harness.loading.private_weights import privatize_weights
from harness.loading.records import capture_warnings

_adjustments: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("plora_adjustments", default=None)


@contextlib.contextmanager
def recording_adjustments(into: list[str]):
    """Collect the adjustments made while loading (eager instead of flash attention, ...) into ``into``, for the
    report: the harness never changes how a model runs without saying so."""
    token = _adjustments.set(into)
    try:
        yield into
    finally:
        _adjustments.reset(token)


def note_adjustment(text: str) -> None:
    sink = _adjustments.get()
    if sink is not None and text not in sink:
        sink.append(text)


def model_config(model_dir: Path, *, trust_remote_code: bool | None = None):
    """The config object ``from_pretrained`` will build for ``model_dir`` (the model's own config class when it
    ships one), with flash attention replaced by eager where flash_attn is missing. Decisions are taken on this
    object, never on config.json's text: config classes rewrite fields (the real XComposer one turns a missing
    or None ``attn_implementation`` into flash_attention_2, and transformers 4.57+ passes None on every load).
    ``trust_remote_code``: the user's decision (default: the run's, ``model_code.remote_code_consent``); a
    directory that ships code is refused without it (``UntrustedCode``)."""
    from transformers import AutoConfig

    trusted = remote_code_allowed() if trust_remote_code is None else trust_remote_code
    refuse_untrusted_code(model_dir, trusted)
    with building_model(model_dir):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trusted)
    asked = _attention_asked(config)
    if asked in FLASH_ATTENTION and not flash_attn_installed():
        _set_attention(config, "eager")
        note_adjustment(f"{model_dir}: the model's config class asks for attn_implementation={asked!r} and flash_attn "
                        "is not installed: loaded with attn_implementation='eager' (outputs agree within the dtype "
                        "tolerance; pass it to from_pretrained yourself outside the harness)")
    return config


def _attention_asked(config) -> str | None:
    own = getattr(config, "attn_implementation", None)  # the remote code's own switch (XComposer reads this one)
    internal = getattr(config, "_attn_implementation", None)  # transformers' (4.36+)
    return own if own in FLASH_ATTENTION else internal if internal in FLASH_ATTENTION else own or internal


def _set_attention(config, value: str) -> None:
    config.attn_implementation = value
    with contextlib.suppress(AttributeError, ValueError, TypeError):
        config._attn_implementation = value


def load_base(base_dir: Path, *, dtype: torch.dtype, device: str = "cpu", warnings_into: list[str] | None = None,
              private: bool = False, trust_remote_code: bool | None = None, **kwargs) -> torch.nn.Module:
    """AutoModelForCausalLM with the user's trust decision, an explicit dtype (never "auto") and the config
    object decided by ``model_config`` (so what was inspected is what runs).

    This runs the directory's own code only with the user's consent: ``trust_remote_code`` (default: the run's
    decision, set from the plan by the engine and by ``check_trained``); without it a directory that ships code
    is refused (``UntrustedCode``, one line naming the files) before transformers sees it. ``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before; warnings
    and transformers log records go to ``warnings_into`` when given. ``output_loading_info=True`` returns
    (model, info). ``private=True`` (for a model about to be merged in place on the CPU) re-reads the weights
    into private memory (``harness.loading.private_weights``): same values, no copy-on-write faults.
    """
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    trusted = remote_code_allowed() if trust_remote_code is None else trust_remote_code
    refuse_untrusted_code(base_dir, trusted)
    sink: list[str] = [] if warnings_into is None else warnings_into
    quantized = _quantized_load(base_dir, kwargs)
    if quantized:  # bitsandbytes places its packed weights itself (users pass device_map); .to() is refused
        kwargs.setdefault("device_map", device)
    with capture_warnings(sink), building_model(base_dir):
        try:
            if "config" not in kwargs:
                kwargs["config"] = model_config(base_dir, trust_remote_code=trusted)
            if ATTN_IMPLEMENTATION_KWARG and _attention_asked(kwargs["config"]) == "eager":
                kwargs.setdefault("attn_implementation", "eager")  # or transformers passes None, mapped to flash
            model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trusted, **{DTYPE_KW: dtype},
                                                         **kwargs)
        except ModuleNotFoundError as err:
            if "transformers_modules" in str(err) and "." in base_dir.name:
                from harness.inputs.errors import InputError

                raise InputError(
                    f"{base_dir}: transformers {transformers.__version__} cannot import remote code from a folder "
                    f"whose name contains '.'; load it from a copy or symlink named without dots "
                    f"(e.g. {base_dir.name.replace('.', '_')}) or upgrade transformers."
                ) from None
            raise
    loaded, info = model if isinstance(model, tuple) else (model, None)  # output_loading_info=True gives both
    if private and device == "cpu" and not quantized:
        privatize_weights(loaded, base_dir)
    loaded = (loaded if quantized else loaded.to(device)).eval()
    return (loaded, info) if info is not None else loaded


def _quantized_load(base_dir: Path, kwargs: dict) -> bool:
    """Whether this load goes through bitsandbytes: a ``quantization_config`` passed (QLoRA's on-the-fly
    quantization) or declared by the directory's config.json (a base saved quantized)."""
    from harness.model.quantization import read_quantization

    if kwargs.get("quantization_config") is not None:
        return True
    declared = read_quantization(base_dir)
    return declared is not None and declared.is_bitsandbytes


def copy_model_extras(base_dir: Path, out_dir: Path) -> list[str]:
    """What the official merge script ships beside the weights: custom code and tokenizer files."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and (path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens"))):
            if not (out_dir / path.name).exists():
                shutil.copyfile(path, out_dir / path.name)
                copied.append(path.name)
    return copied


