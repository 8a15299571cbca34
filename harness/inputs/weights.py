"""One weights file as untrusted input: a validated safetensors header, or a vetted ``.bin`` pickle.

Only regular files are opened. Safetensors headers are parsed and bounded here, by the library's own
rules, before any library sees the file; tensor data is read through a private (copy-on-write)
read-only mmap, so nothing is ever written back. ``.bin`` files are first disassembled (no code runs):
zip checkpoints with ``torch.serialization.get_unsafe_globals_in_checkpoint``, legacy and plain pickles
by reading their GLOBAL / STACK_GLOBAL opcodes with ``pickletools``; they are loaded only when every
global is on torch's ``weights_only`` allowlist, and then only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.inputs.errors import InputError, WeightsError
from harness.inputs.files import (
    JsonError,
    human_bytes,
    json_type,
    one_line,
    open_regular,
    parse_json,
    regular_file_problem,
)

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE (bytes, not MiB)
U64_MAX = 2**64 - 1  # safetensors reads dims and offsets as usize
TORCH_MAX_DIM = 2**63 - 1  # torch sizes are int64
MAX_PICKLE_LINE = 4096  # a GLOBAL / INST argument line (module and name)

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
            with open_regular(self.path) as handle:
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
    problem = regular_file_problem(path)
    if problem is not None:  # a FIFO would block the first read for ever, /dev/zero never ends
        wf.error = problem
        return wf
    try:
        if fmt == "safetensors":
            wf.tensors, wf.metadata = parse_safetensors_header(path)
        else:
            _inspect_bin(wf)
    except WeightsError as err:
        wf.error = str(err)
    except OSError as err:
        wf.error = f"cannot read ({err.strerror or err})"
    return wf


# -- safetensors: the library's own rules, checked before anything trusts the header ------------------------


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict | None]:
    """Validate a safetensors header completely, by the safetensors library's own rules, before anything trusts it.

    Bounded: at most ``MAX_HEADER_BYTES`` (the library's 100,000,000) are read, whatever the file claims, and
    parsed by the strict JSON reader (depth, number size, no NaN, no lone surrogates, no repeated key). Then
    as the library: ``__metadata__`` maps strings to strings; each tensor has a known dtype (a string), a shape
    of u64 dims whose element and bit counts do not overflow 64 bits, two u64 data_offsets whose range is
    exactly its byte size; the ranges tile the data area from 0 with no gap or overlap, to the end of the file.
    """
    raw, data_start, size = _read_header(path)
    try:
        header = parse_json(raw)
    except JsonError as err:
        raise WeightsError(f"corrupt header: {err}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"corrupt header: a JSON {json_type(header)}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise WeightsError("corrupt header: __metadata__ must map strings to strings (the safetensors library "
                           f"refuses {_short(json.dumps(metadata))})")
    data_len = size - data_start
    tensors = {name: _tensor_info(name, entry, path, data_start) for name, entry in header.items()}
    ordered = sorted(tensors.values(), key=lambda info: (info.begin, info.begin + info.nbytes))
    cursor = data_start
    for info in ordered:
        if info.begin < cursor:
            raise WeightsError(f"corrupt header: tensor {_short(info.name)!r} overlaps the previous tensor's bytes")
        if info.begin > cursor:
            raise WeightsError(f"corrupt header: {info.begin - cursor} unaccounted bytes before tensor "
                               f"{_short(info.name)!r}")
        cursor = info.begin + info.nbytes
    if cursor - data_start > data_len:
        raise WeightsError(f"truncated: the tensors end at byte {cursor} ({human_bytes(cursor)}) but the file has "
                           f"{size} bytes; re-save or re-download it")
    if cursor - data_start != data_len:
        raise WeightsError(
            f"corrupt: {data_len - (cursor - data_start)} bytes after the last tensor that the header does not describe"
        )
    return {info.name: info for info in ordered}, metadata  # file order, what a streaming pass wants


def _read_header(path: Path) -> tuple[bytes, int, int]:
    """``(header bytes, offset of the data area, file size)``, the length prefix checked against the file."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"truncated: {size} bytes, shorter than the 8-byte safetensors length prefix")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise WeightsError(
                f"header claims {header_len} bytes ({human_bytes(header_len)}), over the safetensors limit of "
                f"{MAX_HEADER_BYTES:,} bytes: not a safetensors file, or corrupt"
            )
        if 8 + header_len > size:
            raise WeightsError(
                f"truncated or corrupt: header claims {header_len} bytes but the file has only {size - 8} after the prefix"
            )
        raw = handle.read(header_len)
    if len(raw) != header_len:
        raise WeightsError("truncated while reading the header")
    return raw, 8 + header_len, size


