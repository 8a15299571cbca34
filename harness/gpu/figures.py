"""Measured figures: wall time with device synchronisation, peak device memory, and the JSON file.

GPU kernels run asynchronously, so a timer that does not synchronise measures only the launch;
``timed`` synchronises on both ends. Peak memory is the CUDA allocator's high-water mark (what
decides whether a run fits a card); on the CPU there is no such counter and it is reported as None.
The JSON is strict (no NaN): a non-finite error becomes the string "nan"/"inf" so that a broken
run still writes a readable file.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(into: dict[str, float], key: str, device: str | torch.device) -> Iterator[None]:
    """Add the wall time of the block (device synchronised before and after) to ``into[key]``."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


@contextmanager
def phase(timings: dict[str, float], peaks: dict[str, int | None], key: str,
          device: str | torch.device) -> Iterator[None]:
    """``timed``, plus the block's own memory high-water mark in ``peaks[key]`` (None off CUDA)."""
    reset_peak(device)
    with timed(timings, key, device):
        yield
    peaks[key] = peak_bytes(device)


def overall_peak(peaks: dict[str, int | None]) -> int | None:
    values = [v for v in peaks.values() if v is not None]
    return max(values) if values else None


def reset_peak(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: str | torch.device) -> int | None:
    """The allocator's high-water mark since the last ``reset_peak`` (None off CUDA)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 2)


def environment(device: str | torch.device) -> dict:
    """What ran: device name and memory, library versions (for the figures and the README)."""
    import peft
    import transformers

    env = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "high" = TF32 fp32 references
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_gib"] = gib(props.total_memory)
    return env


def _strict(value):
    """JSON-safe copy: non-finite floats become strings, tuples become lists, tensors become floats."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_figures(path: str | Path, section: str, figures: dict) -> Path:
    """Write ``figures`` under ``section`` of the JSON file at ``path``, keeping the other sections.

    Several suites (full-size, real model) write to one file; each replaces only its own section.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object; remove it or pass another figures file")
    data[section] = _strict(figures)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
