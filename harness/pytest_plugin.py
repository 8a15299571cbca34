"""pytest plugin (entry point ``pytest11``): options, markers, skips and conformance items.

Wiring only: ``--adapter`` turns every check id of ``harness.check`` into a test item
(so JUnit and CI list them by name); the engine runs once per session and knows
nothing of pytest. Import-light: torch loads only when it is needed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

MARKERS = {
    "gpu": "needs a CUDA device (skipped with the reason otherwise); select with -m gpu",
    "slow": "long-running; deselect with -m 'not slow'",
    "distributed": "spawns several processes (DeepSpeed / torch.distributed on gloo)",
    "conformance": "a plora-harness conformance check item (one per check id)",
}
OPTION_ENV = {
    "adapter": "PLORA_HARNESS_ADAPTER",
    "base_model": "PLORA_HARNESS_BASE_MODEL",
    "merged": "PLORA_HARNESS_MERGED",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plora-harness", "LoRA adapter conformance (plora-harness)")
    group.addoption("--adapter", type=Path, help="adapter directory to check (env PLORA_HARNESS_ADAPTER)")
    group.addoption("--base-model", type=Path, help="base model directory (env PLORA_HARNESS_BASE_MODEL)")
    group.addoption("--merged", type=Path, help="merged checkpoint directory (env PLORA_HARNESS_MERGED)")
    group.addoption("--conformance-report", type=Path, help="write the JSON conformance report here")
    group.addoption("--device", choices=["cpu", "cuda"], default=None, help="device for dynamic checks")
    group.addoption("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype for dynamic checks (default float32 on CPU, bfloat16 on CUDA)")
    group.addoption("--allow-plora-targets", action="store_true", help="lora-on-plora warns instead of failing")


def option(config: pytest.Config, name: str):
    """A plugin option, falling back to its environment variable."""
    value = config.getoption(name)
    if value is None and name in OPTION_ENV and os.environ.get(OPTION_ENV[name]):
        value = Path(os.environ[OPTION_ENV[name]])
    return value


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


class ConformanceRun:
    """Runs ``harness.check`` once per session, on first use, and keeps the report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._report = None
        self.error: str | None = None

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
        return {
            "adapter": option(self.config, "adapter"),
            "base_model": option(self.config, "base_model"),
            "merged": option(self.config, "merged"),
            "dtype": self.config.getoption("dtype"),
            "device": self.config.getoption("device") or "cpu",
            "allow_plora_targets": self.config.getoption("allow_plora_targets"),
        }

    def _key(self) -> str:
        import hashlib

        return hashlib.sha256(repr(sorted(self._options().items())).encode()).hexdigest()[:16]

    def _run(self) -> dict:
        from harness.api import check
        from harness.compat import UnsupportedStack
        from harness.inputs.errors import InputError

        options = self._options()
        try:
            report = check(options.pop("adapter"), **options)
        except InputError as err:
            return {"error": f"input cannot be read: {err}"}
        except UnsupportedStack as err:
            return {"error": str(err)}
        path = self.config.getoption("conformance_report")
        if path:  # written once, by the process that ran the engine
            Path(path).write_text(report.to_json())
        return {"report": report.to_dict()}


def _shared_dir(config: pytest.Config) -> Path | None:
    """Under pytest-xdist, a directory all workers of this run share (inside the run's base temp dir,
    which pytest cleans up like any other); None in a single process."""
    if not hasattr(config, "workerinput"):
        return None
    factory = getattr(config, "_tmp_path_factory", None) or pytest.TempPathFactory.from_config(config, _ispytest=True)
    return factory.getbasetemp().parent / "plora-harness-conformance"


class ConformanceItem(pytest.Item):
    def __init__(self, *, check_id: str, run: ConformanceRun, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check_id = check_id
        self.run = run
        self.add_marker(pytest.mark.conformance)

    def runtest(self) -> None:
        report = self.run.report
        if report is None:
            raise ConformanceFailure(self.run.error or "no report")
        result = report.get(self.check_id)
        if result is None or result.status == "skip":
            pytest.skip(result.message if result else "not run for these inputs")
        if result.status == "warn":
            warnings.warn(f"{self.check_id}: {result.message}", UserWarning, stacklevel=1)
        if result.status == "fail":
            fix = f"\nfix: {result.fix}" if result.fix else ""
            raise ConformanceFailure(f"{self.check_id}: {result.message}{fix}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"plora-harness::{self.check_id}"


class ConformanceFailure(Exception):
    """A failed conformance check: reported as its one-line message and fix, no traceback."""


class ConformanceCollector(pytest.Collector):
    def __init__(self, *, run: ConformanceRun, check_ids: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.check_ids = check_ids

    def collect(self):
        for check_id in self.check_ids:
            yield ConformanceItem.from_parent(self, name=check_id, check_id=check_id, run=self.run)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if option(config, "adapter") is not None:
        from harness.api import planned_check_ids
        from harness.inputs.deepspeed import is_zero_checkpoint

        ids = planned_check_ids(
            base_model=option(config, "base_model") is not None,
            merged=option(config, "merged") is not None,
            zero=is_zero_checkpoint(option(config, "adapter")),
        )
        collector = ConformanceCollector.from_parent(
            session, name="plora-conformance", path=config.rootpath, run=ConformanceRun(config), check_ids=ids
        )
        items.extend(collector.collect())
    _skip_gpu_without_cuda(items)


def _skip_gpu_without_cuda(items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
