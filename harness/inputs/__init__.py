"""Safe readers of untrusted inputs: adapter directories, weights files, model directories, DeepSpeed checkpoints.

Nothing here writes into an input or runs a pickle: safetensors headers are validated before any
library reads them, ``.bin`` pickles are disassembled before a ``weights_only`` load. The names below
are imported on first use, so ``harness.inputs.deepspeed`` (detection) stays free of torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterInputs": "adapter_dir", "read_adapter": "adapter_dir", "read_adapter_tensors": "adapter_dir",
    "InputError": "errors", "WeightsError": "errors",
    "TensorInfo": "weights", "WeightFile": "weights", "inspect_weight_file": "weights",
    "parse_safetensors_header": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
