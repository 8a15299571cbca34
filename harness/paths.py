"""The loading-path registry: every way a user turns base + adapter into a model.

Each path is a function ``(base_dir, adapter_dir, *, dtype, device, workdir) -> LoadedModel``
returning an ``eval()`` model and a ``LoadRecord`` of what happened. PEFT loads with
``strict=False`` (unexpected keys are silent, missing keys only warn), so every path
records both by comparing the saved adapter keys with the adapter the model ended up
holding, independent of the PEFT version's own reporting.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .compat import (
    ATTN_IMPLEMENTATION_KWARG,
    DTYPE_KW,
    FLASH_ATTENTION,
    flash_attn_installed,
)
from .private_weights import privatize_weights

ADAPTER_SAFETENSORS, ADAPTER_BIN, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"


@dataclass
class LoadRecord:
    path: str
    missing_keys: list[str] = field(default_factory=list)  # adapter keys the model expected but did not get
    unexpected_keys: list[str] = field(default_factory=list)  # saved keys the model had no place for
    not_loaded: list[str] = field(default_factory=list)  # keys present but whose values differ from the file
    warnings: list[str] = field(default_factory=list)
    files_used: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.not_loaded)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    record: LoadRecord


PathFn = Callable[..., LoadedModel]
PATHS: dict[str, PathFn] = {}


def loading_path(name: str) -> Callable[[PathFn], PathFn]:
    def register(func: PathFn) -> PathFn:
        PATHS[name] = func
        return func

    return register


@contextmanager
def capture_warnings(into: list[str]):
    """Collect Python warnings and transformers/PEFT log records (what users would see scroll by)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
    into.extend(
        f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, FutureWarning))  # library churn, not the adapter
    )
    into.extend(f"{r.levelname}: {r.getMessage().splitlines()[0][:300]}" for r in records)


def load_base(base_dir: Path, *, dtype: torch.dtype, device: str = "cpu", warnings_into: list[str] | None = None,
              private: bool = False, **kwargs) -> torch.nn.Module:
    """AutoModelForCausalLM with trust_remote_code and an explicit dtype (never "auto").

    ``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before; warnings and transformers log
    records go to ``warnings_into`` when given. ``output_loading_info=True`` returns (model, info).
    ``private=True`` (for a model about to be merged in place on the CPU) re-reads the weights into
    private memory (``harness.private_weights``): same values, no copy-on-write faults, one copy in RSS.
    """
    from transformers import AutoModelForCausalLM

    sink: list[str] = [] if warnings_into is None else warnings_into
    if "config" not in kwargs:
        kwargs.update(_attention_override(Path(base_dir), sink))
    with capture_warnings(sink):
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True, **{DTYPE_KW: dtype},
                                                         **kwargs)
        except ModuleNotFoundError as err:
            if "transformers_modules" in str(err) and "." in Path(base_dir).name:
                from .inputs import InputError

                raise InputError(
                    f"{base_dir}: transformers {transformers.__version__} cannot import remote code from a folder "
                    f"whose name contains '.'; load it from a copy or symlink named without dots "
                    f"(e.g. {Path(base_dir).name.replace('.', '_')}) or upgrade transformers."
                ) from None
            raise
    loaded, info = model if isinstance(model, tuple) else (model, None)  # output_loading_info=True gives both
    if private and device == "cpu":
        privatize_weights(loaded, base_dir)
    loaded = loaded.to(device).eval()
    return (loaded, info) if info is not None else loaded


