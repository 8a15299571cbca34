"""``harness.check``: the one engine behind the CLI, the pytest plugin and user scripts.

Data flows one way: inputs (read-only, untrusted) → checks (grouped: static,
against-base, dynamic, merged) → a ``Report``. Nothing here knows about pytest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from harness.checks import CheckContext, CheckOptions, checks, run_checks
from harness.compat import require_supported
from harness.inputs.adapter_dir import read_adapter
from harness.inputs.errors import InputError
from harness.report import Report


def planned_check_ids(*, base_model: bool, merged: bool, zero: bool = False) -> list[str]:
    """The check ids a run with these inputs reports (static always; the rest when given)."""
    groups = (["deepspeed"] if zero else []) + ["static"]
    groups += (["against-base", "dynamic"] if base_model else []) + (["merged"] if merged else [])
    return [c.id for group in groups for c in checks(group)]


def _resolve_default(progress: Callable[[str], None] | None):
    """No adapter given: build (or reuse) the embedded synthetic XComposer base + trained adapter."""
    from harness.synthetic import BundleSpec, build_bundle, default_cache_root
    from harness.synthetic.bundle import build_merged_dir

    if progress:
        progress(f"building the embedded synthetic XComposer base, adapter and merged model in {default_cache_root()}")
    bundle = build_bundle(BundleSpec())
    return bundle, build_merged_dir(bundle)


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} directory does not exist; pass the directory that holds it")
    if not path.is_dir():
        raise InputError(f"{path}: {what} must be a directory, not a file; pass the directory that holds it")
    return path


def _quiet_libraries() -> None:
    """Progress bars and info logs of transformers would bury the report; the checks record warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check(
    adapter: str | Path | None = None,
    base_model: str | Path | None = None,
    merged: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    allow_plora_targets: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run every applicable check and return the report.

    Without ``adapter`` the embedded synthetic XComposer base, adapter and merged model are checked.
    Raises ``InputError`` (one line: file, problem, fix) when an input cannot be read at all, and
    ``UnsupportedStack`` when torch/transformers/PEFT are outside the tested range.
    """
    require_supported()
    _quiet_libraries()
    if adapter is None:
        if base_model is not None or merged is not None:
            raise InputError("--base-model/--merged need --adapter; run without arguments for the built-in demo")
        bundle, merged = _resolve_default(progress)
        adapter, base_model = bundle.adapter_dir, bundle.base_dir
    options = CheckOptions(allow_plora_targets=allow_plora_targets, dtype=dtype, device=device)
    with contextlib.ExitStack() as cleanup:
        zero, adapter = _convert_if_zero(Path(adapter), cleanup, progress)
        if isinstance(zero, str):  # a refused or failed conversion: nothing else can be checked
            ctx = CheckContext(options=options, progress=progress, extras={"zero": zero})
            report = Report(inputs={"adapter": str(adapter), "deepspeed_checkpoint": str(adapter)})
            report.extend(run_checks(ctx, "deepspeed"))
            return report
        if progress:
            progress(f"reading adapter {adapter}")
        ctx = CheckContext(adapter=read_adapter(adapter), options=options, progress=progress, extras={"zero": zero})
        return _run_all(ctx, base_model, merged, progress)


def _convert_if_zero(adapter: Path, cleanup: contextlib.ExitStack, progress):
    """A DeepSpeed checkpoint becomes a temporary PEFT adapter dir (removed when the run ends)."""
    from harness.inputs import deepspeed as zero_module

    if not zero_module.is_zero_checkpoint(adapter):
        return None, adapter
    if progress:
        progress(f"converting DeepSpeed checkpoint {adapter} with zero_to_fp32")
    try:
        conversion = cleanup.enter_context(zero_module.converted_zero_checkpoint(adapter))
    except zero_module.DeepSpeedUnavailable as err:
        raise InputError(f"{adapter}: is a DeepSpeed checkpoint and {err}") from None
    except zero_module.ZeroCheckpointError as err:
        return str(err).splitlines()[0], adapter
    return conversion, conversion.output_dir


def _run_all(ctx: CheckContext, base_model, merged, progress) -> Report:
    report = Report(inputs=ctx.adapter.describe())
    if ctx.extras.get("zero") is not None:
        report.inputs["deepspeed_checkpoint"] = str(ctx.extras["zero"].checkpoint_dir)
        report.extend(run_checks(ctx, "deepspeed"))
    report.extend(run_checks(ctx, "static"))
    if base_model is not None:
        from harness.model.structure import inspect_base

        base_dir = _require_dir(base_model, "base model")
        report.inputs["base_model"] = str(base_dir)
        if progress:
            progress(f"inspecting base model {base_dir} on the meta device")
        ctx.base = inspect_base(base_dir)
        report.extend(run_checks(ctx, "against-base"))
        ctx.extras["failed_static"] = [r.id for r in report.checks if r.status == "fail"]
        report.extend(run_checks(ctx, "dynamic"))
    if merged is not None:
        ctx.merged = _require_dir(merged, "merged checkpoint")
        report.inputs["merged"] = str(ctx.merged)
        report.extend(run_checks(ctx, "merged"))
    ctx.adapter.close()
    if "dynamic.run" in ctx.cache:
        ctx.cache["dynamic.run"].close()
    return report


def check_trained(
    peft_model,
    saved_dir: str | Path,
    base_model: str | Path | None = None,
    *,
    adapter_name: str = "default",
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """End-of-training gate: the static checks on ``saved_dir``, then ``trained-vs-shipped`` and
    ``trained-params-saved`` against the in-memory ``peft_model``.

    ``base_model`` defaults to the adapter config's ``base_model_name_or_path`` when that is a local
    directory. Comparisons run in the trained model's dtype (its tolerance from the table in the README)
    on its device unless ``device`` is given. Nothing is written into ``saved_dir``.
    """
    import torch

    require_supported()
    _quiet_libraries()
    saved_dir = _require_dir(saved_dir, "saved adapter")
    param = next(peft_model.parameters())
    dtype = param.dtype if param.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    options = CheckOptions(device=device or param.device.type)
    trained = {"model": peft_model, "saved_dir": saved_dir, "base_dir": base_model, "adapter_name": adapter_name,
               "dtype": dtype}
    if progress:
        progress(f"reading adapter {saved_dir}")
    ctx = CheckContext(adapter=read_adapter(saved_dir), options=options, progress=progress,
                       extras={"trained": trained})
    report = Report(inputs={**ctx.adapter.describe(), "trained_model": type(peft_model).__name__})
    if base_model is not None:
        report.inputs["base_model"] = str(base_model)
    report.extend(run_checks(ctx, "static"))
    report.extend(run_checks(ctx, "trained"))
    ctx.adapter.close()
    return report
