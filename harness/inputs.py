"""Read an adapter directory as untrusted input, without writing to it and without running pickles.

Two kinds of trouble, on purpose kept apart:

``InputError`` (the CLI exits 2 with this one line): nothing sensible can be checked at all.
    * the path does not exist, or is neither a directory nor a weights file;
    * a file the harness would read is a symlink that resolves outside the directory
      (a Hugging Face hub snapshot, whose files link into the repo's own ``blobs/`` folder, is fine);
    * the directory holds neither an ``adapter_config.json`` nor any weights file;
    * ``adapter_config.json`` is not valid UTF-8 JSON, is not a JSON object, or is absurdly large.

Recorded problems (a check reports them as ``fail``; the rest of the report still runs):
    * no ``adapter_config.json`` next to the weights (``config-valid``);
    * no adapter weights next to the config, truncated / corrupt / hostile safetensors headers,
      unreadable ``.bin`` files, both formats present with different contents (``weights-readable``);
    * a ``.bin`` pickle that needs globals beyond torch's tensor-rebuild allowlist is refused and
      never executed (``unsafe-pickle``);
    * only full-model weights (``model.safetensors``, ``pytorch_model*.bin``) and no adapter weights
      (``full-checkpoint``).

Safety: safetensors headers are parsed and bounded here before any library sees the file; tensor
data is read through a private (copy-on-write) read-only mmap, so nothing is ever written back.
``.bin`` files are first disassembled with ``torch.serialization.get_unsafe_globals_in_checkpoint``
(no code runs) and loaded only with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MODEL_CONFIG_NAME = "config.json"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_CONFIG_BYTES = 10 * 1024 * 1024
SCAN_CHUNK_ELEMENTS = 1 << 20  # elements per reduction step: bounded scratch memory and page release

# safetensors dtype -> (bits per element, torch dtype or None when torch has no such dtype)
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E4M3FNUZ": (8, getattr(torch, "float8_e4m3fnuz", None)),
    "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
    "F8_E5M2FNUZ": (8, getattr(torch, "float8_e5m2fnuz", None)),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "I16": (16, torch.int16),
    "U16": (16, getattr(torch, "uint16", None)),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32),
    "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)),
    "F64": (64, torch.float64),
    "C64": (64, torch.complex64),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}

# Files in a model / trainer directory that are pickles but not weights: never collected.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"}


class InputError(Exception):
    """The input cannot be read at all. ``str(err)`` is one line: the file, what is wrong, the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """What a weights file says about one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch." ("bfloat16"), or the safetensors code if torch lacks it
    nbytes: int
    file: Path
    begin: int | None = None  # absolute byte offset of the data (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class WeightFile:
    """One weights file and what is known about it (``error`` set when it cannot be used)."""

    path: Path
    format: str  # "safetensors" | "bin"
    size: int
    role: str = "adapter"  # "adapter" (adapter_model.*) or "foreign" (model.safetensors, pytorch_model.bin ...)
    error: str | None = None
    unsafe_globals: list[str] | None = None  # .bin: [] when safe; None when never inspected
    tensors: dict[str, TensorInfo] | None = None
    metadata: dict | None = None  # safetensors "__metadata__"
    legacy_format: bool = False  # .bin in the pre-zip torch format (no mmap)
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _state: dict | None = field(default=None, repr=False)

    @property
    def readable(self) -> bool:
        return self.error is None and self.tensors is not None

    @property
    def name(self) -> str:
        return self.path.name

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` in file order; tensors are zero-copy, read-only views of a private mmap.

        Streaming: once the caller moves on, the previous tensor's pages are released (a view kept
        alive still reads correctly, from the file again), so RSS stays near one tensor. Copy a
        tensor (``.clone()``) before modifying it.
        """
        if not self.readable:
            raise InputError(f"{self.path}: cannot read tensors: {self.error}")
        if self.format == "safetensors":
            mm = self._map()
            for info in self.tensors.values():
                yield info.name, _view(mm, info)
                self.release(info.name)
        else:
            for key in self.tensors:
                yield key, self._state[key]

    def get_tensor(self, key: str) -> torch.Tensor:
        if not self.readable:
            raise InputError(f"{self.path}: cannot read tensors: {self.error}")
        if self.format == "safetensors":
            return _view(self._map(), self.tensors[key])
        return self._state[key]

    def release(self, key: str) -> None:
        """Drop the pages of one tensor from this process (keeps RSS low while streaming)."""
        if self.format == "safetensors" and key in (self.tensors or {}):
            info = self.tensors[key]
            self.release_range(info.begin, info.nbytes)

    def release_range(self, begin: int, nbytes: int) -> None:
        """Drop the pages holding bytes ``[begin, begin + nbytes)`` of the file from this process.

        The mapping is private and never written, so dropped pages are simply read again from the
        file (or the page cache) if a live view touches them later.
        """
        if self._mmap is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (begin // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, begin + nbytes - start)
        except (OSError, ValueError):
            pass

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as handle:
                # ACCESS_COPY: private mapping; a stray in-place op on a view never reaches the file.
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap


@dataclass
class TensorStats:
    """One streaming pass over a tensor: what ``empty-tensors``, ``finite`` and ``noop`` need."""

    numel: int
    dtype: str
    finite: bool = True
    nonzero: bool = False
    nan: int = 0
    inf: int = 0
    error: str | None = None


@dataclass
class AdapterInputs:
    """Everything read from an adapter directory (or a single weights file)."""

    path: Path  # as given, made absolute
    root: Path  # the resolved directory
    config: dict | None = None
    config_path: Path | None = None
    config_error: str | None = None
    weight_files: list[WeightFile] = field(default_factory=list)
    model_config: dict | None = None  # config.json when present (a full-model directory)
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
        _check_inside(config_file, root)
        inputs.config_path = config_file
        try:
            inputs.config = _read_json_object(config_file)
        except InputError as err:
            if strict_config:
                raise
            inputs.config_error = str(err)
    else:
        inputs.config_error = f"{config_file}: missing; an adapter directory needs the adapter_config.json that save_pretrained writes"

    model_config = root / MODEL_CONFIG_NAME
    if os.path.lexists(model_config):
        _check_inside(model_config, root)
        try:
            inputs.model_config = _read_json_object(model_config)
        except InputError:
            inputs.model_config = {}

    # weights
    if single_file is not None:
        _check_inside(single_file, root)
        role = "adapter" if single_file.name in (SAFETENSORS_NAME, BIN_NAME) or inputs.config is not None else "foreign"
        candidates = [(single_file, role)]
    else:
        candidates = [(root / name, "adapter") for name in (SAFETENSORS_NAME, BIN_NAME) if os.path.lexists(root / name)]
        if not candidates:
            candidates = [(root / name, "foreign") for name in inputs.files if _looks_like_weights(root / name)]
    for file_path, role in candidates:
        _check_inside(file_path, root)
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


def inspect_weight_file(path: Path, *, role: str = "adapter") -> WeightFile:
    """Read one weights file's metadata; failures are recorded in ``.error``, never raised."""
    fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
    try:
        size = path.stat().st_size
    except OSError as err:
        return WeightFile(path=path, format=fmt, size=0, role=role, error=f"cannot stat ({err.strerror})")
    wf = WeightFile(path=path, format=fmt, size=size, role=role)
    if not path.is_file():
        wf.error = "not a regular file"
        return wf
    if fmt == "safetensors":
        try:
            wf.tensors, wf.metadata = parse_safetensors_header(path)
        except WeightsError as err:
            wf.error = str(err)
        except OSError as err:
            wf.error = f"cannot read ({err.strerror})"
    else:
        _inspect_bin(wf)
    return wf


class WeightsError(ValueError):
    """A weights file is corrupt, truncated or hostile (recorded, reported by ``weights-readable``)."""


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict | None]:
    """Validate a safetensors header completely before anything trusts it.

    Bounded: at most ``MAX_HEADER_BYTES`` are read, whatever the file claims. Checks: the 8-byte
    length fits the file, the header is a JSON object, every entry has a known dtype, a shape of
    non-negative ints whose byte size equals its offset range, offsets lie inside the data area,
    and the ranges tile the data area with no overlap and no gap.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"truncated: {size} bytes, shorter than the 8-byte safetensors length prefix")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise WeightsError(
                f"header claims {header_len} bytes ({_human(header_len)}), over the {_human(MAX_HEADER_BYTES)} "
                f"limit: not a safetensors file, or corrupt"
            )
        if 8 + header_len > size:
            raise WeightsError(
                f"truncated or corrupt: header claims {header_len} bytes but the file has only {size - 8} after the prefix"
            )
        raw = handle.read(header_len)
    if len(raw) != header_len:
        raise WeightsError("truncated while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"corrupt header: not UTF-8 JSON ({_one_line(err)})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"corrupt header: a JSON {type(header).__name__}, not an object")

    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise WeightsError("corrupt header: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise WeightsError(f"corrupt header: entry {name!r} is not an object")
        dtype_code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype_code not in SAFETENSORS_DTYPES:
            raise WeightsError(f"corrupt header: tensor {name!r} has unknown dtype {dtype_code!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise WeightsError(f"corrupt header: tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise WeightsError(f"corrupt header: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        bits, torch_dtype = SAFETENSORS_DTYPES[dtype_code]
        numel = math.prod(shape)
        nbits = numel * bits
        if nbits % 8 or nbits // 8 != end - begin:
            raise WeightsError(
                f"corrupt header: tensor {name!r} {dtype_code}{list(shape)} needs {_human(nbits // 8)} "
                f"but its byte range is {end - begin} bytes"
            )
        if end > data_len:
            raise WeightsError(
                f"truncated: tensor {name!r} ends at byte {data_start + end} ({_human(data_start + end)}) "
                f"but the file has {size} bytes; re-save or re-download it"
            )
        dtype_name = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else dtype_code
        tensors[name] = TensorInfo(name, tuple(shape), dtype_name, end - begin, path, data_start + begin)
        ranges.append((begin, end, name))
    ranges.sort()
    cursor = 0
    for begin, end, name in ranges:
        if begin < cursor:
            raise WeightsError(f"corrupt header: tensor {name!r} overlaps the previous tensor's bytes")
        if begin > cursor:
            raise WeightsError(f"corrupt header: {begin - cursor} unaccounted bytes before tensor {name!r}")
        cursor = end
    if cursor != data_len:
        raise WeightsError(
            f"corrupt: {data_len - cursor} bytes after the last tensor that the header does not describe"
        )
    # file order = offset order, what a streaming pass wants
    ordered = {name: tensors[name] for _, _, name in ranges}
    return ordered, metadata


def _inspect_bin(wf: WeightFile) -> None:
    path = wf.path
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # corrupt zip, missing data.pkl, torchscript ...
            wf.error = f"corrupt torch checkpoint: {_one_line(err)}"
            return
        wf.unsafe_globals = sorted(unsafe)
        if unsafe:
            wf.error = (
                f"pickle needs {', '.join(sorted(unsafe)[:5])}{' ...' if len(unsafe) > 5 else ''} beyond tensors; "
                f"refused, not executed"
            )
            return
        load_kwargs = {"mmap": True}
    else:
        # Pre-1.6 torch format: no static disassembly, but the weights_only unpickler is itself
        # an allowlist that never calls anything outside it.
        wf.legacy_format = True
        load_kwargs = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(path), weights_only=True, map_location="cpu", **load_kwargs)
    except Exception as err:
        message = _one_line(err)
        if wf.legacy_format and ("Unsupported global" in message or "weights_only" in message.lower()):
            wf.unsafe_globals = [message[:200]]
            wf.error = "legacy-format pickle needs globals beyond tensors; refused, not executed"
        else:
            wf.error = f"cannot load: {message}"
        return
    if wf.legacy_format and wf.unsafe_globals is None:
        wf.unsafe_globals = []
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        wf.error = f"not a state dict of tensors (a {type(state).__name__}); save the adapter with save_pretrained"
        return
    wf._state = state
    wf.tensors = {
        key: TensorInfo(key, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(), path)
        for key, t in state.items()
    }


# -- the one streaming pass --------------------------------------------------------------------

# IEEE-style floats, viewed as same-width signed integers: (int dtype, magnitude mask, smallest
# non-finite magnitude). With ``m = max(bits & mask)`` over a tensor, one reduction answers both
# questions exactly: ``m >= nonfinite`` <=> some element is Inf/NaN, ``m == 0`` <=> all elements are
# +-0. Integer reductions run at memory speed; float reductions on bf16/fp16 do not.
_FLOAT_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
}
for _name, _nonfinite in (("float8_e4m3fn", 0x7F), ("float8_e5m2", 0x7C)):  # e4m3fn: NaN only, no Inf
    if hasattr(torch, _name):
        _FLOAT_BITS[getattr(torch, _name)] = (torch.int8, 0x7F, _nonfinite)
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def scan_weight_file(wf: WeightFile | None) -> dict[str, TensorStats]:
    """Finiteness, all-zero and emptiness of every tensor: one bounded pass over the bytes.

    Each tensor is read in chunks of ``SCAN_CHUNK_ELEMENTS`` straight from the (private, read-only)
    mmap; the pages of a chunk are handed back to the OS as soon as it is scanned, so the resident
    set stays near one chunk whatever the file size. No per-element Python, no full copies.
    """
    stats: dict[str, TensorStats] = {}
    if wf is None or not wf.readable:
        return stats
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for key, info in wf.tensors.items():
        entry = TensorStats(numel=info.numel, dtype=info.dtype)
        stats[key] = entry
        if info.numel == 0:
            continue
        try:
            flat = wf.get_tensor(key).reshape(-1)
            if flat.is_complex():
                flat = torch.view_as_real(flat).reshape(-1)
            step = SCAN_CHUNK_ELEMENTS
            itemsize = flat.element_size()
            for start in range(0, flat.numel(), step):
                chunk = flat[start : start + step]
                _scan_chunk(chunk, entry, scratch)
                if info.begin is not None:
                    wf.release_range(info.begin + start * itemsize, chunk.numel() * itemsize)
            if not entry.finite:  # rare: count exactly, chunk by chunk (only for a broken tensor)
                for start in range(0, flat.numel(), step):
                    chunk = _as_float(flat[start : start + step])
                    entry.nan += int(torch.isnan(chunk).sum())
                    entry.inf += int(torch.isinf(chunk).sum())
        except Exception as err:  # noqa: BLE001 - recorded, reported by the checks
            entry.error = _one_line(err)
        finally:
            wf.release(key)
    return stats


def _scan_chunk(chunk: torch.Tensor, entry: TensorStats, scratch: dict[torch.dtype, torch.Tensor]) -> None:
    bits = _FLOAT_BITS.get(chunk.dtype)
    if bits is not None:
        int_dtype, mask, nonfinite = bits
        buffer = scratch.get(int_dtype)
        if buffer is None:
            buffer = scratch[int_dtype] = torch.empty(SCAN_CHUNK_ELEMENTS, dtype=int_dtype)
        magnitude = buffer[: chunk.numel()]
        torch.bitwise_and(chunk.view(int_dtype), mask, out=magnitude)
        top = int(magnitude.max())
        if top >= nonfinite:
            entry.finite = False
        if top != 0:
            entry.nonzero = True
    elif chunk.is_floating_point():  # fnuz / e8m0 fp8 and other exotic encodings: a small per-chunk copy
        values = _as_float(chunk)
        if not bool(torch.isfinite(values).all()):
            entry.finite = False
        if not entry.nonzero and bool(values.any()):
            entry.nonzero = True
    elif not entry.nonzero:  # integers and bool: any set bit
        signed = chunk.view(_SIGNED[chunk.element_size()])
        low, high = torch.aminmax(signed)
        entry.nonzero = bool(low != 0) or bool(high != 0)


def _as_float(chunk: torch.Tensor) -> torch.Tensor:
    return chunk if chunk.dtype in (torch.float32, torch.float64) or not chunk.is_floating_point() else chunk.float()


# -- helpers ---------------------------------------------------------------------------------


def _view(mm: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    torch_dtype = SAFETENSORS_BY_NAME.get(info.dtype)
    if torch_dtype is None:
        raise WeightsError(f"tensor {info.name!r}: dtype {info.dtype} has no torch equivalent here")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    count = info.nbytes // itemsize
    if count == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    if info.begin % itemsize:  # misaligned data (hostile or odd writer): copy instead of viewing
        flat = torch.frombuffer(bytearray(mm[info.begin : info.begin + info.nbytes]), dtype=torch_dtype)
    else:
        flat = torch.frombuffer(mm, dtype=torch_dtype, count=count, offset=info.begin)
    return flat.view(info.shape)


SAFETENSORS_BY_NAME = {
    str(dt).removeprefix("torch."): dt for _, (_, dt) in SAFETENSORS_DTYPES.items() if dt is not None
}


def check_inside(file_path: Path, root: Path) -> None:
    """A file we read must resolve inside ``root`` (or into a hub snapshot's own ``blobs/``)."""
    try:
        target = file_path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(
            f"{file_path}: a broken or looping symlink; replace it with the real file"
        ) from None
    if target.is_relative_to(root):
        return
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return  # ~/.cache/huggingface/hub/models--x/snapshots/<rev>/file -> ../../blobs/<sha>
    raise InputError(
        f"{file_path}: a symlink to {target}, outside {root}; copy the real file into the directory"
    )


_check_inside = check_inside


def _read_json_object(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: {_human(size)}, too large for a config file; regenerate it with save_pretrained")
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except InputError:
        raise
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({_one_line(err)}); regenerate it with save_pretrained") from None
    if not isinstance(value, dict):
        raise InputError(
            f"{path}: a JSON {_json_type(value)}, not an object; regenerate it with save_pretrained"
        )
    return value


def _looks_like_weights(path: Path) -> bool:
    if path.name in _NOT_WEIGHTS or path.name.startswith("rng_state") or not path.is_file():
        return False
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth")


def _json_type(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1024 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
