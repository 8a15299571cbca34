"""``harness.check``: the one entry point behind the CLI, the pytest plugin and user scripts.

Data flows one way: inputs (read-only, untrusted) → checks (deepspeed, static, against-base,
dynamic, merged) → a ``Report``. The checks that load models run the model's own code, so they run
in a child process (``harness.engine.supervisor``) and this process only judges what it reports;
nothing here imports torch until a run needs it. Nothing here knows about pytest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from harness.checks.context import CheckOptions
from harness.engine.plan import DEFAULT_TIMEOUT_S, Plan, absolute, unknown_ids
from harness.inputs.code import require_trust
from harness.inputs.errors import InputError
from harness.report import Report, RunReport

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def plan_run(
    adapters: Sequence[str | Path] | None,
    base_model: str | Path | None = None,
    merged: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    allow_plora_targets: bool = False,
    trust_remote_code: bool = False,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    timeout: float | None = DEFAULT_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> tuple[Plan, list[dict]]:
    """Validate everything a run needs, cheaply and before any model code or heavy import, and plan it.

    Raises ``InputError`` (one line: file, problem, fix) for a path that does not exist or is not a
    directory, a check id that does not exist, or model code the user did not trust; returns the plan
    and the model code files that will run (with their sha256).
    """
    from harness.compat import require_supported

    require_supported()  # from package metadata: no import of the libraries themselves
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise InputError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if timeout is not None and not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    unknown = unknown_ids(list(only) + list(skip))
    if unknown:
        raise InputError(f"unknown check id(s) {', '.join(map(repr, unknown))}; `plora-harness list` shows them all")
    if not adapters:
        if base_model is not None or merged is not None:
            raise InputError("--base-model/--merged need --adapter; run without arguments for the built-in demo")
        adapters, base_model, merged = _built_in_demo(progress)
        trust_remote_code = True  # the demo's model code is ours
    paths = [_require(a, "adapter", allow_file=True) for a in adapters]
    base = _require(base_model, "base model") if base_model is not None else None
    merged_dir = _require(merged, "merged checkpoint") if merged is not None else None
    if merged_dir is not None and base is None:
        raise InputError(f"{merged_dir}: --merged is compared with base + adapter; pass --base-model too")
    # Only the base's code runs: merged-matches reads the merged checkpoint's tensors and config, and the
    # merge-script path reloads a directory the harness saved itself, with the base's code files.
    code = [f.to_dict() for f in require_trust({"base model": base} if base else {}, trust_remote_code)]
    plan = Plan(adapters=tuple(str(p) for p in paths), base_model=str(base) if base else None,
                merged=str(merged_dir) if merged_dir else None,
                options=CheckOptions(allow_plora_targets=allow_plora_targets, dtype=dtype, device=device),
                only=tuple(only), skip=tuple(skip), trust_remote_code=trust_remote_code, timeout_s=timeout)
    return plan, code


def check_adapters(
    adapters: Sequence[str | Path] | None,
    base_model: str | Path | None = None,
    merged: str | Path | None = None,
    *,
    isolated: bool | None = None,
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    **options,
) -> RunReport:
    """Check every adapter against one base (and merged checkpoint): one report each, one exit code.

    ``isolated`` (default: whenever the plan loads a model or converts a DeepSpeed checkpoint) runs the
    engine in a child process; ``False`` runs it in this process, model code included: for tests and
    debugging, or when this process already runs that code. Options: see ``check``.
    """
    plan, code = plan_run(adapters, base_model, merged, progress=progress, **options)
    if isolated is None:
        isolated = plan.runs_model_code()
    if isolated:
        from harness.engine.supervisor import run_isolated

        return run_isolated(plan, progress=progress, verbose=verbose, code_files=code)
    return run_in_process(plan, progress=progress)


def check(
    adapter: str | Path | None = None,
    base_model: str | Path | None = None,
    merged: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    allow_plora_targets: bool = False,
    trust_remote_code: bool = False,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    timeout: float | None = DEFAULT_TIMEOUT_S,
    isolated: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run every applicable check on one adapter and return its report.

    Without ``adapter`` the built-in synthetic XComposer base, adapter and merged model are checked.
    A base or merged directory whose ``config.json`` maps custom classes (``auto_map``) ships Python code
    that loading runs: it is run only with ``trust_remote_code=True``, in a child process (see
    ``check_adapters`` for ``isolated``), and the report lists each file with its sha256. ``timeout``
    (seconds, per adapter) bounds the child's run. Raises ``InputError``
    (one line: file, problem, fix) when an input cannot be used at all, and ``UnsupportedStack`` when
    torch/transformers/PEFT are outside the tested range.
    """
    run = check_adapters([adapter] if adapter is not None else None, base_model, merged, dtype=dtype, device=device,
                         allow_plora_targets=allow_plora_targets, trust_remote_code=trust_remote_code, only=only,
                         skip=skip, timeout=timeout, isolated=isolated, progress=progress)
    return run.reports[0]


