"""Which torch/transformers/PEFT this process runs, what they can do, and the supported range.

The harness runs on the XComposer-era stack (transformers 4.33, peft 0.8) and today's
(transformers 5, peft 0.21). Version-dependent behaviour is decided here once, by probing the
installed library where that is cheap (a feature is present or not), so the rest of the code
never compares version strings itself.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DISTRIBUTION = "plora-harness"
_CHECKED = ("torch", "transformers", "peft")


def _installed_version(name: str) -> Version | None:
    """The installed version from package metadata: no import, so asking costs nothing."""
    try:
        return Version(metadata.version(name).split("+")[0])
    except metadata.PackageNotFoundError:
        return None


def _supported_ranges() -> dict[str, SpecifierSet]:
    """The tested ranges, read from this package's own requirements (pyproject.toml is the one place)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    ranges = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name in _CHECKED and requirement.marker is None:
            ranges[requirement.name] = requirement.specifier
    return ranges


# The tested range: CI runs the oldest and the newest end of it (README, "Supported versions").
SUPPORTED: dict[str, SpecifierSet] = _supported_ranges()
_INSTALLED: dict[str, Version | None] = {name: _installed_version(name) for name in _CHECKED}
TORCH_VERSION = _INSTALLED["torch"]
TRANSFORMERS_VERSION = _INSTALLED["transformers"]
PEFT_VERSION = _INSTALLED["peft"]

# ``from_pretrained(dtype=...)`` since transformers 4.56; ``torch_dtype=`` before (and deprecated after).
DTYPE_KW = "dtype" if TRANSFORMERS_VERSION and TRANSFORMERS_VERSION >= Version("4.56") else "torch_dtype"
# ``from_pretrained(attn_implementation=...)`` since transformers 4.36.
ATTN_IMPLEMENTATION_KWARG = bool(TRANSFORMERS_VERSION and TRANSFORMERS_VERSION >= Version("4.36"))
# What XComposer2.5's config asks for by default, and what needs the flash_attn package.
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


class UnsupportedStack(RuntimeError):
    """An installed library is outside the tested range. ``str(err)`` is one line with the fix."""


def unsupported() -> list[str]:
    """One phrase per installed library outside ``SUPPORTED`` (empty when all are inside)."""
    problems = []
    for name, specifier in SUPPORTED.items():
        found = _INSTALLED.get(name)
        if found is None:
            problems.append(f"{name} not installed (supported: {_ordered(specifier)})")
        elif not specifier.contains(found, prereleases=True):
            problems.append(f"{name} {found} (supported: {_ordered(specifier)})")
    return problems


def _ordered(specifier: SpecifierSet) -> str:
    """">=0.8,<1": lower bounds first, rather than SpecifierSet's own order."""
    rank = {">=": 0, ">": 1, "~=": 2, "==": 3, "===": 3, "<=": 4, "<": 5, "!=": 6}
    return ",".join(str(s) for s in sorted(specifier, key=lambda s: (rank.get(s.operator, 7), s.version)))


def require_supported() -> None:
    """Refuse to run on an untested stack instead of failing oddly deep inside a check."""
    problems = unsupported()
    if problems:
        pins = " ".join(f"'{name}{_ordered(specifier)}'" for name, specifier in SUPPORTED.items())
        raise UnsupportedStack(
            f"plora-harness does not support {'; '.join(problems)}; install a supported stack, e.g. pip install {pins}."
        )


@functools.cache
def lora_config_fields() -> frozenset[str]:
    """Field names the installed PEFT's ``LoraConfig`` knows (what an adapter_config.json may use)."""
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


def peft_supports(field: str) -> bool:
    """Whether the installed PEFT has this LoraConfig field (``use_dora``, ``lora_bias``, ``exclude_modules``...)."""
    return field in lora_config_fields()


@functools.cache
def peft_drops_unknown_config_fields() -> bool:
    """True when the installed PEFT drops unknown adapter_config.json fields with a warning (peft >= 0.14 or so);
    False when it raises TypeError on them, as the XComposer-era peft 0.7/0.8 does. Probed, not looked up."""
    from peft import PeftConfig

    probe = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q"], "plora_harness_probe": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            PeftConfig.from_peft_type(**probe)
        except TypeError:
            return False
    return True


def _plora_probe():
    """A target linear ``q`` next to a base linear named like PLoRA's ``Plora_A`` (the name PEFT trips on)."""
    import torch

    from harness.model.families.xcomposer import BRANCH_CHILDREN

    class PloraProbe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(2, 2, bias=False)
            setattr(self, BRANCH_CHILDREN[0], torch.nn.Linear(2, 2, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, BRANCH_CHILDREN[0])(self.q(x))

    return PloraProbe()


@functools.cache
def peft_leaves_lora_named_params_trainable() -> bool:
    """Whether ``get_peft_model`` leaves base parameters whose names contain ``lora_`` trainable.

    PEFT <= 0.20 freezes by name (``"lora_" not in name``), so PLoRA's ``Plora_A``/``Plora_B`` and
    ``plora_*_GN`` keep training, and are never saved. Probed on a two-linear module.
    """
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_plora_probe(), LoraConfig(r=1, lora_alpha=1, target_modules=["q"]))
    return any(p.requires_grad for n, p in model.named_parameters() if "Plora_A" in n)


@functools.cache
def merge_skips_lora_named_modules() -> bool:
    """Whether ``merge_and_unload`` leaves modules whose name contains ``lora_`` unmerged, still wrapped.

    PEFT up to 0.20 filters modules by that substring, so a LoRA placed on PLoRA's ``Plora_A``/``Plora_B``
    survives the merge as a wrapper and is dropped on save; 0.21 merges it into them.
    Probed on a two-parameter module, not looked up by version.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_plora_probe(), LoraConfig(r=1, lora_alpha=1, target_modules=["Plora_A"]))
        merged = model.merge_and_unload()
    return any(isinstance(module, LoraLayer) for module in merged.modules())


def transformers_peft_missing() -> str | None:
    """Why transformers' PEFT integration (PeftAdapterMixin: model.load_adapter, from_pretrained(adapter_dir)) is
    missing, or None."""
    import transformers

    if hasattr(transformers.PreTrainedModel, "load_adapter"):
        return None
    return (f"transformers {transformers.__version__} has no PEFT integration (PreTrainedModel.load_adapter and "
            "from_pretrained(adapter_dir) arrived in transformers 4.33)")


def auto_peft_missing() -> str | None:
    """Why PEFT's AutoPeftModelForCausalLM cannot load a local adapter directory here, or None."""
    try:
        from peft import AutoPeftModelForCausalLM  # noqa: F401
    except ImportError:
        import peft

        return f"peft {peft.__version__} has no AutoPeftModelForCausalLM (added in peft 0.6)"
    from peft.utils import other

    if not hasattr(other, "check_file_exists_on_hf_hub"):
        import peft

        return (f"peft {peft.__version__}'s AutoPeftModelForCausalLM asks the hub whether a local adapter directory "
                "without tokenizer_config.json has a tokenizer and raises HFValidationError on the local path "
                "(peft 0.9 guards that lookup)")
    return None


def versions() -> dict[str, str]:
    """The installed versions, for reports and manifests."""
    return {name: str(found) for name, found in _INSTALLED.items()}
