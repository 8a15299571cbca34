"""Where a run's time went: each check's own compute, and the shared work checks cause and reuse.

Checks compute lazily: the first check that needs the base model loads it (and the fp32 reference, and
each loading path), and every later check reads the result. Timed by wall clock alone, a check's time
is whatever it happened to trigger first: all loading on ``key-coverage``, all seconds of a JUnit file
on one test case. So the engine opens a ``WorkLog`` per adapter and times each check inside
``log.check(id)``; code doing work that checks share wraps it in ``shared(key, name)``, and a check
that reuses it calls ``used(key)``. A check's own time is its wall time less the shared work it ran;
each piece of shared work is one entry per key, counted once (work nested in other shared work is its
own entry, never counted twice) and named with every check that used it, the first being the one that
caused it. With no log open (library use, unit tests of a check) both are no-ops.

Plain Python, no torch: the entries travel as JSON to the process that renders the report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Work:
    """One piece of shared work: what it was, its seconds in all, how often it ran, and who used it."""

    key: str
    name: str
    seconds: float = 0.0  # exclusive of the shared work nested in it (each such piece is its own entry)
    runs: int = 0
    checks: list[str] = field(default_factory=list)  # the first caused it; empty: it ran before any check

    @property
    def caused_by(self) -> str | None:
        return self.checks[0] if self.checks else None

    def to_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "seconds": round(self.seconds, 3), "runs": self.runs,
                "checks": list(self.checks)}

    @classmethod
    def from_dict(cls, data: dict) -> Work:
        return cls(key=str(data["key"]), name=str(data["name"]), seconds=float(data.get("seconds") or 0.0),
                   runs=int(data.get("runs") or 0), checks=[str(c) for c in data.get("checks") or []])


@dataclass
class CheckTime:
    """A check's own seconds, known when its ``WorkLog.check`` block ends."""

    own_s: float | None = None


@dataclass
class _Frame:
    started: float
    key: str | None = None  # the shared work this frame times (None: a check)
    nested: float = 0.0  # seconds of shared work that ran directly inside this frame


class WorkLog:
    """The shared work of one adapter's run, and the check running now."""

    def __init__(self) -> None:
        self.work: dict[str, Work] = {}
        self.current: str | None = None
        self._frames: list[_Frame] = []
        self._parts: dict[str, list[str]] = {}  # shared work -> the shared work it ran (a reuse reuses those too)

    @contextlib.contextmanager
    def check(self, check_id: str) -> Iterator[CheckTime]:
        """Time check ``check_id``: its own seconds exclude the shared work it ran."""
        timing, frame = CheckTime(), _Frame(time.perf_counter())
        previous, self.current = self.current, check_id
        self._frames.append(frame)
        try:
            yield timing
        finally:
            self._frames.pop()
            self.current = previous
            elapsed = time.perf_counter() - frame.started
            timing.own_s = round(max(0.0, elapsed - frame.nested), 3)
            if self._frames:  # a check run inside another (none today): its whole time is the outer one's share
                self._frames[-1].nested += elapsed

    @contextlib.contextmanager
    def shared(self, key: str, name: str) -> Iterator[None]:
        """Time one run of the shared work ``key`` (``name`` says what it is), for the check running now."""
        entry = self.work.setdefault(key, Work(key, name))
        self._use(entry)
        outer = next((f.key for f in reversed(self._frames) if f.key is not None), None)
        if outer is not None and key not in self._parts.setdefault(outer, []):
            self._parts[outer].append(key)
        frame = _Frame(time.perf_counter(), key)
        self._frames.append(frame)
        try:
            yield
        finally:
            self._frames.pop()
            elapsed = time.perf_counter() - frame.started
            entry.seconds += max(0.0, elapsed - frame.nested)
            entry.runs += 1
            if self._frames:
                self._frames[-1].nested += elapsed

    def used(self, key: str) -> None:
        """The check running now reads shared work ``key`` that already ran (and so the work nested in it)."""
        if (entry := self.work.get(key)) is not None and self.current not in entry.checks:
            self._use(entry)
            for part in self._parts.get(key, []):
                self.used(part)

    def entries(self) -> list[Work]:
        return list(self.work.values())

    def _use(self, entry: Work) -> None:
        if self.current is not None and self.current not in entry.checks:
            entry.checks.append(self.current)


_active: WorkLog | None = None


@contextlib.contextmanager
def recording(log: WorkLog) -> Iterator[WorkLog]:
    """Make ``log`` the one ``shared`` and ``used`` write to, for the duration of the block."""
    global _active
    previous, _active = _active, log
    try:
        yield log
    finally:
        _active = previous


def shared(key: str, name: str) -> contextlib.AbstractContextManager:
    """``WorkLog.shared`` on the log being recorded, or nothing when none is."""
    return _active.shared(key, name) if _active is not None else contextlib.nullcontext()


def used(key: str) -> None:
    """``WorkLog.used`` on the log being recorded, or nothing when none is."""
    if _active is not None:
        _active.used(key)
