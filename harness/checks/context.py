"""What a check sees: the inputs, the options, and the shared expensive work of one run.

Every field has one type. Expensive work shared by several checks (the tensor scan, the key
analysis, the dynamic run) is memoised with ``cached``; whatever needs closing is registered on
``cleanup`` where it is created, and the engine closes the stack when the adapter's run ends.
Importing this module imports no torch: the types below are for readers and type checkers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from harness.dtypes import DType

if TYPE_CHECKING:
    import torch

    from harness.inputs.adapter_dir import AdapterInputs
    from harness.inputs.deepspeed import ZeroConversion
    from harness.model.structure import BaseModelInfo

T = TypeVar("T")


@dataclass(frozen=True)
class CheckOptions:
    """What the user asked for (CLI flags, API keywords, plugin options)."""

    allow_plora_targets: bool = False
    dtype: DType | None = None  # None: the dtype the checkpoint is stored in
    device: str = "cpu"
    max_memory: int | None = None  # bytes the dynamic checks may use; None: the RAM (or GPU memory) available
    trained_on_quantized: str | None = None  # nf4 | fp4 | int8: the base the adapter was trained on (QLoRA)
    # Run the dynamic checks on the depth slice of exactly these decoder layers (consecutive, original indices):
    # one unit of a check spread over pytest-xdist workers or CI jobs. None: slices chosen from max_memory.
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # one type whichever way the options came (the API's door, or the plan's JSON in the engine process)
        if self.dtype is not None and not isinstance(self.dtype, DType):
            object.__setattr__(self, "dtype", DType.of(self.dtype))


@dataclass(frozen=True)
class TrainedInputs:
    """``check_trained``'s inputs: the in-memory trained PEFT model and the directory it was saved to."""

    model: torch.nn.Module
    saved_dir: Path
    base_dir: Path | None
    adapter_name: str
    dtype: torch.dtype


@dataclass
class CheckContext:
    """The inputs of one adapter's run and what the checks share."""

    adapter: AdapterInputs | None = None
    options: CheckOptions = field(default_factory=CheckOptions)
    base: BaseModelInfo | None = None  # --base-model, inspected (weight index + module tree on meta)
    merged: Path | None = None  # --merged
    deepspeed: ZeroConversion | None = None  # the adapter came from this DeepSpeed checkpoint conversion
    deepspeed_error: str | None = None  # or the conversion was refused / failed (one line)
    failed_prerequisites: list[str] = field(default_factory=list)  # static/against-base ids that failed
    trained: TrainedInputs | None = None
    progress: Callable[[str], None] | None = None
    notes: list[str] = field(default_factory=list)  # adjustments the harness made (eager attention, ...)
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    cache: dict[str, Any] = field(default_factory=dict)
    run_adapters: tuple[Path, ...] = ()  # every adapter of the run, this one included: for work shared across them
    planned: tuple[str, ...] = ()  # the check ids this run reports: work done once for several checks covers these

    def cached(self, key: str, compute: Callable[[], T], name: str | None = None) -> T:
        """``compute()`` once per run under ``key`` ("<group>.<what>"), shared by every check; timed as shared work
        (``name`` says what it is, for the report's time section) and not as the time of the check that ran it."""
        from harness import worklog

        if key in self.cache:
            worklog.used(key)
        else:
            with worklog.shared(key, name or key):
                self.cache[key] = compute()
        return self.cache[key]

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    def note(self, text: str) -> None:
        """Record an adjustment the report must state (once)."""
        if text not in self.notes:
            self.notes.append(text)
