"""What a loading path returns: the model plus a record of everything that happened on the way.

PEFT loads adapters with ``strict=False``: unexpected keys are silent and missing keys only
warn, so every path records both explicitly (per stage) instead of trusting the log.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_LOGGERS = ("transformers", "peft")


@dataclass
class KeyReport:
    """Missing / unexpected keys of one load step (adapter keys or model keys, as the step defines)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected


@dataclass
class LoadRecord:
    path: str
    stages: dict[str, KeyReport] = field(default_factory=dict)  # e.g. "base", "adapter", "reload"
    warnings: list[str] = field(default_factory=list)  # Python warnings and transformers/peft log records
    files: list[str] = field(default_factory=list)  # files read or written, in order
    notes: list[str] = field(default_factory=list)
    peft_reported: dict[str, Any] = field(default_factory=dict)  # what PEFT's own API returned, verbatim
    error: str | None = None  # set when the path is expected to fail (raw-load-state-dict)
    diagnosis: Any = None  # structured diagnosis of that failure

    @property
    def missing_keys(self) -> list[str]:
        return [k for report in self.stages.values() for k in report.missing]

    @property
    def unexpected_keys(self) -> list[str]:
        return [k for report in self.stages.values() for k in report.unexpected]

    def summary(self) -> str:
        parts = [f"path {self.path}"]
        for stage, report in self.stages.items():
            parts.append(f"{stage}: {len(report.missing)} missing, {len(report.unexpected)} unexpected")
        if self.error:
            parts.append(f"error: {self.error}")
        return "; ".join(parts)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval() mode
    record: LoadRecord


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def capture(record: LoadRecord) -> Iterator[None]:
    """Collect warnings and transformers/peft WARNING log lines into ``record.warnings``."""
    handler = _ListHandler(record.warnings)
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    record.warnings.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` on transformers >= 4.56 (5.x defaults to "auto" otherwise), ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """Everything passed explicitly: remote code trusted (no prompt), dtype fixed, eager attention."""
    return {"trust_remote_code": True, "attn_implementation": "eager", **dtype_kwargs(dtype)}
