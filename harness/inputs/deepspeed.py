"""DeepSpeed ZeRO checkpoint directories: detect, vet, and convert to a PEFT adapter directory.

A DeepSpeed checkpoint (``engine.save_checkpoint``) looks like::

    ckpt/latest                                   -> "global_step500"
    ckpt/global_step500/mp_rank_00_model_states.pt                  (ZeRO-1/2: one file)
    ckpt/global_step500/zero_pp_rank_{r}_mp_rank_00_model_states.pt (ZeRO-3: one per rank)
    ckpt/global_step500/zero_pp_rank_{r}_mp_rank_00_optim_states.pt (one per data-parallel rank)

Those ``.pt`` files are pickles, and DeepSpeed's ``zero_to_fp32`` loads them with
``weights_only=False``. So before anything loads them, every file DeepSpeed would read is
disassembled with ``torch.serialization.get_unsafe_globals_in_checkpoint`` (nothing runs) and
refused unless its globals are on a small allowlist; the conversion then runs DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` with its ``torch.load`` calls forced to
``weights_only=True`` (allowlisted classes only), writes the adapter tensors under PEFT's key
names into a new directory (a temporary one by default; never inside the input), and returns
a :class:`ZeroConversion` for the ``zero-checkpoint`` report.

deepspeed is optional and imported lazily: detection and the safety scan need only torch;
conversion without deepspeed raises :class:`DeepSpeedUnavailable` whose message is the skip reason.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.inputs.files import NotRegularFile, check_inside, read_bounded, read_json_object, regular_file_problem
from harness.model.peft_keys import extract_adapter_tensors

SKIP_REASON = "deepspeed not installed (pip install 'plora-harness[deepspeed]')"

MAX_LATEST_BYTES = 4096  # the 'latest' file holds one tag name
MODEL_STATES_GLOB = "*_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"

# Globals a genuine DeepSpeed file needs beyond torch's weights_only defaults (measured with
# deepspeed 0.19.8; fp32 and fp16/bf16 ZeRO-1/2/3). Anything else is refused unread.
MODEL_STATES_ALLOWED: frozenset[str] = frozenset()
OPTIM_STATES_ALLOWED: frozenset[str] = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 param_slice_mappings
})



class ZeroCheckpointError(ValueError):
    """A DeepSpeed checkpoint that cannot be used (one sentence: file, what is wrong, fix)."""


class UnsafeCheckpointError(ZeroCheckpointError):
    """A checkpoint file needs pickle globals outside the allowlist; it was not loaded."""

    def __init__(self, file: Path, offending: list[str], message: str) -> None:
        super().__init__(message)
        self.file = file
        self.offending = offending


class DeepSpeedUnavailable(ZeroCheckpointError):
    """deepspeed is not importable: checks that need it should skip with ``str(err)``."""

    def __init__(self, reason: str = SKIP_REASON) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class ZeroCheckpoint:
    """A detected DeepSpeed checkpoint (from file names and small files only; nothing unpickled)."""

    root: Path  # the directory holding ``latest`` and the tag directories
    tag: str
    tag_dir: Path
    model_files: tuple[Path, ...]
    optim_files: tuple[Path, ...]
    stage_hint: str  # "3", "1 or 2" (names cannot tell them apart) or "0" (no optimizer shards)
    world_size: int  # data-parallel ranks: one optimizer shard each
    notes: tuple[str, ...] = ()

    def files(self) -> tuple[Path, ...]:
        return self.model_files + self.optim_files


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _state_files(directory: Path, pattern: str) -> tuple[Path, ...]:
    # The same glob (and order) as deepspeed.utils.zero_to_fp32.get_checkpoint_files.
    found = sorted(glob.glob(os.path.join(glob.escape(str(directory)), pattern)), key=_natural_key)
    return tuple(Path(f) for f in found)


def _has_state_files(directory: Path) -> bool:
    return bool(_state_files(directory, MODEL_STATES_GLOB) or _state_files(directory, OPTIM_STATES_GLOB))


def _read_latest(path: Path) -> str:
    try:
        raw = read_bounded(path, MAX_LATEST_BYTES)
    except NotRegularFile as err:
        raise ZeroCheckpointError(f"{path}: the 'latest' file is {err}; write the checkpoint tag into a regular "
                                  "file (e.g. global_step500) or pass tag=") from None
    except ValueError as err:
        raise ZeroCheckpointError(f"{path}: the 'latest' file is {err}; it should hold only the checkpoint tag "
                                  "(e.g. global_step500)") from None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ZeroCheckpointError(f"{path}: the 'latest' file is not UTF-8 text; write the checkpoint tag into it "
                                  "(e.g. global_step500) or pass tag=") from None
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\n" in tag:
        raise ZeroCheckpointError(f"{path}: 'latest' holds {tag!r}, not a single folder name; write the checkpoint "
                                  "tag into it (e.g. global_step500) or pass tag=")
    return tag


def detect_zero_checkpoint(path: str | Path, *, tag: str | None = None) -> ZeroCheckpoint | None:
    """Return the checkpoint at ``path``, or ``None`` when ``path`` is not a DeepSpeed checkpoint.

    ``path`` may be the checkpoint directory (with ``latest`` and/or ``global_step*`` folders)
    or a tag folder itself (the one holding ``*_model_states.pt``). Raises
    :class:`ZeroCheckpointError` when it is one but is incomplete (``latest`` naming a missing
    folder, optimizer shards without model states, tensor-parallel shards).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    notes: list[str] = []
    if _has_state_files(path):
        root, tag_dir = path.parent, path
        if tag is not None and tag != path.name:
            raise ZeroCheckpointError(f"{path}: is the tag folder {path.name!r} itself but tag={tag!r} was asked "
                                      "for; pass the checkpoint directory above it or drop tag=")
        tag = path.name
        notes.append(f"given the tag folder directly; checkpoint root is {root}")
    else:
        root = path
        latest = path / "latest"
        if tag is None and latest.is_file():
            tag = _read_latest(latest)
            source = f"{latest} names tag {tag!r}"
        elif tag is not None:
            source = f"tag={tag!r} was given"
        else:
            candidates = sorted((d for d in path.iterdir() if d.is_dir() and _has_state_files(d)),
                                key=lambda d: _natural_key(d.name))
            if not candidates:
                return None
            tag = candidates[-1].name
            source = f"{path} has no 'latest' file"
            if len(candidates) > 1:
                notes.append(f"no 'latest' file: using the highest of {len(candidates)} tag folders, {tag!r} "
                             f"(others: {', '.join(d.name for d in candidates[:-1])})")
            else:
                notes.append(f"no 'latest' file: using the only tag folder, {tag!r}")
        tag_dir = path / tag
        if tag_dir.resolve().parent != path.resolve():
            raise ZeroCheckpointError(f"{path}: tag {tag!r} points outside the checkpoint directory; "
                                      "fix the 'latest' file or pass tag=")
        if not tag_dir.is_dir() or not _has_state_files(tag_dir):
            raise ZeroCheckpointError(f"{tag_dir}: {source} but that folder is missing or holds no "
                                      f"{MODEL_STATES_GLOB}; copy the whole checkpoint or pass the right tag=")
    model_files = _state_files(tag_dir, MODEL_STATES_GLOB)
    optim_files = _state_files(tag_dir, OPTIM_STATES_GLOB)
    _check_state_files(root, model_files + optim_files)
    if not model_files:
        raise ZeroCheckpointError(f"{tag_dir}: optimizer shards but no {MODEL_STATES_GLOB} (they hold the parameter "
                                  "names and shapes); copy the whole tag folder")
    mp_ranks = {m.group(1) for f in model_files + optim_files if (m := re.search(r"mp_rank_(\d+)", f.name))}
    if mp_ranks - {"00"}:
        raise ZeroCheckpointError(f"{tag_dir}: model-parallel shards mp_rank_{', mp_rank_'.join(sorted(mp_ranks))} "
                                  "are not supported by zero_to_fp32; convert with a tensor-parallel aware tool "
                                  "(ds_to_universal.py) first")
    if any(f.name.startswith("zero_pp_rank_") for f in model_files):
        stage_hint, world_size = "3", len(optim_files) or len(model_files)
    elif optim_files:
        stage_hint, world_size = "1 or 2", len(optim_files)
    else:
        stage_hint, world_size = "0", 1
    return ZeroCheckpoint(root=root, tag=tag, tag_dir=tag_dir, model_files=model_files, optim_files=optim_files,
                          stage_hint=stage_hint, world_size=world_size, notes=tuple(notes))


