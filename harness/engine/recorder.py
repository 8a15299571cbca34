"""Engine events in, reports out: the one place that turns what the engine said into the verdict.

The engine (in this process or a child) reports by events, each a small JSON-able dict::

    {"type": "start", "adapter": 0, "planned": [ids]}       the engine starts adapter 0 (this process's plan rules)
    {"type": "inputs", "adapter": 0, "inputs": {...}}       what was read
    {"type": "progress", "adapter": 0, "text": "..."}       what runs now (shown, not recorded)
    {"type": "result", "adapter": 0, "result": {...}}       one finished check (``CheckResult.to_dict``)
    {"type": "notes", "adapter": 0, "notes": [...]}         adjustments the harness made
    {"type": "code", "files": [{"file", "sha256", "executed"}]}  model code files
    {"type": "input_error", "message": "..."}               an input cannot be used at all (exit 2)
    {"type": "fatal", "message": "..."}                     the engine stopped early (model code ended it)
    {"type": "done"}

``finish`` turns every planned check the engine did not report into a ``fail`` with one line saying
why, so a run that ended early can never look like a run that passed.
"""

from __future__ import annotations

from harness.engine.plan import Plan
from harness.report import CheckResult, Report, RunReport

NOT_REPORTED_FIX = ("read the message: it names what ended the run; rerun with --verbose to see the engine's own "
                    "output")


class Recorder:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.reports = [Report(inputs={"adapter": adapter}) for adapter in plan.adapters]
        self.planned = {index: plan.planned_ids(adapter) for index, adapter in enumerate(plan.adapters)}
        self.current: dict[int, str] = {}  # adapter -> the last progress line (what was running)
        self.current_adapter: int | None = None
        self.input_error: str | None = None
        self.fatal: str | None = None
        self.done = False
        self.run_notes: list[str] = []
        for report in self.reports:
            report.not_checked = _not_checked(plan)
            if plan.base_model is not None:
                report.inputs["base_model"] = plan.base_model
            if plan.merged is not None:
                report.inputs["merged"] = plan.merged

    def handle(self, event: dict) -> None:
        kind, index = event.get("type"), event.get("adapter")
        report = self.reports[index] if isinstance(index, int) and 0 <= index < len(self.reports) else None
        if index is not None:
            self.current_adapter = index
        if kind == "inputs" and report is not None:
            report.inputs.update(event["inputs"])
        elif kind == "progress" and report is not None:
            self.current[index] = event["text"]
        elif kind == "result" and report is not None:
            result = CheckResult.from_dict(event["result"])
            report.checks = [r for r in report.checks if r.id != result.id] + [result]
        elif kind == "notes" and report is not None:
            report.notes += [n for n in event["notes"] if n not in report.notes]
        elif kind == "code":
            for report in self.reports:
                report.code = list(event["files"])
        elif kind == "input_error":
            self.input_error = event["message"]
        elif kind == "fatal":
            self.fatal = event["message"]
        elif kind == "done":
            self.done = True

    def running(self) -> str:
        """What the engine was doing last, for messages about a run that ended early."""
        index = self.current_adapter
        text = self.current.get(index) if index is not None else None
        return text or "starting"

    def finish(self, problem: str | None = None) -> RunReport:
        """The reports, with every planned check the engine did not report failed with ``problem``."""
        problem = problem or self.fatal
        if problem is None and not self.done:
            problem = "the engine stopped before reporting this check"
        for index, report in enumerate(self.reports):
            reported = {r.id for r in report.checks}
            missing = [i for i in self.planned[index] if i not in reported]
            for check_id in missing:
                report.checks.append(CheckResult(check_id, "fail", f"not checked: {problem}",
                                                 {"not_reported": True}, fix=NOT_REPORTED_FIX))
            order = {check_id: n for n, check_id in enumerate(self.planned[index])}
            report.checks.sort(key=lambda r: order.get(r.id, len(order)))
        return RunReport(reports=self.reports, notes=self.run_notes)


def _not_checked(plan: Plan) -> list[str]:
    lines = []
    if plan.base_model is None:
        lines.append("loading and numerics: no --base-model (static checks of the adapter files only)")
    if plan.merged is None:
        lines.append("a merged checkpoint: no --merged")
    if plan.only:
        lines.append(f"every check but {', '.join(plan.only)} (--only)")
    if plan.skip:
        lines.append(f"{', '.join(plan.skip)} (--skip)")
    return lines
