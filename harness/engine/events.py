"""Engine events: what the engine says while it runs, one type each.

The engine (in this process or a child) reports by these events; ``Recorder`` turns them into the
verdict. Across the process boundary each travels as one JSON object per line (``to_dict`` /
``from_dict``): ``{"type": "<kind>", <fields>}``. A line that names no known kind or lacks a field
is dropped by the reader (``from_dict`` returns None), never half-understood.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from harness.report import CheckResult


@dataclass(frozen=True)
class Start:
    """The engine starts adapter ``adapter`` (the process that owns the verdict plans the ids itself)."""

    kind: ClassVar[str] = "start"
    adapter: int
    planned: list[str]


@dataclass(frozen=True)
class Inputs:
    """What was read for the adapter (merged into the report's ``inputs``)."""

    kind: ClassVar[str] = "inputs"
    adapter: int
    inputs: dict


@dataclass(frozen=True)
class Progress:
    """What runs now: shown, and kept as the last thing running, not recorded in the report."""

    kind: ClassVar[str] = "progress"
    adapter: int
    text: str


@dataclass(frozen=True)
class Result:
    """One finished check."""

    kind: ClassVar[str] = "result"
    adapter: int
    result: CheckResult


@dataclass(frozen=True)
class Work:
    """Where the adapter's time went besides each check's own: the shared work (``harness.worklog.Work.to_dict``
    each), sent just before ``Notes``."""

    kind: ClassVar[str] = "work"
    adapter: int
    work: list[dict]


@dataclass(frozen=True)
class Notes:
    """Adjustments the harness made while checking the adapter."""

    kind: ClassVar[str] = "notes"
    adapter: int
    notes: list[str]


@dataclass(frozen=True)
class Code:
    """The model code files of the run: ``{"file", "sha256", "executed"}`` each."""

    kind: ClassVar[str] = "code"
    files: list[dict]


@dataclass(frozen=True)
class InputRefused:
    """An input cannot be used at all (exit 2)."""

    kind: ClassVar[str] = "input_error"
    message: str


@dataclass(frozen=True)
class Fatal:
    """The engine stopped early: model code ended it (``sys.exit``, an interrupt, an exception at the top)."""

    kind: ClassVar[str] = "fatal"
    message: str


@dataclass(frozen=True)
class ExitCalled:
    """Model code called ``os._exit(code)`` (at ``where``, when in model code): the process ends next."""

    kind: ClassVar[str] = "exit_called"
    code: int
    where: str | None


@dataclass(frozen=True)
class Done:
    """Every adapter was checked."""

    kind: ClassVar[str] = "done"


Event = Union[Start, Inputs, Progress, Result, Work, Notes, Code, InputRefused, Fatal, ExitCalled, Done]
KINDS: dict[str, type] = {cls.kind: cls for cls in (Start, Inputs, Progress, Result, Work, Notes, Code, InputRefused,
                                                     Fatal, ExitCalled, Done)}


def to_dict(event: Event) -> dict:
    """The JSON-able form sent across the process boundary."""
    data = {"type": event.kind}
    for item in dataclasses.fields(event):
        value = getattr(event, item.name)
        data[item.name] = value.to_dict() if isinstance(value, CheckResult) else value
    return data


def from_dict(data: object) -> Event | None:
    """The event a JSON object describes, or None when it is not one (unknown kind, missing or extra fields)."""
    if not isinstance(data, dict):
        return None
    cls = KINDS.get(data.get("type"))
    if cls is None:
        return None
    values = {k: v for k, v in data.items() if k != "type"}
    if set(values) != {item.name for item in dataclasses.fields(cls)}:
        return None
    try:
        if cls is Result:
            values["result"] = CheckResult.from_dict(values["result"])
        return cls(**values)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
