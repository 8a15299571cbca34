"""One weights file as untrusted input: a validated safetensors header, or a vetted ``.bin`` pickle.

Safetensors headers are parsed and bounded here before any library sees the file; tensor data is
read through a private (copy-on-write) read-only mmap, so nothing is ever written back. ``.bin``
files are first disassembled with ``torch.serialization.get_unsafe_globals_in_checkpoint`` (no code
runs) and loaded only with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.errors import InputError, WeightsError
from harness.inputs.files import human_bytes, one_line

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

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
                f"header claims {header_len} bytes ({human_bytes(header_len)}), over the {human_bytes(MAX_HEADER_BYTES)} "
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
        raise WeightsError(f"corrupt header: not UTF-8 JSON ({one_line(err)})") from None
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
                f"corrupt header: tensor {name!r} {dtype_code}{list(shape)} needs {human_bytes(nbits // 8)} "
                f"but its byte range is {end - begin} bytes"
            )
        if end > data_len:
            raise WeightsError(
                f"truncated: tensor {name!r} ends at byte {data_start + end} ({human_bytes(data_start + end)}) "
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
            wf.error = f"corrupt torch checkpoint: {one_line(err)}"
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
        message = one_line(err)
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

