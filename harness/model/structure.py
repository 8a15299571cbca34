"""What the harness knows about a base model without loading its weights.

Two views, both cheap: the weight index (names, shapes, dtypes from the
safetensors headers) and the module tree, instantiated on the meta device from
the directory's own config and remote code. The tree is optional: code that
downloads things in ``__init__`` (the real XComposer fetches CLIP) may fail on
meta, and then the weight index alone still answers the structural questions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.model import families


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    type_name: str
    in_features: int | None = None
    out_features: int | None = None
    is_linear: bool = False
    is_branch: bool = False  # carries the base model's own low-rank branch (PLoRA), by a family's structural test


@dataclass
class BaseModelInfo:
    base_dir: Path
    config: dict
    weights: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    modules: dict[str, ModuleInfo] | None = None  # None when the meta build failed
    meta_build_error: str | None = None
    output_head: str | None = None  # the LM head's module name; PEFT's "all-linear" skips it
    notes: list[str] = field(default_factory=list)

    def module_names(self) -> list[str]:
        if self.modules is not None:
            return [n for n in self.modules if n]
        names = set()
        for key in self.weights:
            parts = key.split(".")
            for i in range(1, len(parts)):
                names.add(".".join(parts[:i]))
        return sorted(names)

    def linear_dims(self, module: str) -> tuple[int, int] | None:
        """(in_features, out_features) of a linear-like module, from the tree or its weight."""
        if self.modules is not None and module in self.modules and self.modules[module].is_linear:
            info = self.modules[module]
            return info.in_features, info.out_features
        shape = self.weights.get(f"{module}.weight", (None,))[0]
        if shape and len(shape) == 2:
            return shape[1], shape[0]
        return None

    def branch_modules(self) -> set[str]:
        """Modules that carry the base model's own low-rank branch (XComposer: the PLoRA modules)."""
        if self.modules is not None:
            return {n for n, m in self.modules.items() if m.is_branch}
        return families.branch_modules_from_keys(self.weights)


def read_weight_index(base_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of every tensor in the base's weight files (validated headers only)."""
    from harness.inputs.model_dir import ModelDir

    return ModelDir(base_dir).shapes()


def build_on_meta(base_dir: Path) -> torch.nn.Module:
    """Instantiate the model class on the meta device from its config (no weights, no RAM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=True)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=True)


def module_tree(model: torch.nn.Module) -> dict[str, ModuleInfo]:
    tree = {}
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear)
        tree[name] = ModuleInfo(
            name=name,
            type_name=type(module).__name__,
            in_features=getattr(module, "in_features", None) if is_linear else None,
            out_features=getattr(module, "out_features", None) if is_linear else None,
            is_linear=is_linear,
            is_branch=families.is_branch_module(module),
        )
    return tree


def inspect_base(base_dir: str | Path, *, build_tree: bool = True) -> BaseModelInfo:
    base_dir = Path(base_dir)
    from harness.inputs.files import read_model_config

    config = read_model_config(base_dir)  # untrusted: regular file, bounded JSON, InputError (exit 2) otherwise
    info = BaseModelInfo(base_dir=base_dir, config=config, weights=read_weight_index(base_dir))
    if build_tree:
        try:
            model = build_on_meta(base_dir)
            info.modules = module_tree(model)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            info.output_head = next((n for n, m in model.named_modules() if m is head), None)
        except Exception as exc:  # remote code may download or crash in __init__
            info.meta_build_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            info.notes.append("module tree unavailable (meta build failed); used the weight index instead")
    return info
