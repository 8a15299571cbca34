"""Reading and re-writing an adapter directory without ever touching it.

One small reader: safetensors first, ``.bin`` only through ``torch.load(weights_only=True)``
so a pickle cannot run code. (``harness.inputs`` does the full untrusted-input validation;
the loading paths only need the tensors of an adapter that already passed it.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def adapter_weights_file(adapter_dir: Path) -> Path:
    """The file PEFT would read: safetensors preferred, as PEFT does."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def read_adapter_tensors(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All adapter tensors on CPU (fresh copies, safe to modify) and the file they came from."""
    path = adapter_weights_file(Path(adapter_dir))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), path
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: not a state dict (a {type(tensors).__name__})")
    return tensors, path


def read_adapter_config(adapter_dir: str | Path) -> dict:
    return json.loads((Path(adapter_dir) / CONFIG_NAME).read_text())


def write_adapter_copy(adapter_dir: Path, out_dir: Path, *, fmt: str) -> list[Path]:
    """Re-save the adapter as ``fmt`` ("safetensors" or "bin") into ``out_dir``; returns files written."""
    tensors, _ = read_adapter_tensors(adapter_dir)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        target = out_dir / SAFETENSORS_NAME
        save_file(tensors, str(target), metadata={"format": "pt"})
    elif fmt == "bin":
        target = out_dir / BIN_NAME
        torch.save(tensors, target)
    else:
        raise ValueError(f"unknown adapter format {fmt!r}; use 'safetensors' or 'bin'")
    config = out_dir / CONFIG_NAME
    shutil.copyfile(adapter_dir / CONFIG_NAME, config)
    return [target, config]