def _check_state_files(root: Path, files: tuple[Path, ...]) -> None:
    """Every shard DeepSpeed would open is a regular file inside the checkpoint (a FIFO would block the
    pickle scan for ever, a symlink out would read a file the user did not pass)."""
    from harness.inputs.errors import InputError

    resolved = root.resolve()
    for file in files:
        try:
            check_inside(file, resolved)
        except InputError as err:
            raise ZeroCheckpointError(str(err)) from None
        problem = regular_file_problem(file)
        if problem is not None:
            raise ZeroCheckpointError(f"{file}: {problem}; copy the real checkpoint shard into the directory")


def is_zero_checkpoint(path: str | Path) -> bool:
    """True when ``path`` looks like a DeepSpeed checkpoint (also when it is an incomplete one)."""
    try:
        return detect_zero_checkpoint(path) is not None
    except ZeroCheckpointError:
        return True


# --------------------------------------------------------------------------- safety scan


def _allowed_for(file: Path) -> frozenset[str]:
    return OPTIM_STATES_ALLOWED if file.name.endswith("_optim_states.pt") else MODEL_STATES_ALLOWED


def scan_file(file: str | Path, allowed: frozenset[str] | None = None) -> list[str]:
    """The non-default pickle globals ``file`` needs; raise :class:`UnsafeCheckpointError` if any is not allowed.

    The pickle is disassembled, never executed. Legacy (non-zip) pickles cannot be scanned and are refused.
    """
    import torch

    file = Path(file)
    allowed = _allowed_for(file) if allowed is None else allowed
    try:
        needed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
    except Exception as err:  # not a zip archive, torchscript, truncated, unreadable
        raise UnsafeCheckpointError(
            file, [], f"{file}: refused to load: cannot be vetted without running it ({err}); only torch.save zip "
                      "checkpoints written by DeepSpeed are accepted, re-save it from a trusted process"
        ) from None
    offending = [g for g in needed if g not in allowed]
    if offending:
        raise UnsafeCheckpointError(
            file, offending,
            f"{file}: refused to load: the pickle needs {', '.join(offending)}, which a DeepSpeed checkpoint never "
            "contains (loading it could run code); use a checkpoint from a trusted source",
        )
    return needed


