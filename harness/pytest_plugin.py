"""pytest plugin (entry point ``pytest11``): ``--plora-*`` options and one item per adapter × check id.

Wiring only, the way pytest's own plugins do it: every option carries the ``--plora-`` prefix in its
own group, so nothing clashes with a repository's ``--device`` or ``--adapter``; without any
``--plora-*`` option or ``PLORA_HARNESS_*`` input variable the plugin adds nothing and imports nothing
heavy. Any of them without an adapter (or a variable set but empty) is a usage error: a gate whose
adapter variable is misspelt or empty must not pass having checked nothing. The engine runs once
per adapter per test run (under pytest-xdist too: the first worker to
need an adapter's report computes it under a file lock, the others read it), in a child process.

Item outcome: a check that passed passes; one that warned passes with a ``ConformanceWarning``; one
that failed fails with its one-line message and fix; one that does not apply is skipped with the reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

OPTION_ENV = {
    "plora_adapter": "PLORA_HARNESS_ADAPTER",  # several adapters: separated by os.pathsep
    "plora_base_model": "PLORA_HARNESS_BASE_MODEL",
    "plora_merged": "PLORA_HARNESS_MERGED",  # several: separated by os.pathsep, one per adapter in order
}
LISTS = ("plora_adapter", "plora_merged")
COLLECTOR_NAME = "plora-conformance"


class ConformanceWarning(UserWarning):
    """A conformance check warned: the item passes, and the warning says what to look at."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plora-harness", "LoRA adapter conformance (plora-harness)")
    group.addoption("--plora-adapter", action="append", metavar="DIR[=MERGED]",
                    help="adapter directory (or a folder of adapters) to check; repeatable; DIR=MERGED pairs it with "
                    "its merged checkpoint (env PLORA_HARNESS_ADAPTER, os.pathsep-separated)")
    group.addoption("--plora-base-model", metavar="DIR",
                    help="base model directory: adds loading and numerical checks (env PLORA_HARNESS_BASE_MODEL)")
    group.addoption("--plora-merged", action="append", metavar="DIR",
                    help="merged checkpoint directory to verify, one per --plora-adapter in the same order "
                    "(env PLORA_HARNESS_MERGED)")
    group.addoption("--plora-trust-remote-code", action="store_true",
                    help="allow the base/merged directory's own Python code to run (in a child process)")
    group.addoption("--plora-report", type=Path, metavar="PATH", help="write the JSON conformance report here")
    group.addoption("--plora-device", choices=["cpu", "cuda"], default=None, help="device for the dynamic checks")
    group.addoption("--plora-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype for the dynamic checks (default: the dtype the checkpoint is stored in)")
    group.addoption("--plora-trained-on-quantized", choices=["nf4", "fp4", "int8"], default=None,
                    help="the adapter was trained on the base quantized this way (QLoRA)")
    group.addoption("--plora-only", action="append", default=[], metavar="ID", help="run only this check id")
    group.addoption("--plora-skip", action="append", default=[], metavar="ID", help="do not run this check id")
    group.addoption("--plora-max-memory", default=None, metavar="SIZE",
                    help="memory the dynamic checks may use, e.g. 8GiB (default: what is available); a larger base "
                    "is checked on depth slices")
    group.addoption("--plora-timeout", type=float, default=None, metavar="SECONDS",
                    help="limit per adapter for the engine process")
    group.addoption("--plora-allow-plora-targets", action="store_true", help="lora-on-plora warns instead of failing")
    parser.addini("plora_inputs_without_adapter", type="bool", default=False,
                  help="plora-harness: this repository's own tests read the --plora-* inputs (e.g. a GPU suite), so "
                  "inputs without --plora-adapter are not a usage error")


