"""Read-only, untrusted view of a model directory's weights, tensor by tensor.

Safetensors files (single or sharded) are validated by ``harness.inputs`` before use
and read through a private mmap; ``.bin`` files only after the pickle scan, with
``weights_only=True``. Nothing is written, nothing is loaded whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.inputs.errors import InputError
from harness.inputs.files import check_inside, read_model_config
from harness.inputs.weights import TensorInfo, WeightFile, inspect_weight_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class ModelDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory; pass the model directory written by save_pretrained")
        root = self.path.resolve()
        self.config: dict = read_model_config(self.path)
        files = sorted(p for p in self.path.glob("*.safetensors") if p.name not in ADAPTER_FILES)
        if not files:
            files = sorted(p for p in self.path.glob("*.bin") if p.name not in ADAPTER_FILES)
        if not files:
            raise InputError(f"{self.path}: no model weights (*.safetensors or *.bin); pass a saved model directory")
        for path in files:
            check_inside(path, root)  # a symlink out of the model directory is refused, as for adapters
        self.files: list[WeightFile] = [inspect_weight_file(p, role="foreign") for p in files]
        broken = [wf for wf in self.files if not wf.readable]
        if broken:
            raise InputError(f"{broken[0].path}: unreadable weights ({broken[0].error}); re-save the model")
        self._where: dict[str, WeightFile] = {k: wf for wf in self.files for k in wf.tensors}

    @property
    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """A zero-copy view (safetensors) of one tensor; do not modify it."""
        return self._where[key].get_tensor(key)

    def release(self, key: str) -> None:
        """Drop the pages of one tensor from this process: a pass over a 7B checkpoint would otherwise keep every
        page it read resident (mapped file pages count in RSS), 16 GB for a bf16 7B."""
        if (where := self._where.get(key)) is not None:
            where.release(key)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(self.info(k).shape), self.info(k).dtype) for k in self._where}

    def custom_code_files(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("*.py"))

    def tokenizer_files(self) -> list[str]:
        return [name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def declared_dtype(self) -> str | None:
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return str(value).replace("torch.", "") if value else None
