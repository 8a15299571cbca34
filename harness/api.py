"""``harness.check``: the one entry point behind the CLI, the pytest plugin and user scripts.

Data flows one way: inputs (read-only, untrusted) → checks (deepspeed, static, against-base,
dynamic, merged) → a ``Report``. The checks that load models run the model's own code, so they run
in a child process (``harness.engine.supervisor``) and this process only judges what it reports;
nothing here imports torch until a run needs it. Nothing here knows about pytest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.checks.context import CheckOptions
from harness.engine.plan import Plan, absolute, default_timeout_s, pair_merged, unknown_ids
from harness.inputs.code import require_trust
from harness.inputs.errors import InputError
from harness.inputs.roles import adapters_in_folder, is_adapter_dir, is_model_dir
from harness.options import api_options
from harness.report import Report, RunReport


@api_options
def plan_run(
    adapters: Sequence[str | Path] | None,
    base_model: str | Path | None = None,
    merged: str | Path | Sequence[str | Path] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **options,
) -> tuple[Plan, list[dict]]:
    """Validate everything a run needs, cheaply and before any model code or heavy import, and plan it.

    Raises ``InputError`` (one line: file, problem, fix) for a path that does not exist, is of the wrong kind
    (a base or merged path that is an adapter, an adapter path that is a model), merged checkpoints that cannot
    be paired with the adapters, a check id that does not exist, a device the machine lacks, no adapter without
    ``demo=True``, or model code the user did not trust; returns the plan and the model code files that will run
    (with their sha256).
    """
    from harness.compat import require_supported

    require_supported()  # from package metadata: no import of the libraries themselves
    # the values were checked, and made their one type, by @api_options (harness.options)
    demo, trust_remote_code, device, timeout = (options["demo"], options["trust_remote_code"], options["device"],
                                                options["timeout"])
    only, skip = options["only"], options["skip"]
    unknown = unknown_ids(list(only) + list(skip))
    if unknown:
        raise InputError(f"unknown check id(s) {', '.join(map(repr, unknown))}; `plora-harness list` shows them all")
    for value, flag in [*((a, "--adapter") for a in adapters or ()), (base_model, "--base-model"),
                        *((m, "--merged") for m in _as_list(merged))]:
        if value is not None and not str(value).strip():
            raise InputError(f"{flag} is empty (an unset or empty variable?); pass the directory")
    if demo:
        if adapters or base_model is not None or merged is not None:
            raise InputError("the built-in demo checks its own synthetic adapter; drop --demo to check yours")
        adapters, base_model, merged = _built_in_demo(progress)
        trust_remote_code = True  # the demo's model code is ours
    elif not adapters:
        raise InputError("no adapter to check: pass --adapter DIR (is the variable that holds it empty?), "
                         "or run `plora-harness demo` for the built-in demo")
    base = _require(base_model, "base model", role="model") if base_model is not None else None
    pairs = []
    for adapter, partner in pair_merged(adapters, merged):
        path = _require(adapter, "adapter", allow_file=True, role="adapter")
        folder = adapters_in_folder(path) if path.is_dir() else []
        if folder and partner is not None:
            raise InputError(f"{path}: is a folder of {len(folder)} adapters and cannot be paired with one merged "
                             f"checkpoint; pair each adapter in it with --adapter A=M")
        partner_dir = _require(partner, "merged checkpoint", role="model") if partner is not None else None
        pairs += [(p, None) for p in folder] if folder else [(path, partner_dir)]
    if base is None and any(m is not None for _, m in pairs):
        first = next(m for _, m in pairs if m is not None)
        raise InputError(f"{first}: --merged is compared with base + adapter; pass --base-model too")
    if options["layers"] is not None and base is None:
        first, last = options["layers"][0], options["layers"][-1]
        raise InputError(f"--layers {first}-{last} slices the base model by depth; pass --base-model too")
    if device == "cuda":
        _require_cuda()
    merged_dirs = tuple(str(m) if m is not None else None for _, m in pairs)
    if timeout == "auto":
        timeout = default_timeout_s(base, *(m for m in merged_dirs if m))
    # Only the base's code runs: merged-matches reads the merged checkpoint's tensors and config, and the
    # merge-script path reloads a directory the harness saved itself, with the base's code files.
    code = [f.to_dict() for f in require_trust({"base model": base} if base else {}, trust_remote_code)]
    plan = Plan(adapters=tuple(str(p) for p, _ in pairs), base_model=str(base) if base else None,
                merged=merged_dirs if any(merged_dirs) else (),
                options=CheckOptions(allow_plora_targets=options["allow_plora_targets"], dtype=options["dtype"],
                                     device=device, max_memory=options["max_memory"], layers=options["layers"],
                                     trained_on_quantized=options["trained_on_quantized"]),
                only=only, skip=skip, trust_remote_code=trust_remote_code, timeout_s=timeout, demo=demo)
    return plan, code


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, Path)) else list(value)


def _require_cuda() -> None:
    """``--device cuda`` on a machine without a usable CUDA device: refused now, not as six failed checks."""
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InputError(f"--device cuda: torch {torch.__version__} ({build}) finds no CUDA device on this machine; "
                         "use --device cpu, or run on a machine with a GPU and a CUDA build of torch")


@api_options
def check_adapters(
    adapters: Sequence[str | Path] | None,
    base_model: str | Path | None = None,
    merged: str | Path | Sequence[str | Path] | None = None,
    *,
    isolated: bool | None = None,
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    **options,
) -> RunReport:
    """Check every adapter against one base: one report each, one exit code.

    ``merged``: one merged checkpoint per adapter, in the same order (or write an adapter as ``"A=M"``); a
    folder of adapters is checked adapter by adapter. ``demo=True`` (and no adapter) checks the built-in
    synthetic demo. ``isolated`` (default: whenever the plan loads a model or converts a DeepSpeed
    checkpoint) runs the engine in a child process; ``False`` runs it in this process, model code included:
    for tests and debugging, or when this process already runs that code. Other options: see ``check``.
    """
    plan, code = plan_run(adapters, base_model, merged, progress=progress, **options)
    return _execute(plan, code, isolated=isolated, progress=progress, verbose=verbose)


def _execute(plan: Plan, code: list[dict], *, isolated: bool | None, progress: Callable[[str], None] | None,
             verbose: bool = False) -> RunReport:
    if isolated is None:
        isolated = plan.runs_model_code()
    if isolated:
        from harness.engine.supervisor import run_isolated

        return run_isolated(plan, progress=progress, verbose=verbose, code_files=code)
    return run_in_process(plan, progress=progress)


@api_options
def check(
    adapter: str | Path | None = None,
    base_model: str | Path | None = None,
    merged: str | Path | None = None,
    *,
    isolated: bool | None = None,
    progress: Callable[[str], None] | None = None,
    **options,
) -> Report:
    """Run every applicable check on one adapter and return its report.

    ``adapter`` is required unless ``demo=True``, which checks the built-in synthetic XComposer base,
    adapter and merged model (the report says so in its first line). A base or merged directory whose
    ``config.json`` maps custom classes (``auto_map``) ships Python code that loading runs: it is run only with
    ``trust_remote_code=True``, in a child process (see ``check_adapters`` for ``isolated``), and the report
    lists each file with its sha256. ``timeout`` (seconds per adapter; ``"auto"``: derived from the size of
    the model files; ``None``: no limit) bounds the child's run. ``max_memory`` ("8GiB", "500MB" or bytes;
    default: the RAM or GPU memory available) bounds the dynamic checks: a base that does not fit is checked on
    depth slices (README, Depth slices); ``layers`` ("16-23" or indices) runs the dynamic checks on that one
    depth slice only, a unit of a check spread over CI jobs or pytest-xdist workers. The keywords from ``trust_remote_code`` to ``timeout`` are the run
    options of ``harness/options.py`` (the CLI's flags, the plugin's ``--plora-*``), checked there. Raises
    ``InputError`` (one line: file, problem, fix) when an input cannot be used at all, and ``UnsupportedStack``
    when torch/transformers/PEFT are outside the tested range.
    """
    plan, code = plan_run([adapter] if adapter is not None else None, base_model, merged, progress=progress,
                          **options)
    if len(plan.adapters) != 1:
        raise InputError(f"{plan.adapters[0]}: is one of {len(plan.adapters)} adapters in {adapter}; check a folder "
                         "of adapters with check_adapters")
    return _execute(plan, code, isolated=isolated, progress=progress).reports[0]


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


def _require(path: str | Path, what: str, *, allow_file: bool = False, role: str | None = None) -> Path:
    """``path`` made absolute, refused in one line when it is missing or of the wrong kind (``role``: "adapter"
    refuses a model directory, "model" an adapter directory)."""
    resolved = Path(absolute(path))
    if not resolved.exists():
        raise InputError(f"{resolved}: {what} does not exist; pass the directory that holds it")
    if resolved.is_dir():
        if role == "model" and is_adapter_dir(resolved):
            flag = "--merged" if "merged" in what else "--base-model"
            raise InputError(f"{resolved}: {flag} is an adapter directory (adapter_config.json, no config.json), not "
                             f"a model; pass it as --adapter, and the full model directory as {flag}")
        if role == "adapter" and is_model_dir(resolved):
            raise InputError(f"{resolved}: --adapter is a model directory (config.json, no adapter_config.json), not "
                             "a PEFT adapter; pass the directory save_pretrained of the PeftModel wrote, and this one "
                             "as --base-model or --merged")
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
    from harness.checks.measure.training_audit import resolve_base_dir
    from harness.checks.registry import checks, run_check
    from harness.compat import require_supported
    from harness.dtypes import DType
    from harness.inputs.adapter_dir import read_adapter
    from harness.loading.model_code import remote_code_consent
    from harness.options import from_value, named
    from harness.worklog import WorkLog, recording

    require_supported()
    started = time.monotonic()
    saved_dir = _require(saved_dir, "saved adapter")
    param = next(peft_model.parameters())
    dtype = param.dtype if param.dtype in {d.torch for d in DType} else torch.float32
    if device is not None:
        device = from_value(named("device"), device, "device")
    base_dir = resolve_base_dir(peft_model, adapter_name, absolute(base_model) if base_model is not None else None)
    if base_dir is not None:
        base_dir = Path(absolute(base_dir))
        require_trust({"base model": base_dir}, trust_remote_code, flag="trust_remote_code=True")
    trained = TrainedInputs(model=peft_model, saved_dir=saved_dir, base_dir=base_dir, adapter_name=adapter_name,
                            dtype=dtype)
    ctx = CheckContext(options=CheckOptions(device=device or param.device.type), progress=progress, trained=trained)
    log = WorkLog()  # each check's own time, and the shared work (the reload audit) once
    with remote_code_consent(trust_remote_code), ctx.cleanup, recording(log):
        ctx.say(f"reading adapter {saved_dir}")
        with log.shared("adapter.read", "reading the adapter"):
            ctx.adapter = read_adapter(saved_dir)
        ctx.cleanup.callback(ctx.adapter.close)
        report = Report(inputs={**ctx.adapter.describe(), "trained_model": type(peft_model).__name__})
        if base_dir is not None:
            report.inputs["base_model"] = str(base_dir)
        for group in ("static", "trained"):
            for each in checks(group):
                with log.check(each.id) as timing:
                    result = run_check(each, ctx)
                result.duration_s = timing.own_s
                report.checks.append(result)
        report.notes = list(ctx.notes)
        report.work = log.entries()
    report.duration_s = round(time.monotonic() - started, 3)
    return report
