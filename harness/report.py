"""Check results and the report: terminal table, JSON, JUnit XML, exit code.

Everything here is plain Python (no torch), so the process that owns the verdict can render a
report that another process computed. Text taken from inputs (tensor names, file names, error
messages) is untrusted: terminal and JUnit output show control characters escaped and cut very
long text short; the JSON report keeps every name whole.
"""

from __future__ import annotations

import json
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from harness.worklog import Work

STATUSES = ("pass", "fail", "warn", "skip")
_SUMMARY_KEYS = {"pass": "passed", "fail": "failed", "warn": "warned", "skip": "skipped"}
SMALL_WORK_S = 0.05  # shared work below this is summed into one line on the terminal (the JSON lists it all)
TERMINAL_LINE_LIMIT = 400  # characters of one message on the terminal (the JSON keeps it whole)
JUNIT_TEXT_LIMIT = 4000
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, bidi overrides, separators


def printable(text: str, limit: int | None = TERMINAL_LINE_LIMIT) -> str:
    """``text`` safe to print: control and invisible characters shown as escapes, then cut to ``limit``."""
    text = str(text)
    more = ""
    if limit is not None and len(text) > limit:  # cut first: a 10 MB name is not escaped character by character
        more, text = f"… ({len(text) - limit + 1} more characters)", text[: limit - 1]
    if not text.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        text = "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)
    if limit is not None and len(text) > limit:  # escapes lengthened it
        more, text = more or "…", text[: limit - 1]
    return text + more


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@dataclass
class CheckResult:
    """The outcome of one check. ``message`` is one line; ``fix`` says what to do (fail/warn)."""

    id: str
    status: str
    message: str
    details: dict = field(default_factory=dict)
    fix: str | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        self.message = " ".join(str(self.message).split())  # exactly one line

    def to_dict(self) -> dict:
        details = dict(self.details)
        if self.fix is not None:
            details["fix"] = self.fix
        return {"id": self.id, "status": self.status, "message": self.message, "duration_s": self.duration_s,
                "details": _jsonable(details)}

    @classmethod
    def from_dict(cls, item: dict) -> CheckResult:
        details = dict(item.get("details") or {})
        fix = details.pop("fix", None)
        return cls(id=item["id"], status=item["status"], message=item["message"], details=details, fix=fix,
                   duration_s=item.get("duration_s"))


def environment() -> dict:
    """Versions of the libraries whose behaviour the checks depend on (None when not installed)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "peft"):
        module = sys.modules.get(name)  # what is really imported wins over package metadata
        found = getattr(module, "__version__", None) if module is not None else None
        if found is None:
            try:
                found = version(name)
            except PackageNotFoundError:
                found = None
        versions[name] = str(found) if found is not None else None
    return versions


def utc_now() -> str:
    """The time now, UTC, to the second (ISO 8601): when a run started, in every report."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


DEMO_TITLE = ("built-in demo: the synthetic XComposer base, a trained adapter and its merged checkpoint that "
              "plora-harness builds itself (not your adapter; pass --adapter DIR to check yours)")


def _users(work: Work, limit: int = 6) -> str:
    """Which checks used a piece of shared work: the one that caused it first."""
    if not work.checks:
        return "before the checks"
    text = f"caused by {work.checks[0]}"
    others = work.checks[1:]
    if others:
        more = f" (+{len(others) - limit} more)" if len(others) > limit else ""
        text += f"; also used by {', '.join(others[:limit])}{more}"
    return text


def _timing(started_at: str | None, duration_s: float | None) -> str | None:
    if started_at is None and duration_s is None:
        return None
    took = f"took {duration_s:.1f} s" if duration_s is not None else ""
    return ", ".join(t for t in (f"started {started_at}" if started_at else "", took) if t)


def _empty(value) -> bool:
    """A detail with nothing in it (None, "", [], {}): left out of the terminal's details, kept in the JSON."""
    return value is None or (isinstance(value, (str, list, tuple, dict, set)) and not value)


def _harness_version() -> str:
    from harness import __version__

    return __version__