def run_in_process(plan: Plan, progress: Callable[[str], None] | None = None) -> RunReport:
    """The engine in this process, its events judged exactly as the supervisor judges a child's."""
    from harness.engine.events import Event, Progress
    from harness.engine.recorder import Recorder
    from harness.engine.run import execute
    from harness.engine.supervisor import EngineInputError

    recorder = Recorder(plan)

    def emit(event: Event) -> None:
        recorder.handle(event)
        if isinstance(event, Progress) and progress is not None:
            progress(event.text)

    execute(plan, emit)
    if recorder.input_error is not None:
        raise EngineInputError(recorder.input_error)
    return recorder.finish()


def _built_in_demo(progress: Callable[[str], None] | None) -> tuple[list[Path], Path, Path]:
    """No adapter given: build (or reuse) the embedded synthetic XComposer base, trained adapter, merged model."""
    from harness.synthetic import BundleSpec, build_bundle, default_cache_root
    from harness.synthetic.bundle import build_merged_dir, is_built

    spec = BundleSpec()
    if progress and not is_built(spec):
        progress(f"building the embedded synthetic XComposer base, adapter and merged model in {default_cache_root()}")
    bundle = build_bundle(spec)
    return [bundle.adapter_dir], bundle.base_dir, build_merged_dir(bundle)


def _require(path: str | Path, what: str, *, allow_file: bool = False) -> Path:
    """``path`` made absolute, refused in one line when it is missing or of the wrong kind."""
    resolved = Path(absolute(path))
    if not resolved.exists():
        raise InputError(f"{resolved}: {what} does not exist; pass the directory that holds it")
    if resolved.is_dir():
        return resolved
    if allow_file and resolved.is_file() and resolved.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return resolved
    raise InputError(f"{resolved}: {what} must be a directory, not a file; pass the directory that holds it")


def check_trained(
    peft_model,
    saved_dir: str | Path,
    base_model: str | Path | None = None,
    *,
    adapter_name: str = "default",
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """End-of-training gate: the static checks on ``saved_dir``, then ``trained-vs-shipped`` and
    ``trained-params-saved`` against the in-memory ``peft_model``.

    Runs in this process: the trained model lives here, and so does the code it runs. ``base_model``
    defaults to the adapter config's ``base_model_name_or_path`` when that is a local directory; a base that
    ships Python code is reloaded only with ``trust_remote_code=True`` (the same gate as ``check``: without it,
    ``UntrustedCode`` names the files and nothing of them runs).
    Comparisons run in the trained model's dtype (its tolerance from the table in the README) on its
    device unless ``device`` is given. Nothing is written into ``saved_dir``.
    """
    import torch

    from harness.checks.context import CheckContext, TrainedInputs
    from harness.checks.registry import checks, run_check
    from harness.compat import require_supported
    from harness.checks.measure.training_audit import resolve_base_dir
    from harness.inputs.adapter_dir import read_adapter
    from harness.loading.model_code import remote_code_consent

    require_supported()
    saved_dir = _require(saved_dir, "saved adapter")
    param = next(peft_model.parameters())
    dtype = param.dtype if param.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    base_dir = resolve_base_dir(peft_model, adapter_name, absolute(base_model) if base_model is not None else None)
    if base_dir is not None:
        base_dir = Path(absolute(base_dir))
        require_trust({"base model": base_dir}, trust_remote_code, flag="trust_remote_code=True")
    trained = TrainedInputs(model=peft_model, saved_dir=saved_dir, base_dir=base_dir, adapter_name=adapter_name,
                            dtype=dtype)
    ctx = CheckContext(options=CheckOptions(device=device or param.device.type), progress=progress, trained=trained)
    with remote_code_consent(trust_remote_code), ctx.cleanup:
        ctx.say(f"reading adapter {saved_dir}")
        ctx.adapter = read_adapter(saved_dir)
        ctx.cleanup.callback(ctx.adapter.close)
        report = Report(inputs={**ctx.adapter.describe(), "trained_model": type(peft_model).__name__})
        if base_dir is not None:
            report.inputs["base_model"] = str(base_dir)
        for group in ("static", "trained"):
            report.extend(run_check(c, ctx) for c in checks(group))
        report.notes = list(ctx.notes)
    return report
