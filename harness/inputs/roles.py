"""What kind of directory a path is (an adapter, a model, a folder of adapters), from file names alone.

Why: a path given in the wrong role (a base model that is an adapter, an adapter that is a model) must be
answered in one line before anything is loaded, not after minutes of checks that fail for the wrong reason.
Nothing here opens a file: names and ``lstat`` only, so FIFOs and hostile files cannot hang or trick it.
"""

from __future__ import annotations

import os
from pathlib import Path

ADAPTER_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_MARKER = "config.json"


def _has(directory: Path, name: str) -> bool:
    return os.path.lexists(directory / name)


def is_adapter_dir(directory: Path) -> bool:
    """An adapter as PEFT saves it: adapter_config.json or adapter_model.*, and no model config.json."""
    return any(_has(directory, m) for m in ADAPTER_MARKERS) and not _has(directory, MODEL_MARKER)


def is_model_dir(directory: Path) -> bool:
    """A model as ``save_pretrained`` writes it: config.json and no adapter file at all."""
    return _has(directory, MODEL_MARKER) and not any(_has(directory, m) for m in ADAPTER_MARKERS)


def adapters_in_folder(directory: Path) -> list[Path]:
    """The adapters one level below ``directory`` when it is a folder of adapters (and not itself an adapter,
    a model or a DeepSpeed checkpoint), sorted by name; empty otherwise."""
    from harness.inputs.deepspeed import is_zero_checkpoint

    if not directory.is_dir() or any(_has(directory, m) for m in (*ADAPTER_MARKERS, MODEL_MARKER)):
        return []
    if is_zero_checkpoint(directory):
        return []
    found = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and not child.is_symlink():
            if _has(child, "adapter_config.json") or is_zero_checkpoint(child):
                found.append(child)
    return found
