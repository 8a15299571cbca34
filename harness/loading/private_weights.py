"""Give a freshly loaded CPU model private memory for its weights, read from the files, not the mapping.

Why: transformers loads safetensors memory-mapped. A merge in place then copies every touched 4 KiB
page on write (seconds for a 1.7 GB model), and PEFT's ``safe_merge`` clones each weight while the
mapped originals stay resident (1.6x the model in RSS). Reading each tensor's bytes straight from the
file into a private tensor, never touching the mapped pages, costs one sequential read and keeps the
process at one copy of the weights. Values are bit-identical: the same bytes, the same dtype.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from harness.inputs.errors import InputError
from harness.inputs.model_dir import ModelDir


def privatize_weights(model: torch.nn.Module, model_dir: str | Path) -> int:
    """Replace each CPU parameter stored in ``model_dir``'s safetensors files (same name, shape and dtype)
    by a private copy read from the file; return the bytes moved. Parameters that share storage (tied
    weights), were converted on load, or are not in a safetensors file are left as they are."""
    try:
        index = ModelDir(model_dir)
    except InputError:
        return 0
    keys = set(index.keys)
    shared = Counter(p.data_ptr() for p in model.parameters())
    handles: dict[Path, object] = {}
    moved = 0
    try:
        for name, param in model.named_parameters():
            if param.device.type != "cpu" or shared[param.data_ptr()] > 1 or name not in keys:
                continue
            info = index.info(name)
            if (info.begin is None or tuple(info.shape) != tuple(param.shape)
                    or info.dtype != str(param.dtype).removeprefix("torch.")):
                continue
            fresh = torch.empty(param.shape, dtype=param.dtype)
            target = fresh.view(-1).view(torch.uint8).numpy() if fresh.numel() else None
            if target is None or target.nbytes != info.nbytes:
                continue
            handle = handles.get(info.file)
            if handle is None:
                handle = handles[info.file] = open(info.file, "rb")  # noqa: SIM115 - closed below
            handle.seek(info.begin)
            if handle.readinto(memoryview(target)) != info.nbytes:
                continue  # a truncated file: keep what transformers loaded
            param.data = fresh
            moved += info.nbytes
    finally:
        for handle in handles.values():
            handle.close()
    return moved
