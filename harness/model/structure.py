"""What the harness knows about a base model without loading its weights.

Two views, both cheap: the weight index (names, shapes, dtypes from the
safetensors headers) and the module tree, instantiated on the meta device from
the directory's own config and remote code. The tree is optional: code that
downloads things in ``__init__`` (the real XComposer fetches CLIP) may fail on
meta, and then the weight index alone still answers the structural questions.

The tree records each module's layer kind and dims (``harness.model.layer_kinds``: a Conv1D stores [in, out]),
which parameters are tied, and the checkpoint key each parameter is saved under: module names and checkpoint keys
can differ (transformers 5 names GPT-NeoX's head ``lm_head`` and saves it as ``embed_out.weight``), so code that
reads checkpoints maps names through the model, never by string.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.dtypes import DType
from harness.inputs.code import UntrustedCode
from harness.inputs.errors import UnusableInput
from harness.model import families
from harness.model.layer_kinds import Dims, LayerKind, dims_of_module, kind_named, kind_of_module


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    type_name: str
    in_features: int | None = None
    out_features: int | None = None
    is_linear: bool = False  # a linear layer in PEFT's sense ("all-linear"): nn.Linear or transformers' Conv1D
    is_branch: bool = False  # carries the base model's own low-rank branch (PLoRA), by a family's structural test
    kind: str | None = None  # layer kind name (harness.model.layer_kinds) for the kinds PEFT's LoRA wraps


@dataclass
class BaseModelInfo:
    base_dir: Path
    config: dict
    weights: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    modules: dict[str, ModuleInfo] | None = None  # None when the meta build failed
    meta_build_error: str | None = None
    output_head: str | None = None  # the LM head's module name; PEFT's "all-linear" skips it
    input_embedding: str | None = None  # the input embedding's module name
    checkpoint_keys: dict[str, str] = field(default_factory=dict)  # parameter -> the key a save writes it under
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter -> the one whose value the checkpoint holds
    notes: list[str] = field(default_factory=list)
    # floating buffers the checkpoint does not hold (non-persistent), as the model's own constructor computes
    # them: a loader that leaves them uninitialised (transformers 5 does) is caught by comparing with these
    init_buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def module_names(self) -> list[str]:
        if self.modules is not None:
            return [n for n in self.modules if n]
        names = set()
        for key in self.weights:
            parts = key.split(".")
            for i in range(1, len(parts)):
                names.add(".".join(parts[:i]))
        return sorted(names)

    def layer(self, module: str) -> tuple[LayerKind, Dims] | None:
        """(layer kind, dims) of a module PEFT's LoRA can wrap, from the module tree; None when unknown."""
        info = (self.modules or {}).get(module)
        kind = kind_named(info.kind) if info else None
        if kind is None or info.in_features is None or info.out_features is None:
            return None
        return kind, Dims(info.in_features, info.out_features)

    def layer_kinds(self) -> dict[str, LayerKind | None] | None:
        """Every module's layer kind (None: not a kind LoRA wraps here); None without a module tree."""
        if self.modules is None:
            return None
        return {name: kind_named(info.kind) for name, info in self.modules.items() if name}

    def own_key(self, param: str) -> str:
        """The checkpoint key ``param`` is saved under when it is its own tensor (untied)."""
        return self.checkpoint_keys.get(param, param)

    def checkpoint_key(self, param: str) -> str:
        """The base checkpoint key that holds ``param``'s value (a tied parameter: its partner's key)."""
        return self.own_key(self.tied.get(param, param))

    def tied_partners(self, param: str) -> list[str]:
        """The other parameters that share ``param``'s storage (tied input embedding and LM head)."""
        holder = self.tied.get(param, param)
        group = {holder} | {alias for alias, h in self.tied.items() if h == holder}
        return sorted(group - {param}) if len(group) > 1 else []

    @functools.cached_property
    def family(self) -> families.ModelFamily:
        """The model family this base belongs to, detected from its config and module names (or checkpoint keys)."""
        return families.detect(self.config, self.module_names())

    def branch_modules(self) -> set[str]:
        """Modules that carry the base model's own low-rank branch (XComposer: the PLoRA modules)."""
        if self.modules is not None:
            return {n for n, m in self.modules.items() if m.is_branch}
        return self.family.branch_modules_from_keys(self.weights)


def read_weight_index(base_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of every tensor in the base's weight files (validated headers only)."""
    from harness.inputs.model_dir import ModelDir

    return ModelDir(base_dir).shapes()


def build_on_meta(base_dir: Path) -> torch.nn.Module:
    """Instantiate the model class from its config with every parameter on the meta device (no weights, no
    RAM) and its buffers computed for real by its own constructor (they are small: RoPE tables, masks)."""
    from transformers import AutoModelForCausalLM

    from harness.loading.base import model_config
    from harness.loading.model_code import building_model, remote_code_allowed

    trusted = remote_code_allowed()  # the run's decision; model_config refuses a directory with code without it
    config = model_config(base_dir, trust_remote_code=trusted)
    with warnings.catch_warnings(), _parameters_on_meta(), building_model(base_dir):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trusted)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered meanwhile moves to the meta device as it is registered (before any
    initialiser touches it); buffers stay where the constructor made them."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def constructor_buffers(model: torch.nn.Module, limit: int = 1 << 24) -> dict[str, torch.Tensor]:
    """The floating, non-persistent buffers the constructor computed (not in the checkpoint), up to ``limit``
    elements each."""
    persistent = set(model.state_dict())
    return {name: buffer.detach().float().clone() for name, buffer in model.named_buffers()
            if name not in persistent and buffer.is_floating_point() and buffer.device.type != "meta"
            and buffer.numel() <= limit}


