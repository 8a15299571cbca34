"""pytest plugin (entry point ``pytest11``): ``--plora-*`` options and one item per adapter × check id.

Wiring only, the way pytest's own plugins do it: the options are the rows of ``harness.options`` (the CLI's),
each with the ``--plora-`` prefix in its own group, so nothing clashes with a repository's ``--device`` or
``--adapter``; each falls back, as on the CLI, to its ``PLORA_HARNESS_*`` variable, then to
``[tool.plora-harness]`` in the pyproject.toml nearest the rootdir. Without any of them the plugin adds nothing
and imports nothing heavy. Any of them without an adapter (or a variable set but empty) is a usage error: a
gate whose adapter variable is misspelt or empty must not pass having checked nothing. The engine runs once
per adapter per test run (under pytest-xdist too: the first worker to
need an adapter's report computes it under a file lock, the others read it), in a child process.

Item outcome: a check that passed passes; one that warned passes with a ``ConformanceWarning``; one
that failed fails with its one-line message and fix; one that does not apply is skipped with the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

COLLECTOR_NAME = "plora-conformance"
SHARED_DIR_KEY = "plora_harness_shared_dir"  # in xdist's workerinput: the directory the workers share


class ConformanceWarning(UserWarning):
    """A conformance check warned: the item passes, and the warning says what to look at."""


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``plugin`` options of ``harness.options``, each as ``--plora-<name>``; values stay text here and are
    parsed, with the fallbacks, by ``harness.settings.resolve`` (as the CLI's are)."""
    from harness.options import FLAG, OPTIONS

    group = parser.getgroup("plora-harness", "LoRA adapter conformance (plora-harness)")
    for opt in OPTIONS:
        if not opt.plugin:
            continue
        help_text = opt.help + (f" (env {opt.env_var})" if opt.env else "")
        if opt.kind == FLAG:
            group.addoption(opt.plugin_option, dest=opt.plugin_dest, action="store_true", help=help_text)
        elif opt.choices:
            group.addoption(opt.plugin_option, dest=opt.plugin_dest, choices=list(opt.choices), default=None,
                            help=help_text)
        else:
            group.addoption(opt.plugin_option, dest=opt.plugin_dest, action="append" if opt.repeatable else "store",
                            default=None, metavar=opt.metavar, help=help_text)
    parser.addini("plora_inputs_without_adapter", type="bool", default=False,
                  help="plora-harness: this repository's own tests read the --plora-* inputs (e.g. a GPU suite), so "
                  "inputs without --plora-adapter are not a usage error")


_RESOLVED = pytest.StashKey[object]()
_PAIRS = pytest.StashKey[list]()
_UNITS = pytest.StashKey[list]()  # per adapter (as _PAIRS), its checks as units of work (harness.engine.units)
UNITS_KEY = "plora_harness_units"  # in xdist's workerinput: the controller's units, so every worker collects alike
_SHARED = pytest.StashKey[object]()


def _resolved(config: pytest.Config):
    """Every plugin option: the command line, else PLORA_HARNESS_<NAME>, else [tool.plora-harness] in the
    pyproject.toml nearest the rootdir, else the default (``harness.settings.resolve``, as the CLI)."""
    from harness.inputs.errors import InputError
    from harness.options import OPTIONS
    from harness.settings import find_pyproject, resolve

    given = {o.name: v for o in OPTIONS if o.plugin and (v := config.getoption(o.plugin_dest)) not in (None, False)}
    try:
        return resolve("plugin", given, pyproject=find_pyproject(config.rootpath))
    except InputError as err:
        raise pytest.UsageError(f"plora-harness: {err}") from None


