"""The synthetic XComposer family: variants, dimensions and deterministic weights.

One code path serves the tiny test models and the real 7B dimensions: only the
``Dims`` change, and PLoRA ranks scale with the hidden size so their ratios stay
those of the real checkpoints (IXC2/2.5: r=256, alpha=256; 4KHD's wqkv: r=8, alpha=16).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace

import torch

from harness.synthetic.modeling.configuration_internlm_xcomposer2 import (
    PLORA_MODULES,
    VARIANTS,
    InternLMXcomposer2Config,
)
from harness.synthetic.modeling.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM

REAL_HIDDEN = 4096


@dataclass(frozen=True)
class Dims:
    """Sizes of the language model and the vision tower."""

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 224
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = 28
    patch_size: int = 7

    def with_(self, **changes) -> "Dims":
        return replace(self, **changes)


TINY = Dims()
FULL_7B = Dims(
    vocab_size=92544,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_layers=24,
    vision_heads=16,
    image_size=336,
    patch_size=14,
)

# Real PLoRA (rank, alpha) per variant and module at hidden 4096.
_REAL_PLORA = {
    "ixc2": {m: (256, 256) for m in PLORA_MODULES},
    "ixc2.5": {m: (256, 256) for m in PLORA_MODULES},
    "ixc2-4khd": {**{m: (256, 256) for m in PLORA_MODULES}, "wqkv": (8, 16)},
}


def plora_ranks(variant: str, hidden_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """PLoRA ranks scaled to ``hidden_size``, keeping each module's alpha/r scaling exact."""
    ranks, alphas = {}, {}
    for module, (r, alpha) in _REAL_PLORA[variant].items():
        small_r = min(r, max(2, round(r * hidden_size / REAL_HIDDEN)))
        scaled_alpha = small_r * alpha / r
        ranks[module] = small_r
        alphas[module] = int(scaled_alpha) if scaled_alpha.is_integer() else scaled_alpha
    return ranks, alphas


def make_config(variant: str = "ixc2", dims: Dims = TINY, **overrides) -> InternLMXcomposer2Config:
    """A config for one variant at the given dimensions (``overrides`` win)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    ranks, alphas = plora_ranks(variant, dims.hidden_size)
    vision = {
        "hidden_size": dims.vision_hidden_size,
        "intermediate_size": dims.vision_intermediate_size,
        "num_hidden_layers": dims.vision_layers,
        "num_attention_heads": dims.vision_heads,
        "image_size": dims.image_size,
        "patch_size": dims.patch_size,
    }
    kwargs = dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        variant=variant,
        plora_r=ranks,
        plora_alpha=alphas,
        vision_config=vision,
    )
    kwargs.update(overrides)
    return InternLMXcomposer2Config(**kwargs)


def _std_for(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) for a parameter, chosen so activations stay O(1) at any size."""
    if "GN" in name:
        return 0.0, 0.5
    if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
        return 1.0, 0.05
    if name.endswith("bias"):
        return 0.0, 0.02
    if "tok_embeddings" in name:
        return 0.0, 1.0
    if len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return 0.0, fan_in**-0.5
    return 0.0, 0.02


def name_seed(name: str, seed: int) -> int:
    """A per-tensor seed from its name: the same name gets the same values in any model."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFF_FFFF_FFFF


@torch.no_grad()
def fill_deterministic(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter from a generator seeded by its name (order-independent, bit-reproducible)."""
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            continue
        mean, std = _std_for(name, param.shape)
        gen = torch.Generator(device=param.device).manual_seed(name_seed(name, seed))
        values = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
        param.copy_(values.mul_(std).add_(mean))


def build_model(
    variant: str = "ixc2",
    dims: Dims = TINY,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
) -> InternLMXComposer2ForCausalLM:
    """Build a synthetic model in ``eval()`` mode; ``device="meta"`` builds shapes only."""
    config = make_config(variant, dims, **overrides)
    with torch.device(device):
        model = InternLMXComposer2ForCausalLM(config)
    fill_deterministic(model, seed)
    return model.to(dtype).eval()


def dims_dict(dims: Dims) -> dict:
    return asdict(dims)