def scan_checkpoint(ckpt: ZeroCheckpoint) -> dict[str, list[str]]:
    """Vet every file DeepSpeed's zero_to_fp32 would load; ``{file name: globals it needs}``."""
    return {f.name: scan_file(f) for f in ckpt.files()}


def _allowed_classes() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class _WeightsOnlyTorch:
    """``torch`` as seen by zero_to_fp32, except that ``load`` always uses ``weights_only=True``."""

    def __init__(self, torch_module) -> None:
        self._torch = torch_module

    def __getattr__(self, name: str):
        return getattr(self._torch, name)

    def load(self, *args, **kwargs):
        kwargs["weights_only"] = True
        return self._torch.load(*args, **kwargs)


@contextlib.contextmanager
def _weights_only_zero_to_fp32():
    """Run zero_to_fp32 with its ``torch.load(..., weights_only=False)`` forced to ``weights_only=True``."""
    import torch
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch(torch)
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Keep DeepSpeed's prints, progress bars and import-time log lines off stdout (a CLI prints JSON there)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        # Loggers created during the import bound their handlers to the buffer: point them at stderr.
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, logging.StreamHandler) and handler.stream is buffer:
                    handler.setStream(sys.stderr)


# --------------------------------------------------------------------------- metadata


def _load_weights_only(file: Path, allowed_classes: list | None = None):
    import torch

    with torch.serialization.safe_globals(allowed_classes or []):
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)


def read_metadata(ckpt: ZeroCheckpoint) -> dict:
    """Stage, data-parallel size and DeepSpeed version from the first model-states file (pure torch).

    Call :func:`scan_checkpoint` first; this loads with ``weights_only=True`` regardless.
    """
    state = _load_weights_only(ckpt.model_files[0])
    ds_config = state.get("ds_config") if isinstance(state, dict) else None
    zero = (ds_config or {}).get("zero_optimization") or {}
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return {
        "stage": int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None,
        "world_size": state.get("dp_world_size") if isinstance(state, dict) else None,
        "ds_version": state.get("ds_version") if isinstance(state, dict) else None,
        "global_steps": state.get("global_steps") if isinstance(state, dict) else None,
    }


