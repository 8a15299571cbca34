"""Engine events in, reports out: the one place that turns what the engine said into the verdict.

The engine (in this process or a child) reports by the typed events of ``harness.engine.events``
(``Start``, ``Inputs``, ``Progress``, ``Result``, ``Work``, ``Notes``, ``Code``, ``InputRefused``, ``Fatal``,
``ExitCalled``, ``Done``; one JSON object per line across the process boundary).

``finish`` turns every planned check the engine did not report into a ``fail`` with one line saying
why, so a run that ended early can never look like a run that passed.
"""

from __future__ import annotations

import time

from harness.engine import events as ev
from harness.engine.plan import Plan
from harness.report import CheckResult, Report, RunReport, utc_now
from harness.worklog import Work

NOT_REPORTED_FIX = ("read the message: it names what ended the run; rerun with --verbose to see the engine's own "
                    "output")


class Recorder:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started, self.started_at = time.monotonic(), utc_now()
        self.reports = [Report(inputs={"adapter": adapter}, demo=plan.demo, started_at=self.started_at)
                        for adapter in plan.adapters]
        self.planned = {index: plan.planned_ids(index) for index in range(len(plan.adapters))}
        self.adapter_started: dict[int, float] = {0: self.started}  # the first adapter's time includes start-up
        self.current: dict[int, str] = {}  # adapter -> the last progress line (what was running)
        self.current_adapter: int | None = None
        self.input_error: str | None = None
        self.fatal: str | None = None
        self.exit_call: ev.ExitCalled | None = None  # model code called os._exit: where
        self.done = False
        self.run_notes: list[str] = []
        for index, report in enumerate(self.reports):
            report.not_checked = _not_checked(plan, index)
            if plan.base_model is not None:
                report.inputs["base_model"] = plan.base_model
            if plan.merged_for(index) is not None:
                report.inputs["merged"] = plan.merged_for(index)

    def handle(self, event: ev.Event) -> None:
        index = getattr(event, "adapter", None)
        report = self.reports[index] if isinstance(index, int) and 0 <= index < len(self.reports) else None
        if index is not None:
            self.current_adapter = index
        if isinstance(event, ev.Start) and report is not None and index > 0:
            self.adapter_started[index] = time.monotonic()
            report.started_at = utc_now()
        elif isinstance(event, ev.Inputs) and report is not None:
            report.inputs.update(event.inputs)
        elif isinstance(event, ev.Progress) and report is not None:
            self.current[index] = event.text
        elif isinstance(event, ev.Result) and report is not None:
            report.checks = [r for r in report.checks if r.id != event.result.id] + [event.result]
        elif isinstance(event, ev.Work) and report is not None:
            report.work = _work(event.work)
        elif isinstance(event, ev.Notes) and report is not None:  # the adapter's last event
            report.notes += [n for n in event.notes if n not in report.notes]
            if index in self.adapter_started:
                report.duration_s = round(time.monotonic() - self.adapter_started[index], 3)
        elif isinstance(event, ev.Code):
            for report in self.reports:
                report.code = list(event.files)
        elif isinstance(event, ev.InputRefused):
            self.input_error = event.message
        elif isinstance(event, ev.Fatal):
            self.fatal = event.message
        elif isinstance(event, ev.ExitCalled):
            self.exit_call = event
        elif isinstance(event, ev.Done):
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
            if report.duration_s is None:  # ended early: the time until now
                report.duration_s = round(time.monotonic() - self.adapter_started.get(index, self.started), 3)
        return RunReport(reports=self.reports, notes=self.run_notes, started_at=self.started_at,
                         duration_s=round(time.monotonic() - self.started, 3))


def _work(items: list) -> list[Work]:
    """The shared work the engine reported; an entry that is not one is dropped, never half-understood."""
    work = []
    for item in items if isinstance(items, list) else []:
        try:
            work.append(Work.from_dict(item))
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
    return work


def _not_checked(plan: Plan, index: int) -> list[str]:
    lines = []
    if plan.base_model is None:
        lines.append("loading and numerics: no --base-model (static checks of the adapter files only)")
    if plan.merged_for(index) is None:
        lines.append("a merged checkpoint: no --merged")
    if plan.only:
        lines.append(f"every check but {', '.join(plan.only)} (--only)")
    if plan.skip:
        lines.append(f"{', '.join(plan.skip)} (--skip)")
    return lines
