"""Read an adapter directory as untrusted input, without writing to it and without running pickles.

Two kinds of trouble, on purpose kept apart:

``InputError`` (the CLI exits 2 with this one line): nothing sensible can be checked at all.
    * the path does not exist, or is neither a directory nor a weights file;
    * a file the harness would read is a symlink that resolves outside the directory
      (a Hugging Face hub snapshot, whose files link into the repo's own ``blobs/`` folder, is fine);
    * the directory holds neither an ``adapter_config.json`` nor any weights file;
    * ``adapter_config.json`` is not a regular file (a FIFO, socket, device or directory), is not strict
      JSON (UTF-8, no NaN/Infinity, bounded depth and number size), is not a JSON object, or is absurdly large.

Recorded problems (a check reports them as ``fail``; the rest of the report still runs):
    * no ``adapter_config.json`` next to the weights (``config-valid``);
    * no adapter weights next to the config, truncated / corrupt / hostile safetensors headers,
      unreadable ``.bin`` files, both formats present with different contents (``weights-readable``);
    * a ``.bin`` pickle that needs globals beyond torch's tensor-rebuild allowlist is refused and
      never executed (``unsafe-pickle``);
    * only full-model weights (``model.safetensors``, ``pytorch_model*.bin``) and no adapter weights
      (``full-checkpoint``).

"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.errors import InputError
from harness.inputs.files import check_inside, looks_like_weights, read_json_object, regular_file_problem
from harness.inputs.scan import TensorStats, scan_weight_file
from harness.inputs.weights import TensorInfo, WeightFile, inspect_weight_file

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MODEL_CONFIG_NAME = "config.json"


@dataclass
class AdapterInputs:
    """Everything read from an adapter directory (or a single weights file)."""

    path: Path  # as given, made absolute
    root: Path  # the resolved directory
    config: dict | None = None
    config_path: Path | None = None
    config_error: str | None = None
    weight_files: list[WeightFile] = field(default_factory=list)
    model_config: dict | None = None  # config.json when present (a full-model directory); {} when unreadable
    model_config_error: str | None = None  # why config.json could not be read (it is optional: recorded only)
    files: list[str] = field(default_factory=list)  # names of every entry in the directory
    _scan: dict[str, TensorStats] | None = field(default=None, repr=False)

    # -- what the checks use -------------------------------------------------------------------
    @property
    def adapter_files(self) -> list[WeightFile]:
        return [wf for wf in self.weight_files if wf.role == "adapter"]

    @property
    def foreign_files(self) -> list[WeightFile]:
        return [wf for wf in self.weight_files if wf.role == "foreign"]

    @property
    def primary(self) -> WeightFile | None:
        """The weights file the tensor checks read: a readable safetensors first, then a safe ``.bin``."""
        for role in ("adapter", "foreign"):
            candidates = [wf for wf in self.weight_files if wf.role == role and wf.readable]
            for fmt in ("safetensors", "bin"):
                for wf in candidates:
                    if wf.format == fmt:
                        return wf
        return None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Key -> metadata of every tensor in the primary file(s), no data read.

        For adapter files this is the primary file; for foreign (full-model, possibly sharded)
        files the union of all readable shards.
        """
        primary = self.primary
        if primary is None:
            return {}
        if primary.role == "adapter":
            return dict(primary.tensors)
        merged: dict[str, TensorInfo] = {}
        for wf in self.foreign_files:
            if wf.readable:
                merged.update(wf.tensors)
        return merged

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(key, tensor)`` from the primary weights file (zero-copy, file order)."""
        primary = self.primary
        if primary is None:
            return iter(())
        return primary.iter_tensors()

    def scan(self) -> dict[str, TensorStats]:
        """One pass over every tensor of the primary file (cached): finiteness, all-zero, emptiness."""
        if self._scan is None:
            self._scan = scan_weight_file(self.primary) if self.primary is not None else {}
        return self._scan

    def describe(self) -> dict:
        """The ``inputs`` entry of a report."""
        return {
            "adapter": str(self.path),
            "config": str(self.config_path) if self.config_path else None,
            "weights": [
                {"file": wf.name, "format": wf.format, "bytes": wf.size, "role": wf.role}
                for wf in self.weight_files
            ],
        }

    def close(self) -> None:
        for wf in self.weight_files:
            if wf._mmap is not None:
                try:
                    wf._mmap.close()
                except BufferError:  # a tensor view is still alive; the GC closes it later
                    pass
                else:
                    wf._mmap = None


# -- reading ---------------------------------------------------------------------------------


def read_adapter(path: str | os.PathLike, *, strict_config: bool = True) -> AdapterInputs:
    """Inspect an adapter directory (or one weights file) without executing or writing anything.

    Raises ``InputError`` only when nothing can be checked (see the module docstring); every other
    problem is recorded on the returned object for the checks to report. With
    ``strict_config=False`` an unparsable ``adapter_config.json`` is recorded instead of raised.
    """
    given = Path(os.path.abspath(os.fspath(path)))
    if not os.path.lexists(given):
        raise InputError(f"{given}: no such file or directory; pass the adapter directory written by save_pretrained")
    single_file: Path | None = None
    if given.is_dir():
        root = given.resolve()
    elif given.is_file() and given.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        root = given.parent.resolve()
        single_file = given
    else:
        raise InputError(f"{given}: not a directory; pass the adapter directory written by save_pretrained")

    inputs = AdapterInputs(path=given, root=root)
    try:
        inputs.files = sorted(os.listdir(root))
    except OSError as err:
        raise InputError(f"{root}: cannot list the directory ({err.strerror}); check its permissions") from None

    # adapter_config.json
    config_file = root / CONFIG_NAME
    if os.path.lexists(config_file):
        check_inside(config_file, root)
        inputs.config_path = config_file
        try:
            inputs.config = read_json_object(config_file)
        except InputError as err:
            if strict_config:
                raise
            inputs.config_error = str(err)
    else:
        inputs.config_error = f"{config_file}: missing; an adapter directory needs the adapter_config.json that save_pretrained writes"

    model_config = root / MODEL_CONFIG_NAME
    if os.path.lexists(model_config):
        check_inside(model_config, root)
        try:
            inputs.model_config = read_json_object(model_config)
        except InputError as err:  # a FIFO, deep or non-strict JSON: never read further, never fatal
            inputs.model_config, inputs.model_config_error = {}, str(err)

    # weights
    if single_file is not None:
        check_inside(single_file, root)
        role = "adapter" if single_file.name in (SAFETENSORS_NAME, BIN_NAME) or inputs.config is not None else "foreign"
        candidates = [(single_file, role)]
    else:
        candidates = [(root / name, "adapter") for name in (SAFETENSORS_NAME, BIN_NAME) if os.path.lexists(root / name)]
        if not candidates:
            candidates = [(root / name, "foreign") for name in inputs.files if looks_like_weights(root / name)]
    for file_path, role in candidates:
        check_inside(file_path, root)
        inputs.weight_files.append(inspect_weight_file(file_path, role=role))

    if not inputs.weight_files and inputs.config_path is None:
        nested = sorted(
            name for name in inputs.files if os.path.isfile(root / name / CONFIG_NAME) and not os.path.islink(root / name)
        )
        hint = (
            f"; adapters found in subdirectories: {', '.join(nested[:3])} (pass one of those)"
            if nested
            else "; pass the directory that save_pretrained wrote (it holds adapter_config.json and adapter_model.safetensors)"
        )
        raise InputError(f"{root}: no adapter_config.json and no weights file{hint}")
    return inputs




def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The saved adapter tensors: safetensors first, ``.bin`` only with ``weights_only=True``."""
    from safetensors.torch import load_file

    if regular_file_problem(adapter_dir / SAFETENSORS_NAME) is None:
        return load_file(str(adapter_dir / SAFETENSORS_NAME))
    problem = regular_file_problem(adapter_dir / BIN_NAME)
    if problem is not None:  # never open a FIFO or a device in place of the weights
        raise InputError(f"{adapter_dir / BIN_NAME}: {problem}; save the adapter with save_pretrained")
    return torch.load(adapter_dir / BIN_NAME, map_location="cpu", weights_only=True)

