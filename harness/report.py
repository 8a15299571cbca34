"""Check results and the report: plain-text table, JSON, JUnit XML, exit code."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("pass", "fail", "warn", "skip")
_SUMMARY_KEYS = {"pass": "passed", "fail": "failed", "warn": "warned", "skip": "skipped"}


@dataclass
class CheckResult:
    """The outcome of one check. ``message`` is one line; ``fix`` says what to do (fail/warn)."""

    id: str
    status: str
    message: str
    details: dict = field(default_factory=dict)
    fix: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        self.message = " ".join(str(self.message).split())  # exactly one line

    def to_dict(self) -> dict:
        details = dict(self.details)
        if self.fix is not None:
            details["fix"] = self.fix
        return {"id": self.id, "status": self.status, "message": self.message, "details": _jsonable(details)}


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


def _harness_version() -> str:
    from harness import __version__

    return __version__


@dataclass
class Report:
    inputs: dict = field(default_factory=dict)
    environment: dict = field(default_factory=environment)
    checks: list[CheckResult] = field(default_factory=list)
    harness_version: str = field(default_factory=_harness_version)

    @property
    def summary(self) -> dict:
        counts = {key: 0 for key in _SUMMARY_KEYS.values()}
        for result in self.checks:
            counts[_SUMMARY_KEYS[result.status]] += 1
        return counts

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
            "inputs": _jsonable(self.inputs),
            "environment": _jsonable(self.environment),
            "checks": [result.to_dict() for result in self.checks],
            "summary": self.summary,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The inverse of ``to_dict`` (a report read back from its JSON, e.g. by another pytest worker)."""
        checks = []
        for item in data.get("checks", []):
            details = dict(item.get("details") or {})
            fix = details.pop("fix", None)
            checks.append(CheckResult(id=item["id"], status=item["status"], message=item["message"],
                                      details=details, fix=fix))
        return cls(inputs=dict(data.get("inputs") or {}), environment=dict(data.get("environment") or {}),
                   checks=checks, harness_version=data.get("harness_version", _harness_version()))

    def render(self) -> str:
        """A table (id, status, message), then details and the fix of each failure and warning."""
        lines = []
        if self.inputs:
            for key, value in self.inputs.items():
                if value is not None and not isinstance(value, (list, dict)):
                    lines.append(f"{key}: {value}")
            lines.append("")
        width = max([len("check")] + [len(r.id) for r in self.checks])
        lines.append(f"{'check':<{width}}  {'status':<6}  message")
        lines.append(f"{'-' * width}  {'-' * 6}  {'-' * 7}")
        for result in self.checks:
            lines.append(f"{result.id:<{width}}  {result.status.upper():<6}  {result.message}")
        problems = [r for r in self.checks if r.status in ("fail", "warn")]
        if problems:
            lines.append("")
            lines.append("Details")
            for result in problems:
                lines.append("")
                lines.append(f"[{result.status.upper()}] {result.id}: {result.message}")
                for key, value in result.details.items():
                    lines.append(f"    {key}: {_short(value)}")
                if result.fix:
                    lines.append(f"    fix: {result.fix}")
        summary = self.summary
        lines.append("")
        lines.append(
            f"{summary['passed']} passed, {summary['failed']} failed, "
            f"{summary['warned']} warnings, {summary['skipped']} skipped"
        )
        return "\n".join(lines)

    def to_junit(self, path: str | Path) -> Path:
        """One ``testcase`` per check id; fail -> ``failure``, skip -> ``skipped``, warn -> system-out."""
        summary = self.summary
        suite = ET.Element(
            "testsuite",
            name="plora-harness",
            tests=str(len(self.checks)),
            failures=str(summary["failed"]),
            errors="0",
            skipped=str(summary["skipped"]),
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="harness_version", value=str(self.harness_version))
        for key, value in {**self.environment, **{f"input.{k}": v for k, v in self.inputs.items()}}.items():
            if not isinstance(value, (list, dict)):
                ET.SubElement(properties, "property", name=str(key), value=str(value))
        for result in self.checks:
            case = ET.SubElement(suite, "testcase", classname="plora-harness", name=result.id)
            body = json.dumps(result.to_dict()["details"], indent=2)
            if result.status == "fail":
                element = ET.SubElement(case, "failure", message=result.message, type="fail")
                element.text = body
            elif result.status == "skip":
                ET.SubElement(case, "skipped", message=result.message)
            elif result.status == "warn":
                out = ET.SubElement(case, "system-out")
                out.text = f"WARNING: {result.message}\n{body}"
        path = Path(path)
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
        return path


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
