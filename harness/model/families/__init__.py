"""Model families: everything the harness knows about one kind of model, one module per family.

A family names the parts of its models the rest of the harness must treat specially: a low-rank
branch the base model owns (XComposer's PLoRA), the keyword that marks image rows, the towers of a
multimodal model. Code outside this package asks the registry (``is_branch_param``, ``tower_of``,
...), never a name itself, so a new family is one module with a ``ModelFamily`` subclass and one
``register`` call at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ModelFamily:
    """Names and predicates of one kind of model; every default says "nothing special here"."""

    name = "base"
    branch_label = ""  # what the family calls its own low-rank branch, for messages ("PLoRA")
    mask_kwarg: str | None = None  # the forward keyword that marks image rows ("im_mask")

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


FAMILIES: list[ModelFamily] = []


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES.append(family)
    return family


def is_branch_module(module: torch.nn.Module) -> bool:
    return any(f.is_branch_module(module) for f in FAMILIES)


def branch_modules_from_keys(keys: Iterable[str]) -> set[str]:
    keys = list(keys)
    return set().union(*(f.branch_modules_from_keys(keys) for f in FAMILIES))


def is_branch_param(name: str) -> bool:
    return any(f.is_branch_param(name) for f in FAMILIES)


def branch_param_kind(name: str) -> str | None:
    return next((kind for f in FAMILIES if (kind := f.branch_param_kind(name))), None)


def is_branch_inner(module_name: str, branch_modules: set[str]) -> bool:
    return any(f.is_branch_inner(module_name, branch_modules) for f in FAMILIES)


def branch_weight_keys(module: str) -> list[tuple[str, str]]:
    return [keys for f in FAMILIES if (keys := f.branch_weight_keys(module))]


def branch_key_examples(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    return [example for f in FAMILIES for example in f.branch_key_examples(keys)]


def mask_kwargs() -> list[str]:
    """Every forward keyword some family uses to mark image rows."""
    return [f.mask_kwarg for f in FAMILIES if f.mask_kwarg]


def tower_of(module_name: str) -> str:
    """Which part of a (multimodal) model a module belongs to: "language", "vision" or "projector"."""
    return next((tower for f in FAMILIES if (tower := f.tower_of(module_name))), "language")


from harness.model.families.hf import HuggingFace  # noqa: E402  (registration, after the registry exists)
from harness.model.families.xcomposer import XComposer  # noqa: E402

register(XComposer())
register(HuggingFace())