def deepspeed_unavailable_reason() -> str | None:
    """``None`` when deepspeed imports, else the skip reason (without importing it twice)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else SKIP_REASON


# --------------------------------------------------------------------------- adapter config


def _config_from(value, what: str) -> tuple[dict, str]:
    if isinstance(value, dict):
        return dict(value), what
    if hasattr(value, "to_dict"):
        config = value.to_dict()
        for key, item in list(config.items()):
            if isinstance(item, set):
                config[key] = sorted(item)
        return config, what
    path = Path(value)
    if path.is_dir():
        path = path / "adapter_config.json"
    if not os.path.lexists(path):
        raise ZeroCheckpointError(f"{path}: no such adapter_config.json; pass the file written by "
                                  "save_pretrained (or its directory)")
    from harness.inputs.errors import InputError

    try:
        config = read_json_object(path)  # regular file, strict and bounded JSON, an object
    except InputError as err:
        raise ZeroCheckpointError(str(err)) from None
    return config, str(path)


def find_adapter_config(ckpt: ZeroCheckpoint, adapter_config=None) -> tuple[dict, str]:
    """``(config, where it came from)``: the explicit argument, else ``adapter_config.json`` in the tag
    folder, in the checkpoint directory, or beside it (its parent), in that order."""
    if adapter_config is not None:
        config, source = _config_from(adapter_config, "adapter_config argument")
    else:
        for candidate in (ckpt.tag_dir, ckpt.root, ckpt.root.parent):
            if os.path.lexists(candidate / "adapter_config.json"):
                config, source = _config_from(candidate / "adapter_config.json", "")
                break
        else:
            raise ZeroCheckpointError(
                f"{ckpt.root}: no adapter_config.json in or beside this DeepSpeed checkpoint, so the LoRA settings "
                "(r, lora_alpha, target_modules) are unknown; copy the adapter_config.json the training run's "
                "save_pretrained wrote into the checkpoint directory (API: adapter_config=)"
            )
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ZeroCheckpointError(f"{source}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are "
                                  "converted, pass the LoRA adapter's config")
    return config, source


# --------------------------------------------------------------------------- key mapping

# --------------------------------------------------------------------------- conversion


@dataclass
class ZeroConversion:
    """What a conversion found and wrote: the ``zero-checkpoint`` check reports this."""

    checkpoint_dir: Path
    tag: str
    tag_dir: Path
    stage: int | None
    world_size: int
    ds_version: str | None
    n_tensors: int
    output_dir: Path
    adapter_config_source: str
    dtype: str
    vetted: dict[str, list[str]] = field(default_factory=dict)  # file name -> allowlisted globals it needs
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("checkpoint_dir", "tag_dir", "output_dir"):
            data[key] = str(data[key])
        return data


def _check_output(out_dir: str | Path | None, ckpt: ZeroCheckpoint) -> None:
    if out_dir is None:
        return
    out = Path(out_dir).resolve()
    for protected in {ckpt.root.resolve(), ckpt.tag_dir.resolve()}:
        if out == protected or protected in out.parents:
            raise ZeroCheckpointError(f"{out}: is inside the DeepSpeed checkpoint {protected}, which is never "
                                      "written to; pass an output directory elsewhere (or none for a temporary one)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZeroCheckpointError(f"{out}: output path exists and is not an empty directory; pass a new or "
                                  "empty directory")


def _prepare_output(out_dir: str | Path | None, ckpt: ZeroCheckpoint) -> tuple[Path, bool]:
    """``(directory, created here)``."""
    _check_output(out_dir, ckpt)
    if out_dir is None:
        return Path(tempfile.mkdtemp(prefix="plora-harness-zero-")), True
    out = Path(out_dir).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return out, created


def _fp32_trained_state(ckpt: ZeroCheckpoint) -> dict:
    """DeepSpeed's own rebuild of the trained (optimizer-owned) parameters, loads forced weights-only."""
    try:
        _allowed_classes()  # imports deepspeed
    except ImportError as err:
        raise DeepSpeedUnavailable(f"deepspeed is installed but does not import ({err}); reinstall it "
                                   "(pip install 'plora-harness[deepspeed]')") from None
    with _weights_only_zero_to_fp32() as zero_to_fp32:
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt.root), tag=ckpt.tag, exclude_frozen_parameters=True
            )
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[-1][:200]
            raise UnsafeCheckpointError(ckpt.tag_dir, [], f"{ckpt.tag_dir}: refused to load: a file changed or needs "
                                        f"more than the allowlist under weights_only=True ({first}); use a "
                                        "checkpoint from a trusted source") from None
        except (ValueError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError) as err:
            raise ZeroCheckpointError(f"{ckpt.tag_dir}: DeepSpeed's zero_to_fp32 could not rebuild the weights "
                                      f"({type(err).__name__}: {str(err)[:300]}); copy the complete checkpoint "
                                      "(every rank's shards)") from None


