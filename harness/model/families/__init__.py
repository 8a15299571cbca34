"""Model families: everything the harness knows about one kind of model, one module per family.

A family names the parts of its models the rest of the harness must treat specially: a low-rank
branch the base model owns (XComposer's PLoRA), the keyword that marks image rows, the towers of a
multimodal model, the words its advice uses. Which family a model belongs to is *detected*
(``detect``: from its config and its module or checkpoint names; ``family_of``: from a model), so a
family's rules apply to its own models only; code outside this package asks the detected family,
never a name itself. A new family is one module with a ``ModelFamily`` subclass that calls
``register`` on import (every module of this package is imported before the first detection).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ModelFamily:
    """Names and predicates of one kind of model; every default says "nothing special here"."""

    name = "base"
    branch_label = ""  # what the family calls its own low-rank branch, for messages ("PLoRA")
    mask_kwarg: str | None = None  # the forward keyword that marks image rows ("im_mask")
    # branch parameter kind (``branch_param_kind``) -> what it is, in the words a message needs
    branch_kind_labels: dict[str, str] = {}
    training_fix = ""  # how to keep the branch out of training, when a trainer trains it by mistake
    branch_key_note = ""  # why branch weights end up among adapter keys (": a name filter on 'lora_' ...")
    # merged-checkpoint advice about the branch: "missing" (its weights lost), "folded" (merged into W), "unmerged"
    # (a note on modules a merge leaves wrapped)
    merge_advice: dict[str, str] = {}

    def detect(self, config: Mapping | None, names: Collection[str]) -> bool:
        """Whether a model with this config (config.json as a dict, or None) and these module / parameter names (or
        checkpoint keys) belongs to this family."""
        return False

    # -- a low-rank branch that belongs to the base model: never adapter tensors, never merged into W
    def is_branch_module(self, module: torch.nn.Module) -> bool:
        """A module that carries the branch (structural: by its children, not its class name)."""
        return False

    def branch_modules_from_keys(self, keys: Iterable[str]) -> set[str]:
        """The branch-carrying modules, from checkpoint keys alone (when no module tree is available)."""
        return set()

    def is_branch_param(self, name: str) -> bool:
        """A parameter (or checkpoint key) of the branch."""
        return False

    def branch_param_kind(self, name: str) -> str | None:
        """What a branch parameter is, in the words a fix needs (e.g. "plora", "plora-separator")."""
        return None

    def is_branch_inner(self, module_name: str, branch_modules: set[str]) -> bool:
        """A module inside a branch-carrying module that an adapter must not target (PLoRA's Plora_A/B)."""
        return False

    def branch_weight_keys(self, module: str) -> tuple[str, str] | None:
        """The (down, up) projection weights of the branch inside ``module``, whose product it adds to W."""
        return None

    def branch_key_examples(self, keys: Iterable[str]) -> list[str]:
        """One example key per kind of branch parameter, so a message names them all."""
        return []

    # -- multimodal towers
    def tower_of(self, module_name: str) -> str | None:
        """"vision" / "projector" for a module of those towers, None when this family cannot tell."""
        return None


FAMILIES: list[ModelFamily] = []  # the specific families, most recently registered first


def register(family: ModelFamily) -> ModelFamily:
    """Add a family (a newer registration of the same name replaces the older; newer families are asked first)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    FAMILIES.insert(0, family)
    return family


def unregister(name: str) -> None:
    FAMILIES[:] = [f for f in FAMILIES if f.name != name]


def detect(config: Mapping | None = None, names: Iterable[str] = ()) -> ModelFamily:
    """The family of a model with this config and these module / parameter names (or checkpoint keys): the first
    registered family that recognises it, else the generic Hugging Face family."""
    _load_families()
    names = names if isinstance(names, Collection) and not isinstance(names, str) else list(names)
    return next((family for family in FAMILIES if family.detect(config, names)), GENERIC)


def family_of(model: torch.nn.Module) -> ModelFamily:
    """The family of a loaded (or meta-built) model, a PEFT wrapper looked through."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    return detect(config, [name for name, _ in inner.named_modules()])


@functools.cache
def _load_families() -> None:
    """Import every module of this package, once; each family module registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


from harness.model.families.hf import HuggingFace  # noqa: E402  (the generic family, after the base class exists)

GENERIC: ModelFamily = HuggingFace()