def option(config: pytest.Config, name: str):
    """A plugin option (``plora_base_model`` ...), falling back to its environment variable."""
    value = config.getoption(name)
    if value is None and name in OPTION_ENV and os.environ.get(OPTION_ENV[name]):
        raw = os.environ[OPTION_ENV[name]]
        value = [p for p in raw.split(os.pathsep) if p] if name in LISTS else raw
    return value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "plora_conformance: a plora-harness conformance check item")
    if not hasattr(config, "workerinput"):  # the controller validates once; workers trust it
        config._plora_pairs = _validated_pairs(config)
    else:
        config._plora_pairs = _pairs(config) if option(config, "plora_adapter") else []


def _validated_pairs(config: pytest.Config) -> list[tuple[str, str | None]]:
    """The adapters with their merged checkpoints, or a ``pytest.UsageError`` (one line) when the inputs given
    cannot make a run: any ``--plora-*`` input or ``PLORA_HARNESS_*`` variable without an adapter, a variable set
    but empty, an empty path, merged checkpoints that do not pair with the adapters."""
    for name, env in OPTION_ENV.items():
        if env in os.environ and not os.environ[env].strip(os.pathsep + " "):
            raise pytest.UsageError(f"plora-harness: {env} is set but empty; set it to the directory (or unset it "
                                    "to run without conformance checks)")
    given = [f"--{n.replace('_', '-')}" for n in _INPUT_OPTIONS if config.getoption(n) not in (None, False, [])]
    given += [env for env in OPTION_ENV.values() if env in os.environ]
    adapters = option(config, "plora_adapter")
    if not adapters:
        if given and not config.getini("plora_inputs_without_adapter"):
            raise pytest.UsageError(f"plora-harness: {', '.join(given)} given without an adapter, so nothing would be "
                                    "checked; pass --plora-adapter=DIR (or set PLORA_HARNESS_ADAPTER)")
        return []
    for name in ("plora_adapter", "plora_base_model", "plora_merged"):
        value = option(config, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not str(item).strip():
                raise pytest.UsageError(f"plora-harness: --{name.replace('_', '-')} is empty (an unset variable?); "
                                        "pass the directory")
    from harness.inputs.errors import InputError

    try:
        return _pairs(config)
    except InputError as err:
        raise pytest.UsageError(f"plora-harness: {err}") from None


def _pairs(config: pytest.Config) -> list[tuple[str, str | None]]:
    """Adapters (folders of adapters expanded) with their merged checkpoints, paired as the CLI pairs them."""
    from harness.engine.plan import pair_merged
    from harness.inputs.roles import adapters_in_folder

    pairs = []
    for adapter, merged in pair_merged(option(config, "plora_adapter"), option(config, "plora_merged")):
        folder = adapters_in_folder(Path(adapter).expanduser()) if merged is None else []
        pairs += [(str(a), None) for a in folder] if folder else [(adapter, merged)]
    return pairs


_INPUT_OPTIONS = ("plora_base_model", "plora_merged", "plora_trust_remote_code", "plora_report", "plora_device",
                  "plora_dtype", "plora_only", "plora_skip", "plora_timeout", "plora_allow_plora_targets",
                  "plora_max_memory")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the conformance items like any other collector (reported, counted, selectable with -k/-m)."""
    pairs = getattr(config, "_plora_pairs", None)
    if not pairs:
        return
    root = ConformanceRoot.from_parent(session, name=COLLECTOR_NAME, nodeid=COLLECTOR_NAME, pairs=pairs)
    items.extend(session.genitems(root))


class AdapterRun:
    """One adapter's report, computed once per test run (across xdist workers), on first use."""

    def __init__(self, config: pytest.Config, adapter: str, merged: str | None, label: str) -> None:
        self.config, self.adapter, self.merged, self.label = config, Path(adapter), merged, label
        self.error: str | None = None
        self._report = None

    @property
    def report(self):
        if self._report is None and self.error is None:
            from harness.report import Report
            from harness.run_once import computed_once

            outcome = computed_once(_shared_dir(self.config), self._key(), self._run)
            self.error = outcome.get("error")
            self._report = Report.from_dict(outcome["report"]) if "report" in outcome else None
        return self._report

    def _options(self) -> dict:
        config = self.config
        options = {
            "base_model": option(config, "plora_base_model"), "merged": self.merged,
            "dtype": config.getoption("plora_dtype"), "device": config.getoption("plora_device") or "cpu",
            "allow_plora_targets": config.getoption("plora_allow_plora_targets"),
            "trust_remote_code": config.getoption("plora_trust_remote_code"),
            "trained_on_quantized": config.getoption("plora_trained_on_quantized"),
            "only": tuple(config.getoption("plora_only")), "skip": tuple(config.getoption("plora_skip")),
        }
        if config.getoption("plora_timeout") is not None:
            options["timeout"] = config.getoption("plora_timeout")
        if config.getoption("plora_max_memory") is not None:
            options["max_memory"] = config.getoption("plora_max_memory")
        return options

    def _key(self) -> str:
        import hashlib

        text = repr((str(self.adapter), sorted((k, str(v)) for k, v in self._options().items())))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _run(self) -> dict:
        from harness.api import check
        from harness.compat import UnsupportedStack
        from harness.inputs.errors import InputError

        try:
            report = check(self.adapter, **self._options())
        except InputError as err:
            return {"error": f"input cannot be used: {err}"}
        except UnsupportedStack as err:
            return {"error": str(err)}
        return {"report": report.to_dict()}


class ConformanceRoot(pytest.Collector):
    """``plora-conformance``: one child per adapter."""

    def __init__(self, *, pairs: list[tuple[str, str | None]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs = pairs

    def collect(self):
        labels = _labels([Path(a) for a, _ in self.pairs])
        for (adapter, merged), label in zip(self.pairs, labels):
            run = AdapterRun(self.config, adapter, merged, label)
            yield AdapterCollector.from_parent(self, name=label, run=run)


class AdapterCollector(pytest.Collector):
    """``plora-conformance::<adapter>``: one item per planned check id."""

    def __init__(self, *, run: AdapterRun, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run = run

    def collect(self):
        for check_id in _planned_ids(self.config, self.run):
            yield ConformanceItem.from_parent(self, name=check_id, check_id=check_id, run=self.run)


class ConformanceItem(pytest.Item):
    def __init__(self, *, check_id: str, run: AdapterRun, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check_id = check_id
        self.run = run
        self.add_marker(pytest.mark.plora_conformance)

    def setup(self) -> None:
        """The adapter's report is computed here, as a fixture would be: the engine's time is this phase's, and
        ``pytest_runtest_makereport`` then gives each phase the time the engine attributed to this check."""
        self.run.report  # noqa: B018 - computed once per adapter; a failure to compute is runtest's to report

    def runtest(self) -> None:
        report = self.run.report
        if report is None:
            raise ConformanceFailure(self.run.error or "no report")
        _write_report(self.config, self.run, report)
        result = report.get(self.check_id)
        if result is None:
            raise ConformanceFailure(f"{self.check_id}: the engine did not report this check")
        outcome_of(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.run.adapter, None, f"{COLLECTOR_NAME}::{self.run.label}::{self.check_id}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A conformance item's durations as the engine attributed them (``harness.worklog``): the call phase is the
    check's own compute, the setup phase the shared work it was first to need (model loads, the fp32 reference;
    the first check also gets the engine's start-up), so ``--durations`` and JUnit do not put a run's loading
    on whichever item computed the report."""
    outcome = yield
    if isinstance(item, ConformanceItem) and call.when in ("setup", "call"):
        _attribute(item, outcome.get_result())


def _attribute(item: ConformanceItem, test_report: pytest.TestReport) -> None:
    report = item.run._report  # never computes it here
    result = report.get(item.check_id) if report is not None else None
    if result is None or result.duration_s is None or not report.work:
        return
    if test_report.when == "call":
        test_report.duration = result.duration_s
        return
    caused = [w for w in report.work if w.caused_by == item.check_id]
    seconds = sum(w.seconds for w in caused)
    if report.checks and report.checks[0].id == item.check_id:  # the run's start-up, before any check
        seconds += sum(w.seconds for w in report.work if w.caused_by is None) + (report.other_s() or 0.0)
    test_report.duration = round(seconds, 3)
    if caused:
        item.user_properties.append(("plora_shared_work", "; ".join(
            f"{w.name}: {w.seconds:.3f} s" + (f" (also used by {', '.join(w.checks[1:])})" if w.checks[1:] else "")
            for w in caused)))


def outcome_of(result) -> None:
    """A check result as a pytest outcome: pass passes, warn passes with a warning, fail fails, skip skips."""
    from harness.report import printable

    if result.status == "skip":
        pytest.skip(printable(result.message))
    if result.status == "warn":
        warnings.warn(ConformanceWarning(f"{result.id}: {printable(result.message)}"), stacklevel=2)
    elif result.status == "fail":
        problems = result.details.get("problems")
        several = isinstance(problems, list) and len(problems) > 1  # each visible, not "(+1 more problem(s))"
        more = "".join(f"\n- {printable(p)}" for p in problems) if several else ""
        fix = f"\nfix: {printable(result.fix)}" if result.fix else ""
        raise ConformanceFailure(f"{result.id}: {printable(result.message)}{more}{fix}")
    elif result.status != "pass":
        raise ConformanceFailure(f"{result.id}: unknown status {result.status!r}")


class ConformanceFailure(Exception):
    """A failed conformance check: reported as its one-line message and fix, no traceback."""


def _planned_ids(config: pytest.Config, run: AdapterRun) -> list[str]:
    from harness.engine.plan import Plan, absolute

    plan = Plan(adapters=(absolute(run.adapter),), base_model=absolute(option(config, "plora_base_model")),
                merged=(absolute(run.merged),) if run.merged else (), only=tuple(config.getoption("plora_only")),
                skip=tuple(config.getoption("plora_skip")))
    return plan.planned_ids(0)


def _labels(adapters: list[Path]) -> list[str]:
    """A short, unique, stable name per adapter: its directory name (with the parent's when two collide)."""
    names = [Path(a).name or str(a) for a in adapters]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(a).parent.name}/{Path(a).name}" if names.count(n) > 1 else n for a, n in zip(adapters, names)]


def _write_report(config: pytest.Config, run: AdapterRun, report) -> None:
    """``--plora-report``: the JSON report (of several adapters, a run report), written once per adapter."""
    path = config.getoption("plora_report")
    if not path or getattr(run, "_written", False):
        return
    run._written = True
    from harness.run_once import computed_once

    computed_once(_shared_dir(config), f"report-{run._key()}", lambda: _merge_report(Path(path), report))


def _merge_report(path: Path, report) -> dict:
    """Add one adapter's report to the JSON file (a file lock serialises writers)."""
    import json

    from filelock import FileLock

    from harness.report import Report, RunReport

    with FileLock(str(path) + ".lock"):
        reports = []
        if path.is_file():
            data = json.loads(path.read_text())
            reports = [Report.from_dict(r) for r in data["reports"]] if "reports" in data else [Report.from_dict(data)]
        reports = [r for r in reports if r.inputs.get("adapter") != report.inputs.get("adapter")] + [report]
        out = reports[0] if len(reports) == 1 else RunReport(reports=reports)
        path.write_text(out.to_json())
    return {"written": str(path)}


def _shared_dir(config: pytest.Config) -> Path | None:
    """Under pytest-xdist, a directory all workers of this run share (inside the run's base temp dir,
    which pytest cleans up like any other); None in a single process."""
    if not hasattr(config, "workerinput"):
        return None
    factory = getattr(config, "_tmp_path_factory", None) or pytest.TempPathFactory.from_config(config, _ispytest=True)
    return factory.getbasetemp().parent / "plora-harness-conformance"