def module_tree(model: torch.nn.Module) -> dict[str, ModuleInfo]:
    family = families.family_of(model)
    tree = {}
    for name, module in model.named_modules():
        kind = kind_of_module(module)
        dims = dims_of_module(module, kind) if kind is not None else None
        tree[name] = ModuleInfo(
            name=name,
            type_name=type(module).__name__,
            in_features=dims.in_features if dims else None,
            out_features=dims.out_features if dims else None,
            is_linear=kind is not None and kind.name in ("linear", "conv1d"),
            is_branch=family.is_branch_module(module),
            kind=kind.name if kind is not None else None,
        )
    return tree


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the key ``save_pretrained`` writes it under, by the model's own save-time renaming.

    transformers 5: ``core_model_loading.revert_weight_conversion`` (renamings are followed by tensor identity; a
    parameter a converter merges with others keeps its own name). transformers 4.4x-4.5x: the reverse of
    ``_checkpoint_conversion_mapping``, as ``save_pretrained`` applies it. Older: the names themselves.
    """
    import re

    # one view per name, tied names included, so that each is followed by identity through the renaming
    params = {name: param.view_as(param) for name, param in model.named_parameters(remove_duplicate=False)}
    names = {name: name for name in params}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        by_id = {id(p): n for n, p in params.items()}
        try:
            saved = revert_weight_conversion(model, params)
        except Exception:  # noqa: BLE001 - a converter that cannot run on meta tensors: keep the names
            saved = {}
        for key, tensor in saved.items():
            if id(tensor) in by_id:
                names[by_id[id(tensor)]] = key
        return names
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    for name in names:
        for pattern, replacement in {v: k for k, v in mapping.items()}.items():
            replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                names[name] = renamed
                break
    return names


def tied_parameters(model: torch.nn.Module, saved: set[str] | None = None) -> dict[str, str]:
    """Tied parameter -> the name whose value the checkpoint holds (the first name, or the one in ``saved``)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = {}
    for names in groups.values():
        if len(names) > 1:
            holder = next((n for n in names if saved and n in saved), names[0])
            tied.update({n: holder for n in names if n != holder})
    return tied


def input_embedding_name(model: torch.nn.Module) -> str | None:
    """The input embedding's module name (PEFT's ``get_input_embeddings``: where a list of ``trainable_token_indices``
    goes), or None."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return next((name for name, module in model.named_modules() if embedding is not None and module is embedding), None)


def describe_model(model: torch.nn.Module, base_dir: Path | None = None,
                   weights: dict[str, tuple[tuple[int, ...], str]] | None = None) -> BaseModelInfo:
    """A ``BaseModelInfo`` from an instantiated model (meta or real): module tree, kinds, ties, checkpoint keys."""
    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    info = BaseModelInfo(base_dir=Path(base_dir or "."), config=config, weights=dict(weights or {}))
    info.modules = module_tree(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    info.output_head = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    info.input_embedding = input_embedding_name(model)
    info.checkpoint_keys = checkpoint_names(model)
    saved = {p for p, key in info.checkpoint_keys.items() if key in info.weights} if info.weights else None
    info.tied = tied_parameters(model, saved)
    return info


def inspect_base(base_dir: str | Path, *, build_tree: bool = True) -> BaseModelInfo:
    base_dir = Path(base_dir)
    from harness.inputs.files import read_model_config

    config = read_model_config(base_dir)  # untrusted: regular file, bounded JSON, InputError (exit 2) otherwise
    weights = read_weight_index(base_dir)
    info = BaseModelInfo(base_dir=base_dir, config=config, weights=weights)
    if build_tree:
        try:
            model = build_on_meta(base_dir)
            info = describe_model(model, base_dir, weights)
            info.config = config
            info.init_buffers = constructor_buffers(model)
        except (UnusableInput, UntrustedCode):
            raise  # the model code needs the network, or the user did not allow it to run: no check can use it
        except Exception as exc:  # remote code may download or crash in __init__
            info.meta_build_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            info.notes.append("module tree unavailable (meta build failed); used the weight index instead")
    return info


CHECK_DTYPES = DType.names()


def stored_dtype(base_dir: Path) -> DType | None:
    """The floating dtype the checkpoint is stored in (what users load it as): config.json's ``dtype`` /
    ``torch_dtype`` when it names one of ``CHECK_DTYPES``, else the dtype holding most of the weights' elements;
    None when neither tells (then float32)."""
    from harness.inputs.files import read_model_config

    try:
        config = read_model_config(Path(base_dir))
        declared = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
        if declared in CHECK_DTYPES:
            return DType(declared)
        counts: dict[str, int] = {}
        for shape, dtype in read_weight_index(Path(base_dir)).values():
            if dtype in CHECK_DTYPES:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(shape).numel())
    except Exception:  # noqa: BLE001 - an unreadable directory is reported by the checks that read it
        return None
    return DType(max(counts, key=counts.get)) if counts else None
