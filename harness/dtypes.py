"""The dtypes a check can run in, as one type from the door (CLI, plugin, API, pyproject) to the engine.

Why: a dtype used to travel as a string and be turned into a torch dtype and back in several places, each
with its own table of names. ``DType`` is a ``str`` (so it serialises into the plan's JSON as its name and
compares equal to it) that knows its torch dtype; importing this module imports no torch.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DType(str, Enum):
    """A floating dtype the dynamic checks run in."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    __str__ = str.__str__  # "bfloat16", as users write it, in messages and reports
    __format__ = str.__format__

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.value)

    @property
    def bytes(self) -> int:
        """Bytes per element."""
        return 4 if self is DType.float32 else 2

    @classmethod
    def of(cls, value: str | DType | torch.dtype) -> DType:
        """``"bfloat16"``, ``"torch.bfloat16"``, ``torch.bfloat16`` or a ``DType``; ValueError otherwise."""
        if isinstance(value, cls):
            return value
        name = value if isinstance(value, str) else str(value)
        try:
            return cls(name.removeprefix("torch."))
        except ValueError:
            raise ValueError(f"{value!r} is not one of {', '.join(cls.names())}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(d.value for d in cls)
