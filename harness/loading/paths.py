"""The loading-path registry: every way a user turns base + adapter into a model.

Each path is a function ``(base_dir, adapter_dir, *, dtype, device, workdir) -> LoadedModel``
returning an ``eval()`` model and a ``LoadRecord`` of what happened. PEFT loads with
``strict=False`` (unexpected keys are silent, missing keys only warn), so every path
records both by comparing the saved adapter keys with the adapter the model ended up
holding, independent of the PEFT version's own reporting.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from harness.inputs.adapter_dir import BIN_NAME as ADAPTER_BIN
from harness.inputs.adapter_dir import CONFIG_NAME as ADAPTER_CONFIG
from harness.inputs.adapter_dir import SAFETENSORS_NAME as ADAPTER_SAFETENSORS
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.loading.base import copy_model_extras, load_base
from harness.loading.memory import release_memory
from harness.loading.records import LoadedModel, LoadRecord, _note_load_result, _record_coverage, capture_warnings

PathFn = Callable[..., LoadedModel]
PATHS: dict[str, PathFn] = {}


def loading_path(name: str) -> Callable[[PathFn], PathFn]:
    def register(func: PathFn) -> PathFn:
        PATHS[name] = func
        return func

    return register



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
        release_memory()  # HF models hold reference cycles, glibc keeps freed heap: free the merged weights first
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

    from peft import get_peft_model

    from harness.inputs.files import read_json_object
    from harness.model.targets import lora_config_from_dict

    config = lora_config_from_dict(read_json_object(adapter_dir / ADAPTER_CONFIG))
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


