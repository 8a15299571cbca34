"""Loading a base (or merged) model directory the way users do: AutoModelForCausalLM with remote code."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from harness.compat import ATTN_IMPLEMENTATION_KWARG, DTYPE_KW, FLASH_ATTENTION, flash_attn_installed
from harness.loading.private_weights import privatize_weights
from harness.loading.records import capture_warnings


def load_base(base_dir: Path, *, dtype: torch.dtype, device: str = "cpu", warnings_into: list[str] | None = None,
              private: bool = False, **kwargs) -> torch.nn.Module:
    """AutoModelForCausalLM with trust_remote_code and an explicit dtype (never "auto").

    ``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before; warnings and transformers log
    records go to ``warnings_into`` when given. ``output_loading_info=True`` returns (model, info).
    ``private=True`` (for a model about to be merged in place on the CPU) re-reads the weights into
    private memory (``harness.private_weights``): same values, no copy-on-write faults, one copy in RSS.
    """
    from transformers import AutoModelForCausalLM

    sink: list[str] = [] if warnings_into is None else warnings_into
    if "config" not in kwargs:
        kwargs.update(_attention_override(Path(base_dir), sink))
    with capture_warnings(sink):
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True, **{DTYPE_KW: dtype},
                                                         **kwargs)
        except ModuleNotFoundError as err:
            if "transformers_modules" in str(err) and "." in Path(base_dir).name:
                from harness.inputs.errors import InputError

                raise InputError(
                    f"{base_dir}: transformers {transformers.__version__} cannot import remote code from a folder "
                    f"whose name contains '.'; load it from a copy or symlink named without dots "
                    f"(e.g. {Path(base_dir).name.replace('.', '_')}) or upgrade transformers."
                ) from None
            raise
    loaded, info = model if isinstance(model, tuple) else (model, None)  # output_loading_info=True gives both
    if private and device == "cpu":
        privatize_weights(loaded, base_dir)
    loaded = loaded.to(device).eval()
    return (loaded, info) if info is not None else loaded


def _attention_override(base_dir: Path, notes: list[str]) -> dict:
    """Eager attention for a config that asks for flash attention on a machine without flash_attn.

    The real InternLM-XComposer2 configs default to ``attn_implementation: "flash_attention_2"`` (the
    remote code's own switch), which fails to load on CPU-only and most CI machines. Outputs are the same
    up to the dtype tolerance; the override is recorded in ``notes`` so the report says it happened.
    """
    import json

    try:
        declared = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    asked = declared.get("attn_implementation") or declared.get("_attn_implementation")
    if asked not in FLASH_ATTENTION or flash_attn_installed():
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=True)
    config.attn_implementation = "eager"  # the remote code reads this field
    kwargs: dict = {"config": config}
    if ATTN_IMPLEMENTATION_KWARG:
        kwargs["attn_implementation"] = "eager"  # and transformers its own
    notes.append(f"{base_dir / 'config.json'} asks for {asked} and flash_attn is not installed: loaded with "
                 "attn_implementation='eager' (pass it to from_pretrained yourself outside the harness)")
    return kwargs




def copy_model_extras(base_dir: Path, out_dir: Path) -> list[str]:
    """What the official merge script ships beside the weights: custom code and tokenizer files."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and (path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens"))):
            if not (out_dir / path.name).exists():
                shutil.copyfile(path, out_dir / path.name)
                copied.append(path.name)
    return copied