def _summary(results: list[CheckResult]) -> dict:
    counts = {key: 0 for key in _SUMMARY_KEYS.values()}
    for result in results:
        counts[_SUMMARY_KEYS[result.status]] += 1
    return counts


@dataclass
class Report:
    """One adapter's report: what was given, what every planned check found, and what the harness adjusted."""

    inputs: dict = field(default_factory=dict)
    environment: dict = field(default_factory=environment)
    checks: list[CheckResult] = field(default_factory=list)
    harness_version: str = field(default_factory=_harness_version)
    notes: list[str] = field(default_factory=list)  # adjustments made (eager attention, dtype, untying ...)
    not_checked: list[str] = field(default_factory=list)  # what this run could not cover, and why
    code: list[dict] = field(default_factory=list)  # model code files run: {"file", "sha256", "executed"}
    demo: bool = False  # the built-in synthetic demo, not a user's adapter (said in the first line)
    started_at: str | None = field(default_factory=utc_now)  # UTC, ISO 8601
    duration_s: float | None = None  # wall time of this adapter's run, loading included
    work: list[Work] = field(default_factory=list)  # shared work (loads, reference, scans), timed once each

    @property
    def summary(self) -> dict:
        return _summary(self.checks)

    def other_s(self) -> float | None:
        """The run's seconds in neither a check's own time nor shared work (start-up, imports, clean-up)."""
        if self.duration_s is None or not self.work:  # not timed that way (check_trained, an older report)
            return None
        counted = sum(r.duration_s or 0.0 for r in self.checks) + sum(w.seconds for w in self.work)
        return round(max(0.0, self.duration_s - counted), 3)

    def caused_s(self, check_id: str) -> float:
        """Seconds of the shared work that check ``check_id`` was the first to need (it ran inside that check)."""
        return round(sum(w.seconds for w in self.work if w.caused_by == check_id), 3)

    @property
    def exit_code(self) -> int:
        return 1 if any(result.status == "fail" for result in self.checks) else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def get(self, check_id: str) -> CheckResult | None:
        for result in self.checks:
            if result.id == check_id:
                return result
        return None

    def __getitem__(self, check_id: str) -> CheckResult:
        result = self.get(check_id)
        if result is None:
            raise KeyError(check_id)
        return result

    def extend(self, results) -> None:
        self.checks.extend(results)

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "harness_version": self.harness_version,
            "exit_code": self.exit_code,
            "demo": self.demo,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "inputs": _jsonable(self.inputs),
            "environment": _jsonable(self.environment),
            "notes": list(self.notes),
            "not_checked": list(self.not_checked),
            "code": _jsonable(self.code),
            "checks": [result.to_dict() for result in self.checks],
            "work": [work.to_dict() for work in self.work],
            "summary": self.summary,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The inverse of ``to_dict`` (a report read back from its JSON, e.g. by another pytest worker)."""
        return cls(inputs=dict(data.get("inputs") or {}), environment=dict(data.get("environment") or {}),
                   checks=[CheckResult.from_dict(item) for item in data.get("checks", [])],
                   harness_version=data.get("harness_version", _harness_version()),
                   notes=list(data.get("notes") or []), not_checked=list(data.get("not_checked") or []),
                   code=list(data.get("code") or []), demo=bool(data.get("demo")),
                   started_at=data.get("started_at"), duration_s=data.get("duration_s"),
                   work=[Work.from_dict(item) for item in data.get("work") or []])

    def render(self, *, verbose: bool = False) -> str:
        """A table (id, status, message), then details and the fix of each failure and warning."""
        lines = [DEMO_TITLE, ""] if self.demo else []
        for key, value in self.inputs.items():
            if value is not None and not isinstance(value, (list, dict)):
                lines.append(f"{key}: {printable(value)}")
        if lines and lines[-1]:
            lines.append("")
        width = max([len("check")] + [len(r.id) for r in self.checks])
        lines.append(f"{'check':<{width}}  {'status':<6}  {'time':>6}  message")
        lines.append(f"{'-' * width}  {'-' * 6}  {'-' * 6}  {'-' * 7}")
        for result in self.checks:
            took = f"{result.duration_s:5.1f}s" if result.duration_s is not None else ""
            lines.append(f"{result.id:<{width}}  {result.status.upper():<6}  {took:>6}  {printable(result.message)}")
        problems = [r for r in self.checks if r.status in ("fail", "warn") or (verbose and r.details)]
        if problems:
            lines += ["", "Details"]
            for result in problems:
                lines += ["", f"[{result.status.upper()}] {result.id}: {printable(result.message)}"]
                for key, value in result.details.items():
                    if _empty(value):
                        continue
                    lines.append(f"    {printable(key, 80)}: {printable(_short(value), None)}")
                if result.fix and result.status in ("fail", "warn"):
                    lines.append(f"    fix: {printable(result.fix)}")
        if self.notes:
            lines += ["", "Notes"] + [f"- {printable(note)}" for note in self.notes]
        if self.code:
            lines += ["", "Model code (trusted with --trust-remote-code)"]
            ran = {True: "ran", False: "not run", None: "may have run"}
            lines += [f"- {printable(c.get('file'))} sha256 {c.get('sha256')} ({ran.get(c.get('executed'), 'ran')})"
                      for c in self.code]
        lines += self._time_lines()
        summary = self.summary
        timing = _timing(self.started_at, self.duration_s)
        lines += ["", f"run: {timing}"] if timing else [""]
        lines += [f"{summary['passed']} passed, {summary['failed']} failed, "
                  f"{summary['warned']} warnings, {summary['skipped']} skipped"]
        lines += [f"not checked: {printable(text)}" for text in self.not_checked]
        return "\n".join(lines)

    def _time_lines(self) -> list[str]:
        """Where the time went beyond each check's own (the table's time column): the shared work, once each."""
        big = sorted((w for w in self.work if w.seconds >= SMALL_WORK_S), key=lambda w: -w.seconds)
        small = [w for w in self.work if w.seconds < SMALL_WORK_S]
        other = self.other_s()
        if not big and not (other and other >= SMALL_WORK_S):
            return []
        lines = ["", "Where the rest of the time went (the time column is each check's own compute; shared work is "
                 "timed once, named with the checks that used it)"]
        lines += [f"{w.seconds:6.1f}s  {printable(w.name)}{f' (x{w.runs})' if w.runs > 1 else ''}: {_users(w)}"
                  for w in big]
        if small:
            lines.append(f"{sum(w.seconds for w in small):6.1f}s  {len(small)} smaller piece(s) of shared work")
        if other and other >= SMALL_WORK_S:
            lines.append(f"{other:6.1f}s  other: start-up, imports and clean-up")
        return lines

    def junit_suite(self, name: str = "plora-harness") -> ET.Element:
        """One ``testsuite``: a ``testcase`` per check; fail -> ``failure``, skip -> ``skipped``, warn -> system-out."""
        summary = self.summary
        total = self.duration_s if self.duration_s is not None else sum(r.duration_s or 0.0 for r in self.checks)
        suite = ET.Element("testsuite", name=_xml_text(name, 500), tests=str(len(self.checks)),
                           failures=str(summary["failed"]), errors="0", skipped=str(summary["skipped"]),
                           time=f"{total:.3f}")
        if self.started_at:
            suite.set("timestamp", self.started_at.rstrip("Z"))  # JUnit's schema: ISO 8601 without a zone (UTC)
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="harness_version", value=str(self.harness_version))
        ET.SubElement(properties, "property", name="exit_code", value=str(self.exit_code))
        if self.demo:
            ET.SubElement(properties, "property", name="demo", value=DEMO_TITLE)
        for key, value in {**self.environment, **{f"input.{k}": v for k, v in self.inputs.items()}}.items():
            if not isinstance(value, (list, dict)):
                ET.SubElement(properties, "property", name=_xml_text(key, 200), value=_xml_text(value))
        for index, note in enumerate(self.notes):
            ET.SubElement(properties, "property", name=f"note.{index}", value=_xml_text(note))
        for index, work in enumerate(self.work):  # a test case's time is the check's own; shared work is here
            ET.SubElement(properties, "property", name=f"work.{index}",
                          value=_xml_text(f"{work.name}: {work.seconds:.3f} s, {_users(work)}"))
        if (other := self.other_s()) is not None:
            ET.SubElement(properties, "property", name="work.other", value=f"start-up, imports and clean-up: "
                          f"{other:.3f} s")
        for result in self.checks:
            case = ET.SubElement(suite, "testcase", classname=_xml_text(name, 500), name=result.id,
                                 time=f"{result.duration_s or 0.0:.3f}")
            body = json.dumps(result.to_dict()["details"], indent=2)  # ASCII: json escapes every control char
            if result.status == "fail":
                element = ET.SubElement(case, "failure", message=_xml_text(result.message), type="fail")
                element.text = body
            elif result.status == "skip":
                ET.SubElement(case, "skipped", message=_xml_text(result.message))
            elif result.status == "warn":
                out = ET.SubElement(case, "system-out")
                out.text = f"WARNING: {_xml_text(result.message)}\n{body}"
        return suite

    def to_junit(self, path: str | Path) -> Path:
        return write_junit([self.junit_suite()], path)


@dataclass
class RunReport:
    """Several adapters checked in one run against one base: a report each, one exit code."""

    reports: list[Report] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: str | None = field(default_factory=utc_now)  # UTC, ISO 8601
    duration_s: float | None = None  # wall time of the whole run

    @property
    def exit_code(self) -> int:
        return max((report.exit_code for report in self.reports), default=0)

    @property
    def summary(self) -> dict:
        return _summary([result for report in self.reports for result in report.checks])

    def to_dict(self) -> dict:
        first = self.reports[0] if self.reports else Report()
        return {"harness_version": first.harness_version, "exit_code": self.exit_code,
                "demo": any(r.demo for r in self.reports), "started_at": self.started_at, "duration_s": self.duration_s,
                "environment": _jsonable(first.environment), "notes": list(self.notes),
                "reports": [report.to_dict() for report in self.reports], "summary": self.summary}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    def render(self, *, verbose: bool = False) -> str:
        parts = [DEMO_TITLE] if any(r.demo for r in self.reports) else []
        for index, report in enumerate(self.reports, 1):
            label = report.inputs.get("adapter", f"adapter {index}")
            parts.append(f"== adapter {index} of {len(self.reports)}: {printable(label)} ==\n"
                         f"{report.render(verbose=verbose)}")
        summary = self.summary
        failed = [r.inputs.get("adapter") for r in self.reports if r.exit_code]
        verdict = f"{len(failed)} of {len(self.reports)} adapters failed" if failed else \
            f"all {len(self.reports)} adapters passed"
        parts.append(f"== overall: {verdict}; {summary['passed']} passed, {summary['failed']} failed, "
                     f"{summary['warned']} warnings, {summary['skipped']} skipped ==")
        timing = _timing(self.started_at, self.duration_s)
        if timing:
            parts[-1] += f"\nrun: {timing}"
        return "\n\n".join(parts)

    def to_junit(self, path: str | Path) -> Path:
        return write_junit([r.junit_suite(f"plora-harness::{r.inputs.get('adapter', i)}")
                            for i, r in enumerate(self.reports)], path)


def write_junit(suites: list[ET.Element], path: str | Path) -> Path:
    path = Path(path)
    root = ET.Element("testsuites")
    root.extend(suites)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _xml_text(value, limit: int | None = JUNIT_TEXT_LIMIT) -> str:
    """Text XML 1.0 can hold: characters it forbids (even escaped) shown as escapes, very long text cut."""
    return printable(str(value), limit) if value is not None else ""


def _short(value, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value):
    """Make details JSON-safe: paths and tuples become strings/lists, non-finite floats strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    try:  # numpy / torch scalars
        return _jsonable(value.item())
    except Exception:
        return str(value)