def _attention_override(base_dir: Path, notes: list[str]) -> dict:
    """Eager attention for a config that asks for flash attention on a machine without flash_attn.

    The real InternLM-XComposer2 configs default to ``attn_implementation: "flash_attention_2"`` (the
    remote code's own switch), which fails to load on CPU-only and most CI machines. Outputs are the same
    up to the dtype tolerance; the override is recorded in ``notes`` so the report says it happened.
    """
    import json

    try:
        declared = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    asked = declared.get("attn_implementation") or declared.get("_attn_implementation")
    if asked not in FLASH_ATTENTION or flash_attn_installed():
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=True)
    config.attn_implementation = "eager"  # the remote code reads this field
    kwargs: dict = {"config": config}
    if ATTN_IMPLEMENTATION_KWARG:
        kwargs["attn_implementation"] = "eager"  # and transformers its own
    notes.append(f"{base_dir / 'config.json'} asks for {asked} and flash_attn is not installed: loaded with "
                 "attn_implementation='eager' (pass it to from_pretrained yourself outside the harness)")
    return kwargs


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The saved adapter tensors: safetensors first, ``.bin`` only with ``weights_only=True``."""
    from safetensors.torch import load_file

    if (adapter_dir / ADAPTER_SAFETENSORS).is_file():
        return load_file(str(adapter_dir / ADAPTER_SAFETENSORS))
    return torch.load(adapter_dir / ADAPTER_BIN, map_location="cpu", weights_only=True)


def _record_coverage(record: LoadRecord, model, saved: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Compare the file's keys and values with the adapter the PEFT model now holds."""
    from peft.utils import get_peft_model_state_dict

    held = get_peft_model_state_dict(model, adapter_name=adapter_name)
    record.missing_keys = sorted(set(record.missing_keys) | (set(held) - set(saved)))
    record.unexpected_keys = sorted(set(record.unexpected_keys) | (set(saved) - set(held)))
    for key in sorted(set(held) & set(saved)):
        value, want = held[key].detach().cpu(), saved[key]
        # Loaded means equal to the file's value, or to it rounded to the dtype the model holds it in
        # (PEFT before ~0.12 casts adapter weights to a bf16/fp16 base's dtype; later ones keep them fp32).
        if value.shape != want.shape or not (
            torch.equal(value.float(), want.float()) or torch.equal(value, want.to(value.dtype))
        ):
            record.not_loaded.append(key)


def _adapter_owned(model, adapter_name: str) -> set[str]:
    """Names of the parameters that belong to ``adapter_name``'s LoRA layers (structural, not by substring).

    A name filter on ``"lora_"`` also matches PLoRA's ``Plora_A`` and ``plora_glb_GN``; PEFT's own
    ``load_result.missing_keys`` does exactly that, so it is filtered here by module ownership.
    """
    from peft.tuners.lora import LoraLayer

    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
                container = getattr(module, attr, None)
                if container is not None and adapter_name in container:
                    sub = container[adapter_name]
                    params = sub.named_parameters() if isinstance(sub, torch.nn.Module) else [("", sub)]
                    owned.update(f"{name}.{attr}.{adapter_name}" + (f".{p}" if p else "") for p, _ in params)
    return owned


def _note_load_result(record: LoadRecord, model, result, adapter_name: str) -> None:
    """PEFT's own load result, reduced to adapter keys (it loads with strict=False and does not raise)."""
    owned = _adapter_owned(model, adapter_name)
    missing = sorted(k for k in getattr(result, "missing_keys", []) or [] if k in owned)
    unexpected = sorted(getattr(result, "unexpected_keys", []) or [])
    noise = [k for k in getattr(result, "missing_keys", []) or [] if k not in owned and "lora_" in k]
    record.notes.append(f"load_result: {len(missing)} missing adapter keys, {len(unexpected)} unexpected keys")
    if noise:
        record.notes.append(f"PEFT also lists {len(noise)} non-adapter key(s) containing 'lora_' as missing "
                            f"(e.g. {noise[0]}): PLoRA names, ignored")
    record.missing_keys = sorted(set(record.missing_keys) | set(missing))
    record.unexpected_keys = sorted(set(record.unexpected_keys) | set(unexpected))


def _peft_from_pretrained(name: str, base_dir: Path, adapter_dir: Path, *, dtype, device, workdir,
                          source_dir: Path | None = None, private: bool = False) -> LoadedModel:
    from peft import PeftModel

    record = LoadRecord(path=name)
    source = source_dir or adapter_dir
    with capture_warnings(record.warnings):
        base = load_base(base_dir, dtype=dtype, device=device, private=private)
        model = PeftModel.from_pretrained(base, source).eval()
    record.files_used = sorted(p.name for p in source.iterdir() if p.name.startswith("adapter_"))
    _record_coverage(record, model, read_adapter_tensors(source), "default")
    return LoadedModel(model, record)


@loading_path("peft")
def load_peft(base_dir: Path, adapter_dir: Path, *, private: bool = False, **kw) -> LoadedModel:
    """``PeftModel.from_pretrained``, unmerged (``private``: weights in private memory, to be merged next)."""
    return _peft_from_pretrained("peft", base_dir, adapter_dir, private=private, **kw)


@loading_path("peft-merged")
def load_peft_merged(base_dir: Path, adapter_dir: Path, **kw) -> LoadedModel:
    """``PeftModel.from_pretrained`` then ``merge_and_unload()``."""
    return merge_loaded(_peft_from_pretrained("peft-merged", base_dir, adapter_dir, private=True, **kw), "peft-merged")


