"""A merged checkpoint saved in bitsandbytes 4-bit: is it requant(dequant(W_q) + ΔW), and how much ΔW survived.

``merge_and_unload`` on a 4-bit model dequantizes each adapted weight, adds ΔW and quantizes the sum again
(PEFT's bitsandbytes merge). ΔW of a fine-tune is usually far below one 4-bit step, so the requantized
weight rounds most of it away: the saved model is the base again, give or take. This module compares,
per adapted module and in weight space (no forward pass):

- the merged checkpoint's dequantized weight W_m;
- W_q + ΔW, with W_q the dequantized base weight (the base as saved quantized, or the 16-bit base
  quantized with the merged directory's own ``quantization_config``) and ΔW from PEFT's ``get_delta_weight``;
- requant(W_q + ΔW), what an honest merge into packed 4-bit weights writes.

W_m far from requant(W_q + ΔW): the directory is not a merge of this adapter into this base. W_m equal to
it: ``lost`` = ‖W_m − (W_q + ΔW)‖ / ‖ΔW‖ says how much of ΔW the requantization destroyed.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.model.quantization import Quantization, bnb_config, read_quantization

REQUANT_MISMATCH = 0.01  # more than this fraction of elements differ from requant(W_q + ΔW): not that merge


@dataclass
class QuantizedMerge:
    """Per adapted module: mismatching fraction against requant(W_q + ΔW); overall ΔW lost."""

    modules: int = 0
    mismatched: dict[str, float] = field(default_factory=dict)  # module -> fraction of elements not requant(...)
    lost: float = 0.0  # ‖W_m − (W_q + ΔW)‖ / ‖ΔW‖ over every adapted module
    error: str | None = None  # could not be measured (one line)


def measure_quantized_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, merged_q: Quantization) -> QuantizedMerge:
    """Compare the 4-bit ``merged_dir`` with requant(dequant(base) + ΔW); never raises for its inputs."""
    import bitsandbytes.functional as bnb_f
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from harness.loading.base import load_base

    out = QuantizedMerge()
    base_q = read_quantization(base_dir)
    load_kwargs = {} if base_q is not None else {"quantization_config": bnb_config(merged_q)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:  # no forward pass on either model: bitsandbytes repacks 4-bit weights for the CPU at the first one
            merged = load_base(merged_dir, dtype=torch.float32)
            base = PeftModel.from_pretrained(load_base(base_dir, dtype=torch.float32, **load_kwargs), str(adapter_dir))
        except Exception as err:  # noqa: BLE001 - an unloadable input is reported, not raised
            out.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            return out
        merged_modules = dict(merged.named_modules())
        lost_sq = delta_sq = 0.0
        for name, layer in base.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer) or name not in merged_modules:
                continue
            weight = getattr(merged_modules[name], "weight", None)
            state = getattr(weight, "quant_state", None)
            base_weight = layer.get_base_layer().weight
            if state is None or getattr(base_weight, "quant_state", None) is None:
                continue
            w_m = bnb_f.dequantize_4bit(weight.data, state).float()
            w_q = bnb_f.dequantize_4bit(base_weight.data, base_weight.quant_state).float()
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
            target = w_q + delta
            packed, new_state = bnb_f.quantize_4bit(target.to(base_weight.quant_state.dtype),
                                                     blocksize=state.blocksize, quant_type=state.quant_type)
            requant = bnb_f.dequantize_4bit(packed, new_state).float()
            out.modules += 1
            mismatch = float((~torch.isclose(w_m, requant, rtol=1e-3, atol=1e-6)).float().mean())
            if mismatch > REQUANT_MISMATCH:
                out.mismatched[name] = mismatch
            lost_sq += float((w_m - target).pow(2).sum())
            delta_sq += float(delta.pow(2).sum())
        out.lost = (lost_sq / delta_sq) ** 0.5 if delta_sq > 0 else 0.0
        del merged, base
        gc.collect()
    if out.modules == 0:
        out.error = "no adapted module of the merged checkpoint is a bitsandbytes 4-bit layer"
    return out