def _tensor_info(name: str, entry, path: Path, data_start: int) -> TensorInfo:
    """One header entry, checked as the safetensors library checks it."""
    shown = _short(name)
    if not isinstance(entry, dict):
        raise WeightsError(f"corrupt header: entry {shown!r} is not an object")
    dtype_code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_code, str) or dtype_code not in SAFETENSORS_DTYPES:
        raise WeightsError(f"corrupt header: tensor {shown!r} has unknown dtype {_short(json.dumps(dtype_code))}")
    if not (isinstance(shape, list) and all(_is_u64(d) for d in shape)):
        raise WeightsError(f"corrupt header: tensor {shown!r} has an invalid shape {_short(json.dumps(shape))} "
                           "(dimensions must be integers from 0 to 2**64-1)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsError(f"corrupt header: tensor {shown!r} has invalid data_offsets {_short(json.dumps(offsets))}")
    bits, torch_dtype = SAFETENSORS_DTYPES[dtype_code]
    nbits = _checked_product([*shape, bits])
    if nbits is None:
        raise WeightsError(f"corrupt header: tensor {shown!r} {dtype_code}{_short(str(shape))}: its byte size "
                           "overflows 64 bits")
    if any(d > TORCH_MAX_DIM for d in shape):
        raise WeightsError(f"corrupt header: tensor {shown!r} has a dimension over 2**63-1 (overflows torch's int64)")
    begin, end = offsets
    if nbits % 8:
        raise WeightsError(f"corrupt header: tensor {shown!r} {dtype_code}{shape} does not end on a byte boundary")
    if nbits // 8 != end - begin:
        raise WeightsError(
            f"corrupt header: tensor {shown!r} {dtype_code}{shape} needs {human_bytes(nbits // 8)} "
            f"but its byte range is {end - begin} bytes"
        )
    dtype_name = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else dtype_code
    return TensorInfo(name, tuple(shape), dtype_name, end - begin, path, data_start + begin)


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _checked_product(factors: list[int]) -> int | None:
    """The product, folded left to right as safetensors does (``checked_mul``): None once it passes u64."""
    product = 1
    for factor in factors:
        product *= factor
        if product > U64_MAX:
            return None
    return product


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


# -- .bin: pickles disassembled, never executed ----------------------------------------------------------


def _inspect_bin(wf: WeightFile) -> None:
    path = wf.path
    with open_regular(path) as handle:
        is_zip = zipfile.is_zipfile(handle)
    if is_zip:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # corrupt zip, missing data.pkl, torchscript ...
            wf.error = f"corrupt torch checkpoint: {one_line(err)}"
            return
        load_kwargs = {"mmap": True}
    else:
        # Pre-1.6 torch format (a few pickles, then raw storage bytes) or a plain pickle: disassembled here.
        wf.legacy_format = True
        try:
            needed = pickle_globals(path)
        except WeightsError as err:
            wf.error = str(err)
            return
        unsafe = [name for name in needed if name not in _allowed_globals()]
        load_kwargs = {}
    wf.unsafe_globals = sorted(unsafe)
    if unsafe:
        wf.error = (
            f"pickle needs {', '.join(wf.unsafe_globals[:5])}{' ...' if len(unsafe) > 5 else ''} beyond tensors; "
            f"refused, not executed"
        )
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(path), weights_only=True, map_location="cpu", **load_kwargs)
    except Exception as err:
        kind = "corrupt or not a torch checkpoint" if wf.legacy_format else "cannot load"
        wf.error = f"{kind}: {one_line(err)}"
        return
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        wf.error = f"not a state dict of tensors (a {type(state).__name__}); save the adapter with save_pretrained"
        return
    wf._state = state
    wf.tensors = {
        key: TensorInfo(key, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(), path)
        for key, t in state.items()
    }


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
LEGACY_PICKLES = 5  # torch's pre-zip format: magic number, protocol, sys info, the object, storage keys


def pickle_globals(path: Path) -> list[str]:
    """Every global (``module.name``) the pickles at the start of ``path`` would import, found by reading their
    GLOBAL / STACK_GLOBAL / INST opcodes with ``pickletools`` (nothing is executed). A STACK_GLOBAL whose names
    are computed rather than literal is reported as such. ``WeightsError`` when the file is not a pickle."""
    found: list[str] = []
    with open_regular(path) as handle:
        stream = _BoundedReader(handle, os.fstat(handle.fileno()).st_size)
        for index in range(LEGACY_PICKLES):
            if stream.at_end():
                break
            try:
                found += _one_pickle_globals(stream)
            except Exception as err:  # noqa: BLE001 - pickletools raises ValueError, struct.error, UnicodeError...
                if index == 0:
                    raise WeightsError(f"corrupt: not a pickle ({one_line(err)}); re-save the adapter with "
                                       "save_pretrained") from None
                break  # the raw storage bytes after a legacy checkpoint's pickles
    return sorted(set(found))


def _one_pickle_globals(stream) -> list[str]:
    found: list[str] = []
    pushed: list[object] = []  # what each opcode pushed, in order (strings kept, anything else None)
    memo: dict[int, object] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _PUT_OPS:
            memo[arg] = pushed[-1] if pushed else None
        elif name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif name in _STRING_OPS:
            pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", ".", 1))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, qualname = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            resolved = isinstance(module, str) and isinstance(qualname, str)
            found.append(f"{module}.{qualname}" if resolved else "<a STACK_GLOBAL with computed names>")
            pushed.append(None)
        elif name.startswith("EXT"):
            found.append(f"<copyreg extension {arg}>")
            pushed.append(None)
        else:
            pushed.append(None)
        del pushed[:-2]  # only the last two pushes matter (STACK_GLOBAL's arguments)
    return found


class _BoundedReader:
    """A file as ``pickletools`` reads it, each read capped at what is left (a hostile length never allocates)."""

    def __init__(self, handle, size: int) -> None:
        self.handle, self.size = handle, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.handle.tell()
        return self.handle.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.handle.readline(MAX_PICKLE_LINE)

    def tell(self) -> int:
        return self.handle.tell()

    def at_end(self) -> bool:
        return self.handle.tell() >= self.size


@functools.lru_cache(maxsize=1)
def _default_allowed_globals() -> frozenset[str]:
    """torch's own ``weights_only`` allowlist (what ``get_unsafe_globals_in_checkpoint`` compares with)."""
    from torch import _weights_only_unpickler as unpickler

    getter = getattr(unpickler, "_get_allowed_globals", None)
    return frozenset(getter()) if getter is not None else frozenset()


def _allowed_globals() -> frozenset[str]:
    from torch import _weights_only_unpickler as unpickler

    user = getattr(unpickler, "_get_user_allowed_globals", None)
    return _default_allowed_globals() | frozenset(user() if user is not None else ())


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