@loading_path("peft-safe-merged")
def load_peft_safe_merged(base_dir: Path, adapter_dir: Path, **kw) -> LoadedModel:
    """``merge_and_unload(safe_merge=True)``: PEFT checks the merged weights for NaN first."""
    return merge_loaded(_peft_from_pretrained("peft-safe-merged", base_dir, adapter_dir, private=True, **kw),
                        "peft-safe-merged", safe_merge=True)


def merge_loaded(loaded: LoadedModel, name: str, *, safe_merge: bool = False) -> LoadedModel:
    """``merge_and_unload`` an already loaded PEFT model, in place (``loaded`` is consumed).

    Lets one load serve the unmerged path, the merged path and the merge script in turn, as a user's
    merge script does; the load record (keys, files) is carried over under the new path name.
    """
    record = copy.deepcopy(loaded.record)
    record.path = name
    with capture_warnings(record.warnings):
        model = loaded.model.merge_and_unload(safe_merge=safe_merge) if safe_merge else loaded.model.merge_and_unload()
    loaded.model = None
    return LoadedModel(model.eval(), record)


def copy_model_extras(base_dir: Path, out_dir: Path) -> list[str]:
    """What the official merge script ships beside the weights: custom code and tokenizer files."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and (path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens"))):
            if not (out_dir / path.name).exists():
                shutil.copyfile(path, out_dir / path.name)
                copied.append(path.name)
    return copied


@loading_path("merge-script")
def load_merge_script(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir: Path) -> LoadedModel:
    """The official recipe: merge, ``save_pretrained`` (+ code, tokenizer), reload fresh with remote code."""
    merged = load_peft_merged(base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir)
    return save_and_reload(merged, base_dir, dtype=dtype, device=device, workdir=workdir)


def save_and_reload(merged: LoadedModel, base_dir: Path, *, dtype, device, workdir: Path) -> LoadedModel:
    """The merge script's second half: ``save_pretrained`` the merged model with the base's code and tokenizer,
    free it, and reload the directory fresh (``merged`` is consumed: one model in memory at a time)."""
    record = merged.record
    record.path = "merge-script"
    out = Path(workdir) / "merge-script"
    with capture_warnings(record.warnings):
        merged.model.save_pretrained(out, safe_serialization=True)
        record.notes.append(f"copied {copy_model_extras(base_dir, out)}")
        merged.model = None
        del merged
        gc.collect()  # HF models hold reference cycles: free the merged weights before the reload
        model, info = load_base(out, dtype=dtype, device=device, output_loading_info=True)
    record.missing_keys = sorted(info.get("missing_keys", []))
    record.unexpected_keys = sorted(info.get("unexpected_keys", []))
    record.files_used = sorted(p.name for p in out.iterdir())
    return LoadedModel(model, record)


def _fresh_peft(base_dir: Path, adapter_dir: Path, *, dtype, device):
    """Base wrapped by PEFT with the saved config and random non-zero (decoy) LoRA weights.

    Not PEFT's zero-init lora_B: a decoy that stays active, or a key that never loads, then shows
    up as a difference from the reference instead of hiding as a no-op.
    """
    import json

    from peft import get_peft_model

    from .targets import lora_config_from_dict

    config = lora_config_from_dict(json.loads((adapter_dir / ADAPTER_CONFIG).read_text()))
    config.inference_mode = True
    config.init_lora_weights = False
    base = load_base(base_dir, dtype=dtype, device=device)
    return get_peft_model(base, config)


@loading_path("load-adapter")
def load_with_load_adapter(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """Base wrapped by PEFT, then ``load_adapter`` under a non-default name and ``set_adapter``."""
    record = LoadRecord(path="load-adapter")
    with capture_warnings(record.warnings):
        model = _fresh_peft(base_dir, adapter_dir, dtype=dtype, device=device)
        result = model.load_adapter(str(adapter_dir), adapter_name="other")
        model.set_adapter("other")
    _note_load_result(record, model, result, "other")
    record.files_used = sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_"))
    _record_coverage(record, model, read_adapter_tensors(adapter_dir), "other")
    return LoadedModel(model.eval(), record)


@loading_path("state-dict")
def load_with_state_dict(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """Base wrapped by PEFT, then ``set_peft_model_state_dict`` with the raw saved tensors."""
    from peft.utils import set_peft_model_state_dict

    record = LoadRecord(path="state-dict")
    saved = read_adapter_tensors(adapter_dir)
    with capture_warnings(record.warnings):
        model = _fresh_peft(base_dir, adapter_dir, dtype=dtype, device=device)
        result = set_peft_model_state_dict(model, dict(saved))  # peft 0.15-0.20 rewrite it in place
    _note_load_result(record, model, result, "default")
    _record_coverage(record, model, saved, "default")
    return LoadedModel(model.eval(), record)


def _resaved(adapter_dir: Path, workdir: Path, fmt: str) -> Path:
    """The same adapter written in ``fmt`` ("bin" or "safetensors") into ``workdir`` (never the input)."""
    from safetensors.torch import save_file

    out = Path(workdir) / f"adapter-{fmt}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    tensors = {k: v.contiguous() for k, v in read_adapter_tensors(adapter_dir).items()}
    if fmt == "bin":
        torch.save(tensors, out / ADAPTER_BIN)
    else:
        save_file(tensors, str(out / ADAPTER_SAFETENSORS), metadata={"format": "pt"})
    return out


@loading_path("bin")
def load_bin(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """The adapter as ``adapter_model.bin`` (a weights-only pickle), through ``PeftModel.from_pretrained``."""
    source = _resaved(adapter_dir, workdir, "bin")
    return _peft_from_pretrained("bin", base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir,
                                 source_dir=source)


@loading_path("safetensors")
def load_safetensors(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """The adapter as ``adapter_model.safetensors``, through ``PeftModel.from_pretrained``."""
    source = _resaved(adapter_dir, workdir, "safetensors")
    return _peft_from_pretrained("safetensors", base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir,
                                 source_dir=source)


@dataclass
class RawLoadDiagnosis:
    """What plain ``base.load_state_dict(adapter)`` does: it must fail, and this says why (no traceback)."""

    failed: bool
    message: str
    missing_plora: list[str]  # Plora_A/B and plora_*_GN keys the adapter file does not have
    missing_total: int
    unexpected_total: int
    unexpected_examples: list[str] = field(default_factory=list)
    error_type: str | None = None  # the exception class load_state_dict raised


Diagnosis = RawLoadDiagnosis

PEFT_NOT_STATE_DICT = ("this is a PEFT adapter, not a model state dict; load it with PeftModel.from_pretrained "
                       "or merge it")


def diagnose_raw_load(model_or_base_dir: torch.nn.Module | Path | str, adapter_dir: Path | str) -> RawLoadDiagnosis:
    """The seed report's path: ``model.load_state_dict(adapter_tensors)``, turned into a diagnosis.

    Takes a loaded base model (its weights are never overwritten)
    or a base directory (loaded fresh in fp32). A strict ``load_state_dict`` copies matching keys
    before raising, so a given model is first checked for key overlap and only loaded into when
    the file shares no key with it.
    """
    adapter_dir = Path(adapter_dir)
    if isinstance(model_or_base_dir, (str, Path)):
        model = load_base(Path(model_or_base_dir), dtype=torch.float32, device="cpu")
    else:
        model = model_or_base_dir
    saved = read_adapter_tensors(adapter_dir)
    own = set(model.state_dict())
    missing = sorted(own - set(saved))
    unexpected = sorted(set(saved) - own)
    error_type = None
    if own & set(saved):  # would overwrite real weights: judge by keys instead of loading
        error_type = "RuntimeError" if (missing or unexpected) else None
    else:
        try:
            model.load_state_dict(saved)  # strict: exactly what the user ran
        except RuntimeError as err:
            error_type = type(err).__name__
    if error_type is None:
        return RawLoadDiagnosis(False, "load_state_dict accepted the adapter file: it is a full state dict", [], 0, 0)
    plora = [k for k in missing if "Plora_" in k or k.rsplit(".", 1)[-1].startswith("plora_")]
    message = f"{PEFT_NOT_STATE_DICT} (load_state_dict: {len(missing)} missing keys"
    message += f", including {len(plora)} PLoRA keys such as {', '.join(_plora_examples(plora))}" if plora else ""
    message += f"; {len(unexpected)} unexpected adapter keys"
    message += f" such as {unexpected[0]})" if unexpected else ")"
    return RawLoadDiagnosis(True, message, plora, len(missing), len(unexpected), unexpected[:5], error_type)


def _plora_examples(plora: list[str]) -> list[str]:
    """One example per kind (Plora_A, Plora_B, each GN separator), so the message names them all."""
    picks = []
    for kind in ("Plora_A", "Plora_B", "plora_glb_GN", "plora_sub_GN"):
        found = next((k for k in plora if kind in k), None)
        if found:
            picks.append(found)
    return picks


def find_unmerged_lora_wrappers(model: torch.nn.Module) -> list[str]:
    """Modules still wrapped by PEFT after a merge (``merge_and_unload`` skips names containing ``lora_``)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