def option(config: pytest.Config, name: str):
    """A plugin option (``plora_base_model`` ...) as the plugin resolved it (command line, variable, pyproject)."""
    resolved = config.stash.get(_RESOLVED, None)
    if resolved is None:
        return config.getoption(name)
    return resolved.values.get(name.removeprefix("plora_"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "plora_conformance: a plora-harness conformance check item")
    resolved = config.stash[_RESOLVED] = _resolved(config)
    if not hasattr(config, "workerinput"):  # the controller validates and plans once; workers take its plan
        config.stash[_PAIRS] = _validated_pairs(config, resolved)
        config.stash[_UNITS] = [_units(config, adapter, merged) for adapter, merged in config.stash[_PAIRS]]
    else:
        config.stash[_PAIRS] = _pairs(resolved) if resolved.values["adapter"] else []
        planned = config.workerinput.get(UNITS_KEY)
        config.stash[_UNITS] = (_units_from_json(planned) if planned is not None else
                                [_units(config, adapter, merged) for adapter, merged in config.stash[_PAIRS]])


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_SHARED, None)
    if shared is not None and not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist (controller): hand each worker the directory the workers share, made here, once per run, and
    the units of work planned here (the memory available differs between moments; workers must collect alike)."""
    if node.config.stash.get(_PAIRS, None):
        import json

        node.workerinput[SHARED_DIR_KEY] = str(_controller_dir(node.config))
        node.workerinput[UNITS_KEY] = json.dumps([[u.to_json() for u in units] for units in node.config.stash[_UNITS]])


def _units_from_json(text: str) -> list:
    import json

    from harness.engine.units import WorkUnit

    return [[WorkUnit.from_json(u) for u in units] for units in json.loads(text)]


def _units(config: pytest.Config, adapter: str, merged: str | None) -> list:
    """The adapter's checks as units of work: one, or the whole-model checks plus the dynamic checks once per depth
    slice when the base does not fit the memory each worker has (the budget shared by this run's xdist workers)."""
    from harness.engine.units import WorkUnit, work_units

    values = config.stash[_RESOLVED].values
    ids = _planned_ids(config, adapter, merged)
    if values["base_model"] is None:
        return [WorkUnit(tuple(ids))]
    from harness.loading.slices import available_bytes, temporary_disk_free

    budget = values["max_memory"] or available_bytes(values["device"] or "cpu")
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    return work_units(ids, values["base_model"], adapter, dtype=values["dtype"], budget=budget // workers,
                      disk=temporary_disk_free() // workers)


def _validated_pairs(config: pytest.Config, resolved) -> list[tuple[str, str | None]]:
    """The adapters with their merged checkpoints, or a ``pytest.UsageError`` (one line) when the inputs given
    cannot make a run: any ``--plora-*`` input, ``PLORA_HARNESS_*`` variable or ``[tool.plora-harness]`` key
    without an adapter, merged checkpoints that do not pair with the adapters."""
    if not resolved.values["adapter"]:
        given = resolved.given()
        if given and not config.getini("plora_inputs_without_adapter"):
            raise pytest.UsageError(f"plora-harness: {', '.join(given)} given without an adapter, so nothing would be "
                                    "checked; pass --plora-adapter=DIR (or set PLORA_HARNESS_ADAPTER)")
        return []
    from harness.inputs.errors import InputError

    try:
        return _pairs(resolved)
    except InputError as err:
        raise pytest.UsageError(f"plora-harness: {err}") from None


def _pairs(resolved) -> list[tuple[str, str | None]]:
    """Adapters (folders of adapters expanded) with their merged checkpoints, paired as the CLI pairs them."""
    from harness.engine.plan import pair_merged
    from harness.inputs.roles import adapters_in_folder

    pairs = []
    for adapter, merged in pair_merged(resolved.values["adapter"], resolved.values["merged"]):
        folder = adapters_in_folder(Path(adapter).expanduser()) if merged is None else []
        pairs += [(str(a), None) for a in folder] if folder else [(adapter, merged)]
    return pairs


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the conformance items like any other collector (reported, counted, selectable with -k/-m)."""
    pairs = config.stash.get(_PAIRS, None)
    if not pairs:
        return
    root = ConformanceRoot.from_parent(session, name=COLLECTOR_NAME, nodeid=COLLECTOR_NAME, pairs=pairs,
                                       units=config.stash[_UNITS])
    items.extend(session.genitems(root))


class AdapterRun:
    """One unit of an adapter's checks (all of them, or the dynamic ones on one depth slice): its report, computed
    once per test run (across xdist workers), on first use."""

    def __init__(self, config: pytest.Config, adapter: str, merged: str | None, label: str, unit=None) -> None:
        self.config, self.adapter, self.merged, self.label = config, Path(adapter), merged, label
        self.unit = unit  # None: the adapter's one unit
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
        """The keywords of ``harness.check``: every plugin option the API takes, as resolved."""
        from harness.options import OPTIONS

        values = self.config.stash[_RESOLVED].values
        options = {o.name: values[o.name] for o in OPTIONS if o.plugin and o.api}
        if self.unit is not None:  # the whole-model checks of a sliced adapter, or one slice's dynamic checks
            options.update(only=self.unit.check_ids, skip=(), layers=self.unit.layers)
        return {**options, "base_model": values["base_model"], "merged": self.merged}

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

    def __init__(self, *, pairs: list[tuple[str, str | None]], units: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs, self.units = pairs, units

    def collect(self):
        labels = _labels([Path(a) for a, _ in self.pairs])
        for (adapter, merged), label, units in zip(self.pairs, labels, self.units):
            yield AdapterCollector.from_parent(self, name=label, adapter=adapter, merged=merged, units=units)


class AdapterCollector(pytest.Collector):
    """``plora-conformance::<adapter>``: one item per planned check id; when the base does not fit the memory of
    one worker, the dynamic checks' items sit under one ``layers-A-B`` collector per depth slice, each slice an
    independent unit of work an xdist worker can take."""

    def __init__(self, *, adapter: str, merged: str | None, units: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.adapter, self.merged, self.units = adapter, merged, units

    def collect(self):
        several = len(self.units) > 1
        for unit in self.units:
            run = AdapterRun(self.config, self.adapter, self.merged, self.name, unit if several else None)
            if unit.layers is None:
                yield from _items(self, unit.check_ids, run)
            else:
                yield SliceCollector.from_parent(self, name=unit.label, run=run)


class SliceCollector(pytest.Collector):
    """``plora-conformance::<adapter>::layers-A-B``: the dynamic checks on one depth slice."""

    def __init__(self, *, run: AdapterRun, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run = run

    def collect(self):
        yield from _items(self, self.run.unit.check_ids, self.run)


def _items(parent: pytest.Collector, check_ids, run: AdapterRun):
    for check_id in check_ids:
        yield ConformanceItem.from_parent(parent, name=check_id, check_id=check_id, run=run)


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
        where = f"{self.run.label}::{self.run.unit.label}" if self.run.unit and self.run.unit.label else self.run.label
        return self.run.adapter, None, f"{COLLECTOR_NAME}::{where}::{self.check_id}"


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


def _planned_ids(config: pytest.Config, adapter: str, merged: str | None) -> list[str]:
    from harness.engine.plan import Plan, absolute

    values = config.stash[_RESOLVED].values
    plan = Plan(adapters=(absolute(adapter),), base_model=absolute(values["base_model"]),
                merged=(absolute(merged),) if merged else (), only=values["only"], skip=values["skip"])
    return plan.planned_ids(0)


def _labels(adapters: list[Path]) -> list[str]:
    """A short, unique, stable name per adapter: its directory name (with the parent's when two collide)."""
    names = [Path(a).name or str(a) for a in adapters]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(a).parent.name}/{Path(a).name}" if names.count(n) > 1 else n for a, n in zip(adapters, names)]


def _write_report(config: pytest.Config, run: AdapterRun, report) -> None:
    """``--plora-report``: the JSON report (of several adapters, a run report), written once per adapter."""
    path = config.stash[_RESOLVED].values["report"]
    if not path or getattr(run, "_written", False):
        return
    run._written = True
    from harness.run_once import computed_once

    if run.unit is not None and run.unit.layers is not None:  # one report per unit: say which slice this one is
        report.inputs["layers"] = f"{run.unit.layers[0]}-{run.unit.layers[-1]}"

    computed_once(_shared_dir(config), f"report-{run._key()}", lambda: _merge_report(Path(path), report))


def _merge_report(path: Path, report) -> dict:
    """Add one adapter's report (one per unit when its dynamic checks ran per depth slice) to the JSON file (a
    file lock serialises writers)."""
    import json

    from filelock import FileLock

    from harness.report import Report, RunReport

    with FileLock(str(path) + ".lock"):
        reports = []
        if path.is_file():
            data = json.loads(path.read_text())
            reports = [Report.from_dict(r) for r in data["reports"]] if "reports" in data else [Report.from_dict(data)]
        def unit(r):
            return r.inputs.get("adapter"), r.inputs.get("layers")

        reports = [r for r in reports if unit(r) != unit(report)] + [report]
        out = reports[0] if len(reports) == 1 else RunReport(reports=reports)
        path.write_text(out.to_json())
    return {"written": str(path)}


def _shared_dir(config: pytest.Config) -> Path | None:
    """Under pytest-xdist, the directory all workers of this run share (made by the controller, removed when the
    run ends); None in a single process."""
    if not hasattr(config, "workerinput"):
        return None
    return Path(config.workerinput[SHARED_DIR_KEY])


def _controller_dir(config: pytest.Config) -> Path:
    import tempfile

    if config.stash.get(_SHARED, None) is None:
        config.stash[_SHARED] = Path(tempfile.mkdtemp(prefix="plora-harness-conformance-"))
    return config.stash[_SHARED]
