"""The loading-path registry: every way a user turns base + adapter into a model.

Each path is a ``LoadingPath`` record: its function ``(base_dir, adapter_dir, *, dtype, device, workdir) ->
LoadedModel``, returning an ``eval()`` model and a ``LoadRecord`` of what happened, and the facts the checks need
(whether it merges, saves and reloads, shares a load with another path, needs a PEFT/transformers feature). PEFT loads with
``strict=False`` (unexpected keys are silent, missing keys only warn), so every path
records both by comparing the saved adapter keys with the adapter the model ended up
holding, independent of the PEFT version's own reporting.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import compat
from harness.inputs.adapter_dir import BIN_NAME as ADAPTER_BIN
from harness.inputs.adapter_dir import CONFIG_NAME as ADAPTER_CONFIG
from harness.inputs.adapter_dir import SAFETENSORS_NAME as ADAPTER_SAFETENSORS
from harness.inputs.adapter_dir import read_adapter_tensors
from harness.loading.base import copy_model_extras, load_base
from harness.loading.memory import release_memory
from harness.loading.records import LoadedModel, LoadRecord, _note_load_result, _record_coverage, capture_warnings
from harness.model.peft_keys import PREFIX as PEFT_PREFIX

PathFn = Callable[..., LoadedModel]
# (loaded, *, base_dir, dtype, device, workdir) -> LoadedModel: the next step on a model another path loaded
StepFn = Callable[..., LoadedModel]


@dataclass(frozen=True)
class LoadingPath:
    """One way users turn base + adapter into a model, and everything the checks must know about it.

    Every list of paths (the merged ones, the ones sharing a load, the ones whose record describes the adapter
    load) is derived from these records, so a new path is one ``loading_path(...)(function)`` call and nothing else.
    """

    name: str
    function: PathFn
    merges: bool = False  # the model has the adapter merged into the base weights (merged-model checks read it)
    saves_and_reloads: bool = False  # ... then saved and loaded back fresh: its record is the reload's, not PEFT's
    reads_adapter_config: bool = True  # hands adapter_config.json to PEFT's own PeftConfig.from_pretrained
    shares_load_with: str | None = None  # the path whose loaded model this one continues (``then``), one load
    then: StepFn | None = None  # how it continues that model (consumed), when ``shares_load_with`` is registered
    takes_base: bool = False  # ``function`` accepts ``base=`` (an already loaded base) and ``private=``: a chain root
    requires: Callable[[], str | None] | None = None  # why the installed PEFT/transformers lack it (harness.compat)

    def __call__(self, base_dir: Path, adapter_dir: Path, **kw) -> LoadedModel:
        return self.function(base_dir, adapter_dir, **kw)


REGISTRY: dict[str, LoadingPath] = {}  # every path the harness knows, available here or not (registration order)
PATHS: dict[str, LoadingPath] = {}  # the paths the installed stack has: what the checks run
UNAVAILABLE: dict[str, str] = {}  # path name -> why it cannot exist on the installed stack (not in PATHS)


def register_path(path: LoadingPath) -> LoadingPath:
    """Add (or replace, under its name) a path; ``path.requires()`` decides whether it goes to ``PATHS`` or to
    ``UNAVAILABLE`` with its reason, so every list derived from ``PATHS`` skips a path the stack lacks."""
    REGISTRY[path.name] = path
    reason = path.requires() if path.requires is not None else None
    PATHS.pop(path.name, None)
    UNAVAILABLE.pop(path.name, None)
    if reason:
        UNAVAILABLE[path.name] = reason
    else:
        PATHS[path.name] = path
    return path


def unregister_path(name: str) -> None:
    """Remove path ``name`` from the registry (a plugin or test that registered its own path, cleaning up)."""
    for table in (REGISTRY, PATHS, UNAVAILABLE):
        table.pop(name, None)


def loading_path(name: str, **facts) -> Callable[[PathFn], PathFn]:
    """Register the decorated function as path ``name``; ``facts`` are the other ``LoadingPath`` fields."""
    def register(func: PathFn) -> PathFn:
        register_path(LoadingPath(name, func, **facts))
        return func

    return register


def replaced(name: str, function: PathFn) -> LoadingPath:
    """The registered path ``name`` run by ``function`` instead (a test double, or a user's own variant): same facts,
    but it loads on its own (it shares no load, and no other path continues from it)."""
    return dataclasses.replace(REGISTRY[name], function=function, shares_load_with=None, then=None, takes_base=False)


def merging() -> list[str]:
    """The available paths whose model has the adapter merged into the base weights."""
    return [name for name, path in PATHS.items() if path.merges]


def merging_in_memory() -> list[str]:
    """The merging paths that do not save and reload (what ``merge_and_unload`` alone gives)."""
    return [name for name, path in PATHS.items() if path.merges and not path.saves_and_reloads]


def chain_of(name: str) -> list[LoadingPath]:
    """The available paths that share one load with ``name``, in load order (the root, which takes the base, first;
    then each path whose ``then`` continues the previous one's model); [] when ``name`` loads on its own."""
    def leader(path: LoadingPath) -> LoadingPath | None:
        if path.shares_load_with is None or path.then is None:
            return None
        return PATHS.get(path.shares_load_with)

    root, seen = PATHS[name], {name}
    while (up := leader(root)) is not None and up.name not in seen:  # a declared cycle stops where it closes
        root = up
        seen.add(up.name)
    if not root.takes_base:
        return []
    chain = [root]
    while follower := next((p for p in PATHS.values() if leader(p) is chain[-1] and p not in chain), None):
        chain.append(follower)
    return chain if len(chain) > 1 else []


def _peft_from_pretrained(name: str, base_dir: Path, adapter_dir: Path, *, dtype, device, workdir,
                          source_dir: Path | None = None, private: bool = False,
                          base: torch.nn.Module | None = None) -> LoadedModel:
    """``base``: the base already loaded from ``base_dir`` as this path would load it, untouched (the dynamic run's
    reference model): used instead of a second load."""
    from peft import PeftModel

    record = LoadRecord(path=name)
    source = source_dir or adapter_dir
    with capture_warnings(record.warnings):
        if base is None:
            base = load_base(base_dir, dtype=dtype, device=device, private=private)
        model = PeftModel.from_pretrained(base, source).eval()
    record.files_used = sorted(p.name for p in source.iterdir() if p.name.startswith("adapter_"))
    _record_coverage(record, model, read_adapter_tensors(source), "default")
    return LoadedModel(model, record)


def load_peft(base_dir: Path, adapter_dir: Path, *, private: bool = False, base: torch.nn.Module | None = None,
              **kw) -> LoadedModel:
    """``PeftModel.from_pretrained``, unmerged (``private``: weights in private memory, to be merged next; ``base``:
    the base model already loaded, untouched)."""
    return _peft_from_pretrained("peft", base_dir, adapter_dir, private=private, base=base, **kw)


loading_path("peft", takes_base=True)(load_peft)


def load_peft_merged(base_dir: Path, adapter_dir: Path, **kw) -> LoadedModel:
    """``PeftModel.from_pretrained`` then ``merge_and_unload()``."""
    return merge_loaded(_peft_from_pretrained("peft-merged", base_dir, adapter_dir, private=True, **kw), "peft-merged")


loading_path("peft-merged", merges=True, shares_load_with="peft",
             then=lambda loaded, **_: merge_loaded(loaded, "peft-merged"))(load_peft_merged)


def load_peft_safe_merged(base_dir: Path, adapter_dir: Path, **kw) -> LoadedModel:
    """``merge_and_unload(safe_merge=True)``: PEFT checks the merged weights for NaN first."""
    return merge_loaded(_peft_from_pretrained("peft-safe-merged", base_dir, adapter_dir, private=True, **kw),
                        "peft-safe-merged", safe_merge=True)


loading_path("peft-safe-merged", merges=True)(load_peft_safe_merged)


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


def load_merge_script(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir: Path) -> LoadedModel:
    """The official recipe: merge, ``save_pretrained`` (+ code, tokenizer), reload fresh with remote code."""
    merged = load_peft_merged(base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir)
    return save_and_reload(merged, base_dir, dtype=dtype, device=device, workdir=workdir)


loading_path("merge-script", merges=True, saves_and_reloads=True, shares_load_with="peft-merged",
             then=lambda loaded, *, base_dir, **kw: save_and_reload(loaded, base_dir, **kw))(load_merge_script)


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


loading_path("load-adapter")(load_with_load_adapter)


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


# builds its LoraConfig itself (lora_config_from_dict)
loading_path("state-dict", reads_adapter_config=False)(load_with_state_dict)


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


def load_bin(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """The adapter as ``adapter_model.bin`` (a weights-only pickle), through ``PeftModel.from_pretrained``."""
    source = _resaved(adapter_dir, workdir, "bin")
    return _peft_from_pretrained("bin", base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir,
                                 source_dir=source)


loading_path("bin")(load_bin)


def load_safetensors(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """The adapter as ``adapter_model.safetensors``, through ``PeftModel.from_pretrained``."""
    source = _resaved(adapter_dir, workdir, "safetensors")
    return _peft_from_pretrained("safetensors", base_dir, adapter_dir, dtype=dtype, device=device, workdir=workdir,
                                 source_dir=source)


loading_path("safetensors")(load_safetensors)


# -- transformers' own PEFT integration and PEFT's auto classes: what TRL, pipelines and inference scripts use ----


class LoaderRefused(RuntimeError):
    """The loader a user would call fails on this adapter for a reason the message names (with the fix)."""


@contextlib.contextmanager
def _explaining_bin_only(adapter_dir: Path):
    """transformers 5.x's load_adapter asks for adapter_model.safetensors by explicit name in a local directory and
    does not check it exists, so an adapter saved as adapter_model.bin fails with a bare FileNotFoundError: say so."""
    try:
        yield
    except FileNotFoundError as err:
        only_bin = (adapter_dir / ADAPTER_BIN).is_file() and not (adapter_dir / ADAPTER_SAFETENSORS).is_file()
        if not only_bin or ADAPTER_SAFETENSORS not in str(err):
            raise
        import transformers

        raise LoaderRefused(
            f"transformers {transformers.__version__}'s load_adapter looks only for {ADAPTER_SAFETENSORS} in a local "
            f"directory and this adapter has only {ADAPTER_BIN}: users of model.load_adapter / "
            f"from_pretrained(adapter_dir) cannot load it; save the adapter with safe_serialization=True") from None


def _adapter_files(adapter_dir: Path) -> list[str]:
    return sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_"))


def load_transformers_adapter(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """``model.load_adapter(adapter_dir)`` on the base ``PreTrainedModel`` (transformers' PEFT integration: LoRA
    layers injected into the model itself, no PeftModel wrapper)."""
    record = LoadRecord(path="transformers-load-adapter")
    with capture_warnings(record.warnings), _explaining_bin_only(adapter_dir):
        model = load_base(base_dir, dtype=dtype, device=device)
        model.load_adapter(str(adapter_dir))
    record.files_used = _adapter_files(adapter_dir)
    _record_coverage(record, model, read_adapter_tensors(adapter_dir), "default", held_prefix=PEFT_PREFIX)
    return LoadedModel(model.eval(), record)


loading_path("transformers-load-adapter", requires=compat.transformers_peft_missing)(load_transformers_adapter)


def adapter_naming_base(adapter_dir: Path, base_dir: Path, workdir: Path) -> Path:
    """A copy of the adapter (config, weights, tokenizer files: what the loaders read) in ``workdir`` whose
    ``base_model_name_or_path`` is ``base_dir``: loaders that find the base themselves then load the base being
    checked (``base-name`` reports what the user's own config names). Never writes into ``adapter_dir``."""
    import json

    from harness.inputs.files import read_json_object
    from harness.inputs.model_dir import TOKENIZER_FILES

    out = Path(workdir) / "adapter-naming-base"
    out.mkdir(parents=True, exist_ok=True)
    config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN, *TOKENIZER_FILES):
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out / name)
    return out


def _base_as_loaded(base_dir: Path, workdir: Path, record: LoadRecord) -> Path:
    """``base_dir``, or a view of it (symlinks, config.json rewritten) when the harness loads it with an adjusted
    config (eager attention where the config asks for flash_attn and it is not installed): loaders that build the
    base themselves take no config object, so the adjustment must be in the directory they read."""
    import json

    from harness.inputs.files import read_json_object
    from harness.loading.base import model_config

    config = model_config(base_dir)
    raw = read_json_object(Path(base_dir) / "config.json")
    wanted = getattr(config, "attn_implementation", None)
    if "attn_implementation" not in raw or raw["attn_implementation"] == wanted:
        return Path(base_dir)
    view = Path(workdir) / "base"
    view.mkdir(parents=True, exist_ok=True)
    for path in Path(base_dir).iterdir():
        if path.name != "config.json" and not (view / path.name).exists():
            (view / path.name).symlink_to(path.resolve())
    (view / "config.json").write_text(json.dumps({**raw, "attn_implementation": wanted}, indent=2))
    record.notes.append(f"base loaded from a view of {base_dir} with attn_implementation={wanted!r} (as the other "
                        "paths load it)")
    return view


def _base_kwargs(base_dir: Path, dtype) -> dict:
    """What ``load_base`` passes to from_pretrained, less the config object."""
    from harness.compat import ATTN_IMPLEMENTATION_KWARG, DTYPE_KW
    from harness.loading.base import _attention_asked, model_config

    kwargs = {"trust_remote_code": True, DTYPE_KW: dtype}
    if ATTN_IMPLEMENTATION_KWARG and _attention_asked(model_config(base_dir)) == "eager":
        kwargs["attn_implementation"] = "eager"
    return kwargs


def load_auto_peft(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)``, the base resolved to the one being checked (a copy
    of the adapter whose base_model_name_or_path names it)."""
    from peft import AutoPeftModelForCausalLM

    from harness.loading.model_code import building_model

    record = LoadRecord(path="auto-peft")
    source = adapter_naming_base(adapter_dir, base_dir, workdir)
    with capture_warnings(record.warnings):
        base = _base_as_loaded(base_dir, workdir, record)
        if base != Path(base_dir):
            _point_at(source, base)
        with building_model(base_dir):
            try:
                model = AutoPeftModelForCausalLM.from_pretrained(str(source), **_base_kwargs(base_dir, dtype))
            except ValueError as err:
                raise _auto_mapping_refused(err, adapter_dir) from None
    record.files_used = _adapter_files(adapter_dir)
    _record_coverage(record, model, read_adapter_tensors(source), "default")
    return LoadedModel(model.to(device).eval(), record)


loading_path("auto-peft", requires=compat.auto_peft_missing)(load_auto_peft)


def _auto_mapping_refused(err: ValueError, adapter_dir: Path) -> ValueError:
    """PEFT's refusal of an adapter whose config has no task_type (PEFT then saves an ``auto_mapping`` naming the
    base's module, which ``AutoPeftModelForCausalLM`` imports only from an allowlist), with the fix; other errors
    unchanged."""
    from harness.inputs.files import read_json_object

    config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    if config.get("task_type") or not config.get("auto_mapping"):
        return err
    return ValueError(f"{adapter_dir / ADAPTER_CONFIG} has no task_type, so PEFT saved an auto_mapping naming "
                      f"{config['auto_mapping'].get('parent_library')!r}, which AutoPeftModelForCausalLM refuses "
                      f"({str(err).splitlines()[0][:160]}); set \"task_type\": \"CAUSAL_LM\" in adapter_config.json "
                      "(LoraConfig(task_type='CAUSAL_LM') when training)")


def _point_at(adapter_copy: Path, base: Path) -> None:
    import json

    from harness.inputs.files import read_json_object

    config = read_json_object(adapter_copy / ADAPTER_CONFIG)
    config["base_model_name_or_path"] = str(base)
    (adapter_copy / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_transformers_from_adapter_dir(base_dir: Path, adapter_dir: Path, *, dtype, device, workdir) -> LoadedModel:
    """``AutoModelForCausalLM.from_pretrained(adapter_dir)``: transformers finds adapter_config.json, loads the base
    it names (resolved to the one being checked) and applies the adapter in place (pipelines do the same)."""
    record = LoadRecord(path="transformers-from-adapter-dir")
    source = adapter_naming_base(adapter_dir, base_dir, workdir)
    with capture_warnings(record.warnings), _explaining_bin_only(adapter_dir):
        model = load_base(source, dtype=dtype, device=device, config=_model_config_of(base_dir))
    record.files_used = _adapter_files(adapter_dir)
    _record_coverage(record, model, read_adapter_tensors(source), "default", held_prefix=PEFT_PREFIX)
    return LoadedModel(model, record)


loading_path("transformers-from-adapter-dir", requires=compat.transformers_peft_missing)(
    load_transformers_from_adapter_dir)


def _model_config_of(base_dir: Path):
    from harness.loading.base import model_config

    return model_config(base_dir)
