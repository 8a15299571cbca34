"""The one streaming pass over a weights file: finiteness, all-zero and emptiness of every tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.inputs.files import one_line
from harness.inputs.weights import WeightFile

SCAN_CHUNK_ELEMENTS = 1 << 20  # elements per reduction step: bounded scratch memory and page release



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
            entry.error = one_line(err)
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


