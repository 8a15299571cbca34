"""What a check sees: the inputs, the options, and the shared expensive work (cached per run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckOptions:
    allow_plora_targets: bool = False
    dtype: str | None = None
    device: str = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckContext:
    """What checks see. Add fields freely (with defaults): checks read only what they need.

    ``adapter`` is ``harness.inputs.AdapterInputs`` (or None when only a base/merged dir is checked);
    ``cache`` memoises expensive shared work (the tensor scan, loaded models) across checks.
    """

    adapter: Any = None
    options: CheckOptions = field(default_factory=CheckOptions)
    cache: dict[str, Any] = field(default_factory=dict)
    base: Any = None
    merged: Any = None
    progress: Callable[[str], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)