def convert_zero_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    adapter_config=None,
    tag: str | None = None,
    adapter_name: str = "default",
) -> ZeroConversion:
    """Convert the DeepSpeed checkpoint at ``path`` into a PEFT adapter directory and describe it.

    ``adapter_config``: a path (file or directory), a dict or a ``LoraConfig``; default: the
    ``adapter_config.json`` in or beside the checkpoint. ``out_dir``: default a new temporary
    directory, which the caller owns (see :func:`converted_zero_checkpoint` for a self-cleaning one).
    Raises :class:`ZeroCheckpointError` (:class:`UnsafeCheckpointError` for refused pickles,
    :class:`DeepSpeedUnavailable` when deepspeed is missing).
    """
    ckpt = detect_zero_checkpoint(path, tag=tag)
    if ckpt is None:
        raise ZeroCheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file, tag folder or "
                                  f"{MODEL_STATES_GLOB}); pass the directory engine.save_checkpoint wrote")
    _check_output(out_dir, ckpt)
    vetted = scan_checkpoint(ckpt)  # before anything is unpickled
    config, config_source = find_adapter_config(ckpt, adapter_config)
    meta = read_metadata(ckpt)
    if not ckpt.optim_files:
        raise ZeroCheckpointError(f"{ckpt.tag_dir}: no {OPTIM_STATES_GLOB}, so this is not a ZeRO checkpoint "
                                  f"(stage {meta['stage'] or 0}); zero_to_fp32 needs the ZeRO optimizer shards, "
                                  "save with zero_optimization.stage >= 1")
    reason = deepspeed_unavailable_reason()
    if reason:
        raise DeepSpeedUnavailable(reason)

    notes = list(ckpt.notes)
    out, created = _prepare_output(out_dir, ckpt)
    try:
        with _captured_output() as log:
            state = _fp32_trained_state(ckpt)
        tensors, left_out = extract_adapter_tensors(state, adapter_name)
        if not tensors:
            sample = ", ".join(list(state)[:3]) or "none"
            raise ZeroCheckpointError(
                f"{ckpt.tag_dir}: none of the {len(state)} trained parameters is a LoRA tensor of adapter "
                f"{adapter_name!r} (first: {sample}); pass adapter_name= or a checkpoint of a PEFT LoRA run"
            )
        if left_out:
            notes.append(f"{len(left_out)} trained parameter(s) are not part of adapter {adapter_name!r} and were "
                         f"left out (PEFT would not save them either): {', '.join(left_out[:5])}"
                         + (" ..." if len(left_out) > 5 else ""))
        empty = [k for k, v in tensors.items() if v.numel() == 0]
        if empty:
            notes.append(f"{len(empty)} converted tensor(s) have no elements: {', '.join(empty[:5])}")
        from safetensors.torch import save_file

        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                (out / name).unlink(missing_ok=True)
        raise
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})
    notes.append("tensors are DeepSpeed's fp32 master weights from the optimizer shards (bit-equal to the trained "
                 "parameters in fp32 training; the rounding source of bf16/fp16 runs)")
    return ZeroConversion(
        checkpoint_dir=ckpt.root,
        tag=ckpt.tag,
        tag_dir=ckpt.tag_dir,
        stage=meta["stage"],
        world_size=meta["world_size"] or ckpt.world_size,
        ds_version=meta["ds_version"],
        n_tensors=len(tensors),
        output_dir=out,
        adapter_config_source=config_source,
        dtype=",".join(dtypes),
        vetted=vetted,
        left_out=left_out,
        notes=notes,
        log=log.getvalue(),
    )


@contextlib.contextmanager
def converted_zero_checkpoint(path: str | Path, **kwargs) -> Iterator[ZeroConversion]:
    """:func:`convert_zero_checkpoint` into a temporary directory that is removed afterwards."""
    result = convert_zero_checkpoint(path, None, **kwargs)
    try:
        yield result
    finally:
        shutil.rmtree(result.output_dir, ignore_errors=True)
